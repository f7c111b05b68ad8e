"""The digits world: 8x8 handwritten digits from a small text-conditioned UNet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from sdpo.toy.digits.data import NUM_CLASSES, load_split, prompts_for
from sdpo.toy.digits.model import ToyModelConfig
from sdpo.toy.digits.reward import DigitReward, digit_reward, feature_distance
from sdpo.toy.pretraining import PretrainedWorld


@dataclass(frozen=True)
class DigitsWorld(PretrainedWorld):
    """The digits world (a ``sdpo.toy.world.World``) for one ``ToyModelConfig``."""

    config: ToyModelConfig
    name: ClassVar[str] = "image"
    family: ClassVar[str] = "toy"
    guidance_scale: ClassVar[float] = 1.25

    def prompts(self, per_digit: int) -> list[str]:
        return prompts_for([d for d in range(NUM_CLASSES) for _ in range(per_digit)])

    def reward(self) -> DigitReward:
        return digit_reward()

    def real(self, split: str) -> Tensor:
        return load_split(split)[0]

    def quality(self, samples: Tensor, real: Tensor) -> float:
        return feature_distance(samples, real)
