"""Rewards: the protocol every scorer follows, and the registry `sdpo score --reward NAME` reads."""

from sdpo.rewards.base import MediaKind, Reward
from sdpo.rewards.registry import LAZY_REWARDS, as_reward, known_rewards, load_reward, register_reward

__all__ = ["LAZY_REWARDS", "MediaKind", "Reward", "as_reward", "known_rewards", "load_reward", "register_reward"]
