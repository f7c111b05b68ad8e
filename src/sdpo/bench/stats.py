"""Seed-level statistics: Student-t intervals and the paired t-test, without scipy.

Every figure the benchmarks report across seeds is a mean with a 95% t interval over seeds (not over
samples: samples of one seed share its pairs and training draws, so they are not independent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdpo.errors import InputError


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
