"""Rewards: the protocol every scorer follows, and the registry `sdpo score --reward NAME` reads.

Registered plug-ins (imported on first use; the learned ones need ``pip install -e ".[rewards]"`` and
their weights in a local folder or the local Hugging Face cache): "pickscore", "clip-score", "hpsv2",
"aesthetic" (images), "frames" (any image reward on a video's frames), "videoreward" (VideoAlign),
"combine" (a weighted sum, raw or z-scored per prompt), and the toy worlds' "digits", "moving-digits".
"""

from sdpo.rewards.base import MediaKind, Reward
from sdpo.rewards.registry import LAZY_REWARDS, as_reward, known_rewards, load_reward, register_reward

__all__ = ["LAZY_REWARDS", "MediaKind", "Reward", "as_reward", "known_rewards", "load_reward", "register_reward"]
