"""Paired comparisons of a tuned model against its base: reward gain and win rate with intervals.

Both models are sampled from the same prompts, seeds and initial noise, so each prompt-seed gives
one paired difference; the intervals are over those pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from sdpo.errors import InputError

Z_95 = 1.959963984540054


@dataclass
class Interval:
    """A point estimate with a two-sided 95% interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class Comparison:
    """Tuned versus base on paired samples."""

    n: int
    """Number of paired samples."""
    base_mean: float
    """Mean reward of the base model."""
    tuned_mean: float
    """Mean reward of the tuned model."""
    gain: Interval
    """Mean paired reward difference (tuned - base), normal-approximation 95% interval."""
    win_rate: Interval
    """Share of pairs where tuned scores higher (ties count half), Wilson 95% interval."""
    ties: float
    """Share of exactly tied pairs."""

    def as_dict(self) -> dict:
        return asdict(self)


def mean_interval(values: Tensor) -> Interval:
    """Mean with a normal-approximation 95% interval (t ~ z for the sample sizes used here)."""
    values = values.double().flatten()
    n = values.numel()
    if n < 2:
        raise InputError("need at least two paired samples for an interval")
    mean = values.mean().item()
    half = Z_95 * values.std(unbiased=True).item() / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def wilson_interval(successes: float, n: int) -> Interval:
    """Wilson score interval for a proportion (successes may be fractional when ties count half)."""
    if n < 1:
        raise InputError("need at least one trial")
    p = successes / n
    denominator = 1 + Z_95**2 / n
    centre = (p + Z_95**2 / (2 * n)) / denominator
    half = Z_95 * math.sqrt(p * (1 - p) / n + Z_95**2 / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def compare(base_scores: Tensor, tuned_scores: Tensor) -> Comparison:
    """Paired comparison of per-sample rewards of the base and the tuned model."""
    if base_scores.shape != tuned_scores.shape or base_scores.ndim != 1:
        raise InputError(
            f"base and tuned scores must be 1-D and paired, got {tuple(base_scores.shape)} and {tuple(tuned_scores.shape)}"
        )
    if not (torch.isfinite(base_scores).all() and torch.isfinite(tuned_scores).all()):
        raise InputError("scores contain NaN or infinity")
    base, tuned = base_scores.double(), tuned_scores.double()
    wins = (tuned > base).double().sum().item()
    ties = (tuned == base).double().sum().item()
    n = base.numel()
    return Comparison(
        n=n,
        base_mean=base.mean().item(),
        tuned_mean=tuned.mean().item(),
        gain=mean_interval(tuned - base),
        win_rate=wilson_interval(wins + 0.5 * ties, n),
        ties=ties / n,
    )
