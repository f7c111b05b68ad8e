"""Importance-weight profiles: w(t) over a timestep grid, mean and spread, for winners and losers apart.

This is the paper's diagnostic (where along the trajectory do the model's reverse steps agree with
the forward posterior?) computed for any ModelSpec on any precompute cache or on fresh samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdpo.data.batch import PairBatch
from sdpo.importance import log_importance_weight
from sdpo.models.base import ModelSpec


@dataclass
class MemberProfile:
    """w(t) statistics of one set of clean latents at each grid timestep."""

    mean: Tensor
    """Mean w at each grid point, shape (G,)."""
    std: Tensor
    """Standard deviation of w over the samples at each grid point, shape (G,)."""


@dataclass
class WeightProfile:
    """Mean importance weight per timestep for the chosen and rejected members of the pairs."""

    timesteps: Tensor
    """Timestep indices of the grid, shape (G,)."""
    chosen: Tensor
    """Mean w of chosen samples at each grid point, shape (G,)."""
    rejected: Tensor
    """Mean w of rejected samples at each grid point, shape (G,)."""
    chosen_std: Tensor | None = None
    """Spread (standard deviation) of w over the chosen samples, shape (G,)."""
    rejected_std: Tensor | None = None
    """Spread of w over the rejected samples, shape (G,)."""


@torch.no_grad()
def member_profile(
    spec: ModelSpec,
    model: nn.Module,
    x0: Tensor,
    conditions: dict[str, Tensor],
    timesteps: Tensor,
    num_inference_steps: int = 50,
    seed: int = 0,
) -> MemberProfile:
    """Expected-estimator w of the clean latents ``x0`` at each grid timestep.

    The noise at grid point g for sample i depends only on (seed, g, i's position), so two calls with
    the same seed and batch size (chosen, then rejected) share their noise, as in training.
    """
    schedule = spec.schedule
    generator = torch.Generator().manual_seed(seed)
    x0 = x0.float()
    means, stds = [], []
    for t_value in timesteps.tolist():
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.full((x0.shape[0],), int(t_value), dtype=torch.long, device=x0.device)
        noisy = schedule.add_noise(x0, noise, t)
        model_t = schedule.model_timestep(t).to(device=x0.device, dtype=torch.float32)
        prediction = spec.predict(model, noisy, model_t, conditions).float()
        x0_hat = schedule.x0_from_prediction(noisy, prediction, t)
        w = log_importance_weight(schedule, x0, x0_hat, t, schedule.previous_timestep(t, num_inference_steps)).exp()
        means.append(w.mean())
        stds.append(w.std() if w.numel() > 1 else torch.zeros(()))
    return MemberProfile(mean=torch.stack(means).cpu(), std=torch.stack(stds).cpu())


def weight_profile(
    spec: ModelSpec,
    model: nn.Module,
    batch: PairBatch,
    timesteps: Tensor,
    num_inference_steps: int = 50,
    seed: int = 0,
) -> WeightProfile:
    """w(t) of the chosen and of the rejected members of ``batch`` (a collated PairBatch), shared noise."""
    chosen = member_profile(spec, model, batch.chosen, batch.conditions, timesteps, num_inference_steps, seed)
    rejected = member_profile(spec, model, batch.rejected, batch.conditions, timesteps, num_inference_steps, seed)
    return WeightProfile(timesteps=timesteps, chosen=chosen.mean, rejected=rejected.mean, chosen_std=chosen.std,
                         rejected_std=rejected.std)
