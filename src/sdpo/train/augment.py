"""Per-step augmentation of cached latents: a fresh draw from the VAE posterior, and horizontal flips.

The cache stores each latent's posterior mean (and, for the VAE families, its std), encoded once.
Diffusers' Diffusion-DPO scripts instead encode every step, drawing ``latent_dist.sample()`` and
mirroring images at random; this module gives the cached pairs the same two sources of variety.

Every draw is keyed on (seed, step, the pair's global index), as the timestep and noise draws of
:func:`sdpo.train.step.draw_for_pairs` are, each kind from its own stream: a resumed run and a run
on another number of processes draw the same values, and switching an augmentation on leaves the
timesteps and noise of every step as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from sdpo.data.batch import PairBatch
from sdpo.errors import InputError
from sdpo.seeding import mix_seed
from sdpo.train.config import FLIPS, LATENT_SAMPLING

__all__ = ["FLIPS", "LATENT_SAMPLING", "augment_batch", "flip_coins", "has_latent_std", "keyed_generator",
           "posterior_noise", "samples_latents"]

_POSTERIOR_STREAM = 1
_FLIP_STREAM = 2


def keyed_generator(seed: int, step: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator determined by (seed, step, global index) and a stream number (>= 1), so that each
    kind of draw is independent of the others and of draw_for_pairs, which seeds with
    ``mix_seed(seed, step, index)`` itself."""
    return torch.Generator().manual_seed(mix_seed(mix_seed(seed, step, index), stream, 0))


def samples_latents(setting: str, dataset: Any) -> bool:
    """Whether training draws each latent from its posterior: "mean" never, "sample" always (the cache
    must store stds, else a one-line ValueError), "auto" when the cache stores stds."""
    if setting == "mean":
        return False
    has_std = has_latent_std(dataset)
    if setting == "sample" and not has_std:
        where = getattr(dataset, "cache_dir", None)
        raise InputError(
            f"latent_sampling=sample needs a cache that stores the posterior std of each latent, and "
            f"{f'the cache {where}' if where is not None else 'this dataset'} holds the mean only (made before "
            f"the std was stored, or by a deterministic encoder): rerun `sdpo precompute`, or set latent_sampling "
            f"to auto or mean"
        )
    return has_std


def has_latent_std(dataset: Any) -> bool:
    """Whether ``dataset`` (a CachedPairs, or any sequence of Pair) carries posterior stds."""
    flag = getattr(dataset, "has_latent_std", None)
    if flag is not None:
        return bool(flag)
    first = dataset[0]
    return first.chosen_std is not None and first.rejected_std is not None


def augment_batch(batch: PairBatch, global_indices: Tensor, step: int, seed: int, *, sample: bool,
                  flip: str) -> PairBatch:
    """``batch`` with each latent drawn as ``mean + std * eps`` (``sample``) and mirrored along its
    last axis, the width in every family's layout (``flip``: see ``TrainConfig.flip``).

    The draw comes before the flip; eps and the coins are drawn on the CPU, keyed on
    (``seed``, ``step``, ``global_indices``), and moved to the latents' device.
    """
    if not sample and flip == "none":
        return batch
    chosen, rejected = batch.chosen, batch.rejected
    if sample:
        if batch.chosen_std is None or batch.rejected_std is None:
            raise InputError("latent sampling needs the posterior std of every latent, and this batch has none")
        eps_chosen, eps_rejected = posterior_noise(global_indices, step, seed, tuple(chosen.shape[1:]))
        chosen = chosen.float() + batch.chosen_std.float() * eps_chosen.to(chosen.device)
        rejected = rejected.float() + batch.rejected_std.float() * eps_rejected.to(rejected.device)
    if flip != "none":
        flip_chosen, flip_rejected = flip_coins(global_indices, step, seed, flip)
        chosen = _mirrored(chosen, flip_chosen.to(chosen.device))
        rejected = _mirrored(rejected, flip_rejected.to(rejected.device))
    return dataclasses.replace(batch, chosen=chosen, rejected=rejected)


def posterior_noise(global_indices: Tensor, step: int, seed: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Standard-normal eps for the winner and the loser of each pair, each (B, *shape)."""
    chosen, rejected = [], []
    for index in global_indices.tolist():
        generator = keyed_generator(seed, step, index, _POSTERIOR_STREAM)
        chosen.append(torch.randn(shape, generator=generator))
        rejected.append(torch.randn(shape, generator=generator))
    return torch.stack(chosen), torch.stack(rejected)


def flip_coins(global_indices: Tensor, step: int, seed: int, flip: str) -> tuple[Tensor, Tensor]:
    """Whether the winner and the loser of each pair are mirrored, (B,) booleans each.

    Each pair draws two fair coins; the winner takes the first under both "pair" and "independent",
    the loser the first ("pair": the same as its winner) or the second ("independent").
    """
    rows = [torch.rand(2, generator=keyed_generator(seed, step, index, _FLIP_STREAM)) < 0.5
            for index in global_indices.tolist()]
    coins = torch.stack(rows) if rows else torch.zeros((0, 2), dtype=torch.bool)
    if flip == "none":
        coins = torch.zeros_like(coins)
    return coins[:, 0], coins[:, 0 if flip == "pair" else 1]


def _mirrored(latents: Tensor, mask: Tensor) -> Tensor:
    """Each sample whose ``mask`` is true reversed along the last axis (the width of every layout)."""
    return torch.where(mask.view(-1, *([1] * (latents.dim() - 1))), latents.flip(-1), latents)
