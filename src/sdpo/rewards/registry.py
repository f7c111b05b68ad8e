"""Reward name -> factory, and ``load_reward`` to build one (plug-ins are imported on first use)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from sdpo.errors import InputError
from sdpo.rewards.base import MediaKind, Reward

REWARDS: dict[str, Callable[..., Reward]] = {}
"""Rewards whose factory is imported already (``register_reward`` adds here)."""

LAZY_REWARDS: dict[str, str] = {
    "brightness": "sdpo.rewards.brightness:brightness_reward",  # mean pixel value: a smoke-test reward
    "digits": "sdpo.toy.digits.reward:digit_reward",
    "moving-digits": "sdpo.toy.moving.reward:moving_digit_reward",
    # Learned reward models (the "rewards" extra): weights from local folders or the local HF cache.
    "pickscore": "sdpo.rewards.clip:pickscore",
    "clip-score": "sdpo.rewards.clip:clip_score",
    "hpsv2": "sdpo.rewards.hps:hpsv2",
    "aesthetic": "sdpo.rewards.aesthetic:aesthetic",
    "frames": "sdpo.rewards.video:frames",
    "videoreward": "sdpo.rewards.videoreward:videoreward",
    "combine": "sdpo.rewards.combine:combine",
}
"""Rewards registered as ``"module:factory"``, imported on first use (heavy plug-ins stay unimported)."""


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    """Make ``load_reward(name, **options)`` call ``factory(**options)``."""
    REWARDS[name] = factory


def known_rewards() -> list[str]:
    """Every registered reward name, sorted."""
    return sorted({*REWARDS, *LAZY_REWARDS})


def load_reward(name: str, **options: Any) -> Reward:
    """Build the reward registered as ``name`` with its options (model folder, device, ...)."""
    if name not in REWARDS:
        if name not in LAZY_REWARDS:
            raise InputError(f"unknown reward {name!r}; known rewards: {', '.join(known_rewards()) or 'none'}")
        module_name, _, attribute = LAZY_REWARDS[name].partition(":")
        REWARDS[name] = getattr(importlib.import_module(module_name), attribute)
    _check_options(name, REWARDS[name], options)
    return REWARDS[name](**options)


def _check_options(name: str, factory: Callable[..., Reward], options: dict[str, Any]) -> None:
    """Refuse an option the factory does not take, listing the ones it does (not a TypeError traceback)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(f"reward {name!r} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(accepted) or 'none'}")


class CallableReward:
    """A plain ``(media, prompts) -> Tensor`` function seen as a Reward."""

    def __init__(self, fn: Callable[[Tensor, list[str]], Tensor], name: str, media: MediaKind) -> None:
        self.fn, self.name, self.media = fn, name, media

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        return self.fn(media, prompts)


def as_reward(value: Reward | Callable[[Tensor, list[str]], Tensor], name: str | None = None,
              media: MediaKind = "image") -> Reward:
    """``value`` itself if it is a Reward, else the callable wrapped under ``name``."""
    if isinstance(value, Reward):
        return value
    if not callable(value):
        raise InputError(f"a reward must have a score(media, prompts) method or be callable, got {type(value).__name__}")
    return CallableReward(value, name or str(getattr(value, "__name__", "reward")), media)
