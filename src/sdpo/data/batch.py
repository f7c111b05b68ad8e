"""Typed pairs: one cached pair (``Pair``) and a stacked batch of them (``PairBatch``); labelled samples
(``Sample``, ``SampleBatch``) for Diffusion-KTO.

Latents are in the family's own layout, already normalised; conditions are the tensors the family's
``predict`` takes (text embeddings, masks, pooled embeddings...), keyed as in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sdpo.errors import InputError


@dataclass
class Pair:
    """One preference pair as the precompute cache stores it (no batch dimension)."""

    chosen: Tensor
    """Latents of the preferred sample."""
    rejected: Tensor
    """Latents of the other sample."""
    conditions: dict[str, Tensor]
    """Conditioning tensors of the prompt, shared by both."""
    gap: Tensor | None = None
    """The pair's score gap (chosen minus rejected reward, a 0-d float64 tensor) when its source recorded
    one (`sdpo pairs` does), else None; read only by ``pair_weighting``."""
    chosen_std: Tensor | None = None
    """Posterior std of the preferred sample's latents (``chosen`` is then the posterior mean), or None
    for a cache that stores the mean only or a deterministic encoder."""
    rejected_std: Tensor | None = None
    """Posterior std of the other sample's latents, or None (as ``chosen_std``)."""


@dataclass
class PairBatch:
    """B pairs stacked: what one preference step consumes."""

    chosen: Tensor
    """Latents of the preferred samples, (B, ...)."""
    rejected: Tensor
    """Latents of the other samples, (B, ...)."""
    conditions: dict[str, Tensor]
    """Conditioning tensors, each (B, ...)."""
    gaps: Tensor | None = None
    """Score gaps, (B,) float64, when every pair has one (else None)."""
    chosen_std: Tensor | None = None
    """Posterior std of ``chosen``, (B, ...), or None (see ``Pair.chosen_std``)."""
    rejected_std: Tensor | None = None
    """Posterior std of ``rejected``, (B, ...), or None."""

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    @classmethod
    def collate(cls, items: Sequence[Pair]) -> PairBatch:
        """Stack pairs into a batch (usable as a DataLoader ``collate_fn``); all must share condition keys."""
        if not items:
            raise InputError("cannot collate an empty list of pairs")
        keys = set(items[0].conditions)
        for item in items[1:]:
            if set(item.conditions) != keys:
                raise InputError(f"pairs with different conditioning keys: {sorted(keys)} and {sorted(item.conditions)}")
        with_gaps = all(item.gap is not None for item in items)
        with_std = [item.chosen_std is not None and item.rejected_std is not None for item in items]
        if any(with_std) and not all(with_std):
            raise InputError("pairs with and without latent std cannot be collated into one batch")
        return cls(
            chosen=torch.stack([item.chosen for item in items]),
            rejected=torch.stack([item.rejected for item in items]),
            conditions={key: torch.stack([item.conditions[key] for item in items]) for key in items[0].conditions},
            gaps=torch.stack([item.gap.double().reshape(()) for item in items if item.gap is not None]) if with_gaps else None,
            chosen_std=torch.stack([item.chosen_std for item in items]) if with_std[0] else None,  # type: ignore[misc]
            rejected_std=torch.stack([item.rejected_std for item in items]) if with_std[0] else None,  # type: ignore[misc]
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PairBatch:
        """Move to ``device``; ``dtype`` casts the floating conditions only (they follow the frozen
        weights' dtype), while latents keep theirs (the objective computes in float32); ``gaps`` stay as
        they are."""
        return PairBatch(
            chosen=self.chosen.to(device),
            rejected=self.rejected.to(device),
            conditions={
                key: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point()
                              else value.dtype)
                for key, value in self.conditions.items()
            },
            gaps=self.gaps,  # per-pair scalars in float64 (not every device has it): they stay on the CPU
            chosen_std=None if self.chosen_std is None else self.chosen_std.to(device),
            rejected_std=None if self.rejected_std is None else self.rejected_std.to(device),
        )


@dataclass
class Sample:
    """One labelled sample as a samples cache stores it (Diffusion-KTO's data: no pairing)."""

    latents: Tensor
    """Latents of the sample."""
    desirable: Tensor
    """0-d bool: True for a desirable (thumbs-up) sample, False for an undesirable one."""
    conditions: dict[str, Tensor]
    """Conditioning tensors of its prompt."""
    score: Tensor | None = None
    """The score the label came from (0-d float64), or None (a person's label)."""


@dataclass
class SampleBatch:
    """B labelled samples stacked: what one Diffusion-KTO step consumes."""

    latents: Tensor
    """Latents, (B, ...)."""
    desirable: Tensor
    """Labels, (B,) bool."""
    conditions: dict[str, Tensor]
    """Conditioning tensors, each (B, ...)."""

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @classmethod
    def collate(cls, items: Sequence[Sample]) -> SampleBatch:
        """Stack samples into a batch; all must share condition keys."""
        if not items:
            raise InputError("cannot collate an empty list of samples")
        keys = set(items[0].conditions)
        if any(set(item.conditions) != keys for item in items[1:]):
            raise InputError("samples with different conditioning keys cannot be collated into one batch")
        return cls(
            latents=torch.stack([item.latents for item in items]),
            desirable=torch.stack([item.desirable.to(torch.bool).reshape(()) for item in items]),
            conditions={key: torch.stack([item.conditions[key] for item in items]) for key in items[0].conditions},
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SampleBatch:
        """Move to ``device``; ``dtype`` casts the floating conditions only (as ``PairBatch.to``)."""
        return SampleBatch(
            latents=self.latents.to(device),
            desirable=self.desirable.to(device),
            conditions={
                key: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point()
                              else value.dtype)
                for key, value in self.conditions.items()
            },
        )
