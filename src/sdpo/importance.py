"""Step-wise importance weights w(t) = p_theta(x_s | x_t) / q(x_s | x_t, x_0).

Both Gaussians share the posterior variance, and their means differ only through x_0 versus the
model's x0_hat, so with e = x_0 - x0_hat and dSNR = SNR(s) - SNR(t) >= 0 the per-dimension
log-ratio at x_s = mu_q + sqrt(var) z is

    log w_d = -sqrt(dSNR) * z_d * e_d - dSNR * e_d^2 / 2,

whose expectation over z is -dSNR * e_d^2 / 2 = -KL(q || p_theta) per dimension. Every weight is
reported as the mean over the D elements of one sample (a geometric mean of per-dimension ratios):
a sum over a 10^6-element video latent would turn every weight into 0 or 1.

Weights are diagnostics and multipliers, never paths for gradient: everything here runs under
``torch.no_grad``. This module imports only torch.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from sdpo.schedules import NoiseSchedule

Estimator = Literal["expected", "sampled", "relative"]
"""The importance-weight estimators (``MethodConfig.estimator``)."""
ESTIMATORS: tuple[Estimator, ...] = get_args(Estimator)


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def _check_pair(x0: Tensor, x0_hat: Tensor, t: Tensor, s: Tensor) -> None:
    if x0.shape != x0_hat.shape:
        raise ValueError(f"x0 and x0_hat shapes differ: {tuple(x0.shape)} vs {tuple(x0_hat.shape)}")
    if x0.ndim < 2:
        raise ValueError("x0 must have a leading batch dimension and at least one data dimension")
    if t.shape != (x0.shape[0],) or s.shape != t.shape:
        raise ValueError(f"t and s must hold one timestep per sample, shape ({x0.shape[0]},)")
    if t.device.type != "meta" and bool((s > t).any()):  # meta: a shape-only run, no values to compare
        raise ValueError("the previous point s must not be noisier than t")


@torch.no_grad()
def log_importance_weight(
    schedule: NoiseSchedule,
    x0: Tensor,
    x0_hat: Tensor,
    t: Tensor,
    s: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """Per-sample log w for the reverse step t -> s, averaged over the data dimensions.

    Args:
        schedule: the model's noise schedule.
        x0: clean samples, shape (B, ...).
        x0_hat: the model's clean-sample estimate at (x_t, t), same shape.
        t: timesteps, shape (B,).
        s: previous points (``schedule.previous_timestep``), shape (B,), s <= t.
        noise: None for the closed-form expected estimator E_q[log w] = -KL(q || p_theta) / D
            (always <= 0); a standard-normal tensor of x0's shape for the sampled estimator at
            x_s = mu_q + sqrt(var) * noise (unbiased, can exceed 0).

    Returns:
        float tensor of shape (B,) in x0's dtype, finite wherever the inputs are.
    """
    t = torch.as_tensor(t, device=x0.device)
    s = torch.as_tensor(s, device=x0.device)
    _check_pair(x0, x0_hat, t, s)
    delta_snr = (schedule.snr(s) - schedule.snr(t)).clamp_min(0.0)
    delta_snr = delta_snr.to(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
    error = x0 - x0_hat
    if noise is None:
        return -0.5 * _per_sample_mean(delta_snr * error.square())
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    per_dim = -delta_snr.sqrt() * noise * error - 0.5 * delta_snr * error.square()
    return _per_sample_mean(per_dim)


@torch.no_grad()
def log_relative_weight(
    schedule: NoiseSchedule,
    x0: Tensor,
    x0_hat: Tensor,
    x0_hat_ref: Tensor,
    t: Tensor,
    s: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """Per-sample log of p_theta(x_s | x_t) / p_ref(x_s | x_t) at x_s ~ q(x_s | x_t, x_0).

    Exactly 0 (w = 1) while the policy equals the reference, so a clip to [1 - eps, 1 + eps]
    bounds how far an update may move from the data-collecting policy, as in PPO.
    """
    policy = log_importance_weight(schedule, x0, x0_hat, t, s, noise)
    reference = log_importance_weight(schedule, x0, x0_hat_ref, t, s, noise)
    return policy - reference
