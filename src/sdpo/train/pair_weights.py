"""Per-pair loss weights from the data (``pair_weighting``): a pair's score gap over the dataset's mean gap.

The mean is taken once over the whole dataset, not per batch, so a pair's weight depends only on its
own gap: the same on every process, on resume, and whatever batch it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdpo.errors import InputError


@dataclass(frozen=True)
class PairWeights:
    """What turns a batch's gaps into loss weights."""

    mean_gap: float
    """Mean score gap over the dataset (the divisor)."""
    source: str
    """The cache (or dataset) the gaps come from, for messages."""

    @classmethod
    def from_dataset(cls, mode: str, dataset: Any, source: str) -> PairWeights | None:
        """The weights ``mode`` asks for over ``dataset`` (None for "none"); one-line ValueError when a
        pair has no gap, a gap is negative, or every gap is 0."""
        if mode == "none":
            return None
        gaps = _dataset_gaps(dataset)
        if gaps is None:
            raise InputError(f"pair_weighting={mode} needs each pair's score gap, but {source} holds none: "
                             f"precompute it again from pairs that carry a numeric \"gap\" (as `sdpo pairs` "
                             f"writes them), or set pair_weighting to none")
        if bool((gaps < 0).any()):
            first = int((gaps < 0).nonzero()[0, 0])
            raise InputError(f"pair_weighting={mode}: pair {first} of {source} has a negative gap "
                             f"({float(gaps[first])}); chosen must score above rejected")
        mean = float(gaps.mean())
        if not mean > 0:
            raise InputError(f"pair_weighting={mode}: every pair of {source} has gap 0, so no pair would count")
        return cls(mean_gap=mean, source=source)

    def for_batch(self, gaps: Tensor | None) -> Tensor:
        """Weights (B,) float64 for a batch's gaps, gap / mean gap."""
        if gaps is None:
            raise InputError(f"a batch from {self.source} has pairs without a score gap")
        return gaps.double() / self.mean_gap


def _dataset_gaps(dataset: Any) -> Tensor | None:
    """Every pair's gap, (N,) float64, or None when any pair has none."""
    if hasattr(dataset, "gaps"):  # a CachedPairs reads them straight from its shards
        return dataset.gaps()
    gaps = [dataset[i].gap for i in range(len(dataset))]
    if any(gap is None for gap in gaps):
        return None
    return torch.stack([gap.double().reshape(()) for gap in gaps])
