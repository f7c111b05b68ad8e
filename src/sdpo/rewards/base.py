"""The reward protocol: what `sdpo score`, `sdpo pairs` and `sdpo evaluate` ask of a scorer.

A reward maps media and their prompts to one score per sample, higher is better. Media follow the
spec conventions (float pixels in [-1, 1]): images (B, C, H, W), videos (B, F, C, H, W). A reward
declares which kind it accepts so a stage can refuse a mismatch with one line before scoring.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

MediaKind = Literal["image", "video"]


@runtime_checkable
class Reward(Protocol):
    """One scorer. Plain callables ``(media, prompts) -> Tensor`` are wrapped by ``as_reward``."""

    name: str
    """Registry name, also the key of its score in ``candidates.jsonl`` and in reports."""
    media: MediaKind
    """The media kind ``score`` accepts."""

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """One float score per sample (shape (B,)), higher is better."""
        ...
