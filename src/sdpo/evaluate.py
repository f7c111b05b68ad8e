"""Paired comparisons of a tuned model against its base: reward gain and win rate with intervals.

The public name of these since the first release; they live in :mod:`sdpo.stats`, with every other
statistic sdpo reports, and new code imports them from there.
"""

from sdpo.stats import Z_95, Comparison, Interval, compare, mean_interval, wilson_interval

__all__ = ["Z_95", "Comparison", "Interval", "compare", "mean_interval", "wilson_interval"]
