"""Importance-weight profiles: mean w(t) over a timestep grid, for winners and losers separately.

This is the paper's diagnostic (where along the trajectory do the model's reverse steps agree with
the forward posterior?) computed for any ModelSpec on any precompute cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdpo.data.batch import PairBatch
from sdpo.importance import log_importance_weight
from sdpo.models.base import ModelSpec


@dataclass
class WeightProfile:
    """Mean importance weight per timestep for the chosen and rejected members of the pairs."""

    timesteps: Tensor
    """Timestep indices of the grid, shape (G,)."""
    chosen: Tensor
    """Mean w of chosen samples at each grid point, shape (G,)."""
    rejected: Tensor
    """Mean w of rejected samples at each grid point, shape (G,)."""


@torch.no_grad()
def weight_profile(
    spec: ModelSpec,
    model: nn.Module,
    batch: PairBatch,
    timesteps: Tensor,
    num_inference_steps: int = 50,
    seed: int = 0,
) -> WeightProfile:
    """Expected-estimator w at each grid timestep, averaged over the pairs of ``batch``.

    ``batch`` is a collated PairBatch (``sdpo.data.collate_pairs``).
    One noise tensor per pair and grid point is shared by its two members, as in training.
    """
    schedule = spec.schedule
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected = batch.chosen.float(), batch.rejected.float()
    pairs = chosen.shape[0]
    x0 = torch.cat([chosen, rejected])
    conditions = {key: torch.cat([value, value]) for key, value in batch.conditions.items()}
    means_chosen, means_rejected = [], []
    for t_value in timesteps.tolist():
        noise = torch.randn(chosen.shape, generator=generator).to(x0.device)
        noise = torch.cat([noise, noise])
        t = torch.full((2 * pairs,), int(t_value), dtype=torch.long, device=x0.device)
        noisy = schedule.add_noise(x0, noise, t)
        model_t = schedule.model_timestep(t).to(device=x0.device, dtype=torch.float32)
        prediction = spec.predict(model, noisy, model_t, conditions).float()
        x0_hat = schedule.x0_from_prediction(noisy, prediction, t)
        w = log_importance_weight(schedule, x0, x0_hat, t, schedule.previous_timestep(t, num_inference_steps)).exp()
        means_chosen.append(w[:pairs].mean())
        means_rejected.append(w[pairs:].mean())
    return WeightProfile(timesteps=timesteps, chosen=torch.stack(means_chosen).cpu(),
                         rejected=torch.stack(means_rejected).cpu())
