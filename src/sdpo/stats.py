"""Every statistic sdpo reports: sample-level intervals and paired comparisons, seed-level t statistics.

Two levels, two kinds of interval:

- over paired samples (``sdpo evaluate``: the base and a tuned model sampled from the same prompts,
  seeds and initial noise, one paired difference per sample): the mean gain with a normal 95%
  interval and the win rate with a Wilson 95% interval (``compare``);
- over training seeds (``sdpo bench``: samples of one seed share its pairs and training draws, so they
  are not independent; the seeds are): means with Student-t 95% intervals and the paired t-test
  (``seed_interval``, ``paired_test``).

The t distribution is computed here (regularised incomplete beta by continued fraction, quantiles by
bisection) rather than taken from scipy, though scipy is installed with scikit-learn: scipy's values
differ from these in the last one or two digits (around 1e-15 relative), and the figures sdpo has
written so far should come out the same when recomputed. The tests check these against scipy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from sdpo.errors import InputError

Z_95 = 1.959963984540054
"""The standard normal's 0.975 quantile (two-sided 95%)."""


# --------------------------------------------------------------------- over paired samples
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

    def as_dict(self) -> dict[str, Any]:
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


# --------------------------------------------------------------------- Student's t
def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise InputError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise InputError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile (> 0.5) of Student's t, by bisection on the two-sided p-value."""
    if not 0.5 < probability < 1.0:
        raise InputError(f"probability must be in (0.5, 1), got {probability}")
    target = 2.0 * (1.0 - probability)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_two_sided_p(middle, df) > target else (low, middle)
    return (low + high) / 2.0


# --------------------------------------------------------------------- over seeds
@dataclass(frozen=True)
class SeedInterval:
    """A mean over seeds with its 95% Student-t interval."""

    mean: float
    """Mean over seeds."""
    half_width: float
    """Half-width of the 95% interval (0 with one seed)."""
    n: int
    """Number of seeds."""

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def seed_interval(values: list[float]) -> SeedInterval:
    """Mean of per-seed values with a 95% t interval."""
    n = len(values)
    if n == 0:
        raise InputError("need at least one value")
    mean = sum(values) / n
    if n < 2:
        return SeedInterval(mean, 0.0, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return SeedInterval(mean, t_quantile(0.975, n - 1) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class PairedTest:
    """Method minus baseline, paired by seed."""

    difference: SeedInterval
    """Mean per-seed difference with its 95% interval."""
    p_value: float
    """Two-sided paired t-test p-value (NaN with fewer than two seeds; 1 when every difference is 0)."""


def paired_test(values: list[float], baseline: list[float]) -> PairedTest:
    """The paired t-test of ``values`` against ``baseline`` (same seeds, same order)."""
    if len(values) != len(baseline):
        raise InputError(f"paired values need equal lengths, got {len(values)} and {len(baseline)}")
    differences = [v - b for v, b in zip(values, baseline, strict=True)]
    interval = seed_interval(differences)
    n = len(differences)
    if n < 2:
        return PairedTest(interval, math.nan)
    sd = math.sqrt(sum((d - interval.mean) ** 2 for d in differences) / (n - 1))
    if sd == 0.0:
        return PairedTest(interval, 1.0 if interval.mean == 0.0 else 0.0)
    return PairedTest(interval, t_two_sided_p(interval.mean / (sd / math.sqrt(n)), n - 1))


__all__ = ["Z_95", "Comparison", "Interval", "PairedTest", "SeedInterval", "compare", "mean_interval",
           "paired_test", "regularized_beta", "seed_interval", "t_quantile", "t_two_sided_p", "wilson_interval"]
