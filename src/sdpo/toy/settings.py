"""What every run on an embedded world shares (`sdpo demo`, `sdpo bench methods`, `sdpo bench online`):
the world, its data sizes, the LoRA recipe and the evaluation size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdpo.errors import InputError


@dataclass
class WorldRunSettings:
    """Settings shared by the demo and the benchmarks (validated by ``check_shared``)."""

    world: str = "image"
    """Embedded world: "image" or "video"."""
    pairs_per_digit: int = 16
    """Prompts per digit (10 digits); one pair per prompt (per round, online)."""
    samples_per_prompt: int = 4
    """Candidates per prompt (and generator or round); best and worst form a pair."""
    eval_per_digit: int = 10
    """Held-out evaluation samples per digit and model."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    learning_rate: float = 1e-3
    """LoRA learning rate (constant after a short warm-up)."""
    lora_rank: int = 8
    """LoRA rank."""
    num_inference_steps: int = 25
    """Sampler steps for candidates and evaluation, and the K of the importance weights."""
    cache_root: str | None = None
    """Where the pretrained base (and weaker) models are cached (default $SDPO_CACHE or ~/.cache/sdpo)."""
    toy_overrides: dict[str, Any] = field(default_factory=dict)
    """Base-model config fields to override (tests use a tiny model)."""
    progress: bool = True
    """Show progress bars."""

    def check_shared(self) -> None:
        """Raise ValueError naming the first bad shared setting."""
        from sdpo.toy.world import WORLDS

        if self.world not in WORLDS:
            raise InputError(f"unknown world {self.world!r}; choose one of {', '.join(WORLDS)}")
        for name in ("pairs_per_digit", "eval_per_digit", "batch_size", "lora_rank", "num_inference_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.samples_per_prompt < 2:
            raise InputError(f"samples_per_prompt must be at least 2 (a pair needs two), got {self.samples_per_prompt}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")


__all__ = ["WorldRunSettings"]
