"""Agreement between raters on the items two or more of them labelled: raw agreement, Cohen's and Fleiss' kappa.

``ratings`` is rater -> item -> category (skips left out by the caller). Raw agreement is the mean,
over items rated at least twice, of the share of rater pairs that agree on that item. Fleiss' kappa
uses the same per-item agreement against chance from the pooled category shares (items may have
different numbers of raters); Cohen's kappa is given when exactly two raters share items.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Agreement:
    """How far raters agree."""

    raters: int
    """Raters with at least one rating."""
    items_labelled_twice: int
    """Items rated by two raters or more (the items every figure here is computed on)."""
    raw: float | None
    """Mean share of agreeing rater pairs per item (None without such items)."""
    cohen_kappa: float | None
    """Cohen's kappa, when exactly two raters share items (None otherwise, or when chance agreement is 1)."""
    fleiss_kappa: float | None
    """Fleiss' kappa (None without items rated twice, or when chance agreement is 1)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement(ratings: dict[str, dict[str, str]]) -> Agreement:
    """The agreement of ``ratings`` (see the module docstring)."""
    by_item: dict[str, list[str]] = {}
    for answers in ratings.values():
        for item, category in answers.items():
            by_item.setdefault(item, []).append(category)
    shared = {item: values for item, values in by_item.items() if len(values) >= 2}
    raters = sum(1 for answers in ratings.values() if answers)
    if not shared:
        return Agreement(raters, 0, None, None, None)
    per_item = []
    pooled: Counter[str] = Counter()
    for values in shared.values():
        counts = Counter(values)
        n = len(values)
        per_item.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
        pooled.update(counts)
    raw = sum(per_item) / len(per_item)
    total = sum(pooled.values())
    chance = sum((count / total) ** 2 for count in pooled.values())
    fleiss = None if chance >= 1 else (raw - chance) / (1 - chance)
    return Agreement(raters, len(shared), raw, _cohen(ratings), fleiss)


def _cohen(ratings: dict[str, dict[str, str]]) -> float | None:
    active = [answers for answers in ratings.values() if answers]
    if len(active) != 2:
        return None
    first, second = active
    items = sorted(set(first) & set(second))
    if not items:
        return None
    observed = sum(first[i] == second[i] for i in items) / len(items)
    a, b = Counter(first[i] for i in items), Counter(second[i] for i in items)
    chance = sum(a[c] * b[c] for c in set(a) | set(b)) / len(items) ** 2
    return None if chance >= 1 else (observed - chance) / (1 - chance)


__all__ = ["Agreement", "agreement"]
