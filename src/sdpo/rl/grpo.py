"""The GRPO objective: group-relative advantages, a clipped ratio per trained step, a KL to the reference.

For the K candidates of one prompt with rewards r_1..r_K the advantage is the reward standardised
within the group, A_k = (r_k - mean) / std (the population std, over the K), and 0 for every member
of a group whose rewards are all equal (std below ``eps``): such a group says nothing about which
direction is better, and dividing by ~0 would turn rounding into a huge step. Rewards from several
reward models are combined before this (the score stage's weighted ``total``).

Per trained step of a trajectory, with rho = exp(log p_theta(x_s | x_t) - log p_old(x_s | x_t)) the
ratio to the policy that sampled it, the loss (to minimise) is PPO's clipped surrogate plus a KL term

    loss = max(-A rho, -A clip(rho, 1 - c, 1 + c)) + beta * KL(p_theta || p_ref),

averaged over the batch of (trajectory, step) members. The KL is the closed form between the step's
two Gaussians (``sdpo.rl.sde.gaussian_kl``), exact rather than the k3 estimator's single-sample value.
This module imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-6) -> Tensor:
    """Rewards standardised within their group (population std); 0 where a group's std is below ``eps``.

    ``rewards`` (N,) float, ``groups`` (N,) integer group ids (the prompt index), any order.
    """
    if rewards.shape != groups.shape or rewards.ndim != 1:
        raise ValueError("rewards and groups must be 1-D tensors of the same length")
    rewards = rewards.to(torch.float64)
    ids, inverse = torch.unique(groups, return_inverse=True)
    count = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    variance = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, centred**2) / count
    std = variance.sqrt()[inverse]
    return torch.where(std > eps, centred / std.clamp_min(eps), torch.zeros_like(centred))


@dataclass
class GrpoOutput:
    """The loss and what to log about it."""

    loss: Tensor
    """Scalar, to back-propagate."""
    ratio: Tensor
    """rho per member (B,), no gradient."""
    metrics: dict[str, Tensor]
    """Scalar diagnostics (no gradient)."""


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
              kl: Tensor | None = None, kl_coefficient: float = 0.0) -> GrpoOutput:
    """The clipped surrogate (plus ``kl_coefficient`` * ``kl``), averaged over the B members.

    ``log_prob`` (B,) with gradient, ``old_log_prob`` (B,) recorded while sampling, ``advantages`` (B,),
    ``kl`` (B,) with gradient or None (then ``kl_coefficient`` must be 0).
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    if kl is None and kl_coefficient != 0:
        raise ValueError("kl_coefficient is set but no KL was given")
    advantages = advantages.to(log_prob.dtype)
    ratio = torch.exp(log_prob - old_log_prob.to(log_prob.dtype))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss if kl is None else policy_loss + kl_coefficient * kl.mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "policy_loss": policy_loss.detach(),
            "ratio": ratio.mean(),
            "ratio_deviation": (ratio - 1.0).abs().max(),
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).to(ratio.dtype).mean(),
            "advantage_abs": advantages.abs().mean(),
        }
        if kl is not None:
            metrics["kl"] = kl.detach().mean()
    return GrpoOutput(loss=loss, ratio=ratio.detach(), metrics=metrics)


__all__ = ["GrpoOutput", "group_advantages", "grpo_loss"]
