"""What an embedded world is to the demo: one typed protocol, and the lookup of the two worlds by name.

A world supplies its model family and base model, its prompts, its reward, real data and a quality
guard, and nothing else: sampling, pairs, training and evaluation are the library's own stages,
run by ``sdpo.demo`` exactly as for a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from sdpo.errors import InputError
from sdpo.rewards.base import Reward

WORLDS = ("image", "video")


@runtime_checkable
class World(Protocol):
    """An embedded offline world."""

    # Class-level constants of each world (its dataclass fields are the config alone).
    name: ClassVar[str]
    """The demo's name of the world: "image" or "video"."""
    family: ClassVar[str]
    """Model family of its base model in the spec registry ("toy" or "toy-video")."""
    guidance_scale: ClassVar[float]
    """Classifier-free guidance its base model samples best with."""

    def pretrain(self, cache_root: str | Path | None = None, progress: bool = True) -> Path:
        """The cached base-model folder, pretrained on first use."""
        ...

    def prompts(self, per_digit: int) -> list[str]:
        """``per_digit`` prompts for each digit, digit-major (10 blocks)."""
        ...

    def reward(self) -> Reward:
        """The world's reward (a registry entry)."""
        ...

    def real(self, split: str) -> Tensor:
        """Real media of one split ("train" or "held_out"), in the reward's media convention."""
        ...

    def quality(self, samples: Tensor, real: Tensor) -> float:
        """The quality guard: Fréchet distance of the samples to real media in classifier features (lower is closer)."""
        ...


def get_world(name: str, overrides: dict[str, Any] | None = None) -> World:
    """The named world ("image" or "video") with base-model config overrides; imported only when chosen."""
    if name == "image":
        from sdpo.toy.digits.model import ToyModelConfig
        from sdpo.toy.digits.world import DigitsWorld

        return DigitsWorld(ToyModelConfig(**(overrides or {})))
    if name == "video":
        from sdpo.toy.moving.model import VideoToyConfig
        from sdpo.toy.moving.world import MovingDigitsWorld

        return MovingDigitsWorld(VideoToyConfig(**(overrides or {})))
    raise InputError(f"unknown world {name!r}; choose one of {', '.join(WORLDS)}")
