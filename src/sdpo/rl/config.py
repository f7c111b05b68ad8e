"""The settings of online RL (``sdpo online`` with ``method: grpo``): the ``grpo`` section of an online config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from sdpo.errors import InputError
from sdpo.rl.rollout import NOISE_STEPS, STEP_SELECTIONS, NoiseSteps, RolloutSettings, StepSelection


@dataclass(frozen=True)
class GrpoConfig:
    """GRPO's settings; the group size is the online config's ``per_prompt``, the sampler's steps and guidance
    its ``num_inference_steps`` and ``guidance_scale``, the optimizer steps per round its ``steps``."""

    noise_level: float = 0.7
    """Sampler noise: eta of the DDIM step for epsilon / v models (1 = DDPM's variance), a of Flow-GRPO's SDE
    (sigma_t = a sqrt(t / (1 - t))) for flow models."""
    clip_range: float = 0.2
    """PPO clip c: the ratio to the sampling policy is clipped to [1 - c, 1 + c] (per-element mean log-density)."""
    kl_coefficient: float = 0.0
    """beta of the KL term to the reference (the base: the policy with adapters off); 0 skips the reference forward."""
    select: StepSelection = "window"
    """Which steps of a trajectory are trained: "window" (``train_steps`` from ``window_start``) or "random"
    (``train_steps`` drawn per trajectory)."""
    train_steps: int = 2
    """Trained steps per trajectory (each costs one guided forward and backward per inner pass)."""
    window_start: int = 0
    """First step of the window (0: the noisiest)."""
    noise_steps: NoiseSteps = "all"
    """"all": every sampler step adds noise; "trained": only the trained ones do (the rest are deterministic)."""

    def __post_init__(self) -> None:
        for name in ("noise_level", "clip_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise InputError(f"grpo.{name} must be a positive number, got {value!r}")
        if not isinstance(self.kl_coefficient, (int, float)) or isinstance(self.kl_coefficient, bool) \
                or not math.isfinite(self.kl_coefficient) or self.kl_coefficient < 0:
            raise InputError(f"grpo.kl_coefficient must be a number >= 0, got {self.kl_coefficient!r}")
        if self.select not in STEP_SELECTIONS:
            raise InputError(f"grpo.select must be one of {', '.join(STEP_SELECTIONS)}, got {self.select!r}")
        if self.noise_steps not in NOISE_STEPS:
            raise InputError(f"grpo.noise_steps must be one of {', '.join(NOISE_STEPS)}, got {self.noise_steps!r}")
        for name, low in (("train_steps", 1), ("window_start", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"grpo.{name} must be an integer >= {low}, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrpoConfig:
        """The section as written in YAML; an unknown key is one line naming it."""
        if not isinstance(data, dict):
            raise InputError(f"grpo must be a mapping of GRPO settings, got {data!r:.60}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise InputError(f"unknown grpo setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    def rollout(self, num_inference_steps: int, guidance_scale: float) -> RolloutSettings:
        """The sampler these settings describe at the online config's steps and guidance."""
        return RolloutSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               noise_level=float(self.noise_level), select=self.select, train_steps=self.train_steps,
                               window_start=self.window_start, noise_steps=self.noise_steps)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (the online folder's settings record it)."""
        return asdict(self)


__all__ = ["GrpoConfig"]
