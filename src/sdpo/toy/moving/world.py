"""The moving-digits world: real digits sliding across a small canvas, from a tiny video transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from sdpo.toy.digits.data import NUM_CLASSES
from sdpo.toy.moving.data import DIRECTIONS, load_video_clips, video_prompts_for
from sdpo.toy.moving.model import VideoToyConfig
from sdpo.toy.moving.reward import MovingDigitReward, moving_digit_reward, video_feature_distance
from sdpo.toy.pretraining import PretrainedWorld


@dataclass(frozen=True)
class MovingDigitsWorld(PretrainedWorld):
    """The moving-digits world (a ``sdpo.toy.world.World``) for one ``VideoToyConfig``; each digit's
    prompts cycle through the four directions."""

    config: VideoToyConfig
    name: ClassVar[str] = "video"
    family: ClassVar[str] = "toy-video"
    guidance_scale: ClassVar[float] = 2.0

    def quality(self, samples: Tensor, real: Tensor) -> float:
        return video_feature_distance(samples, real)

    def real(self, split: str) -> Tensor:
        clips, _ = load_video_clips(split, frames=self.config.frames, canvas=self.config.canvas,
                                    speed=self.config.speed)
        return clips

    def reward(self) -> MovingDigitReward:
        return moving_digit_reward(speed=self.config.speed)

    def prompts(self, per_digit: int) -> list[str]:
        digits = [d for d in range(NUM_CLASSES) for _ in range(per_digit)]
        return video_prompts_for(digits, [i % len(DIRECTIONS) for i in range(len(digits))])
