"""Any image reward scored on a video's frames (registered as "frames").

``N`` frames are chosen evenly over the clip (the first and the last included, indices rounded), each
scored with the image reward and its prompt, and the clip's score is their mean.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdpo.errors import InputError
from sdpo.rewards.base import Reward


def frame_indices(total: int, count: int) -> Tensor:
    """``count`` evenly spaced frame indices in ``[0, total)`` (all of them when ``count >= total``)."""
    if total < 1 or count < 1:
        raise InputError(f"need at least one frame to pick from and to pick, got total={total}, count={count}")
    if count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


class FramesReward:
    """Mean of an image reward over ``frames`` evenly chosen frames of each (B, F, C, H, W) clip."""

    media = "video"

    def __init__(self, image_reward: Reward, frames: int = 8) -> None:
        if image_reward.media != "image":
            raise InputError(f"frames wraps an image reward, but {image_reward.name!r} scores {image_reward.media}")
        if int(frames) < 1:
            raise InputError(f"frames must be at least 1, got {frames}")
        self.inner, self.frames = image_reward, int(frames)
        self.name = f"frames:{image_reward.name}"

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """One score per clip (B,): the inner reward's mean over the chosen frames."""
        if media.ndim != 5:
            raise InputError(f"{self.name} scores videos (B, F, C, H, W), got shape {tuple(media.shape)}")
        if len(media) != len(prompts):
            raise InputError(f"got {len(media)} clips but {len(prompts)} prompts")
        batch, total = media.shape[:2]
        picked = media[:, frame_indices(total, self.frames)]
        count = picked.shape[1]
        # Frames of one clip sit next to each other, so the inner reward's own batching still applies.
        scores = self.inner.score(picked.flatten(0, 1), [p for p in prompts for _ in range(count)])
        return scores.float().view(batch, count).mean(dim=1)


def frames(reward: str | Reward = "pickscore", frames: int = 8, **options: Any) -> FramesReward:
    """``reward`` (a registry name, built with ``options``, or a Reward) applied to ``frames`` frames."""
    from sdpo.rewards.registry import load_reward

    inner = load_reward(reward, **options) if isinstance(reward, str) else reward
    return FramesReward(inner, frames)
