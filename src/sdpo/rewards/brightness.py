"""``brightness``: the mean pixel value of an image or clip, in [-1, 1].

A deliberately trivial reward for smoke tests of score / pairs / evaluate on any family (real
models included): it needs no model and accepts both media kinds (``media="image"`` or
``"video"``). Not a measure of quality.
"""

from __future__ import annotations

from torch import Tensor

from sdpo.errors import InputError
from sdpo.rewards.base import MediaKind


class BrightnessReward:
    """Mean pixel value per sample."""

    def __init__(self, media: MediaKind = "image", name: str = "brightness") -> None:
        if media not in ("image", "video"):
            raise InputError(f"media must be 'image' or 'video', got {media!r}")
        self.media, self.name = media, name

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        return media.float().flatten(1).mean(dim=1)


def brightness_reward(media: MediaKind = "image") -> BrightnessReward:
    """The ``brightness`` registry entry (option ``media``: "image" or "video")."""
    return BrightnessReward(media)
