"""Stochastic reverse steps with a known Gaussian density, for policy-gradient training (GRPO).

One step of a sampler with ``num_inference_steps`` steps goes from a level t (an index into the
model's ``NoiseSchedule``) to the next, less noisy level s, and draws

    x_s = mean(x_t, prediction) + std * z,    z ~ N(0, I),

so its log-density under any network is a Gaussian one. Two forms, one per parameterisation:

* epsilon / v_prediction (DDPM tables): the DDIM step with ``eta`` > 0 (Song et al. 2021, eq. 12).
  With x0_hat and eps_hat the prediction's clean sample and noise at (x_t, t),
      std^2 = eta^2 * (sigma_s^2 / sigma_t^2) * (1 - alpha_t^2 / alpha_s^2),
      mean  = alpha_s * x0_hat + sqrt(sigma_s^2 - std^2) * eps_hat;
  eta = 1 is the DDPM posterior's variance, eta = 0 the deterministic DDIM step.
* flow (x_t = (1 - t) x_0 + t eps, the network predicts v = eps - x_0): the reverse SDE whose
  marginals equal the flow ODE's (Flow-GRPO, Liu et al. 2025, eq. 9), one Euler-Maruyama step of
  size dt = s - t < 0:
      g_t  = a * sqrt(t / (1 - t)),                       a the noise level,
      mean = x_t + [v + g_t^2 / (2 t) * (x_t + (1 - t) v)] * dt,
      std  = g_t * sqrt(-dt).
  At t = 1 the factor t / (1 - t) is infinite; g is then taken at the step's target s, as Flow-GRPO
  takes it at the grid's next sigma. a = 0 is the Euler step of the ODE.

The last step lands on the clean end (alpha = 1, sigma = 0, as the toys' samplers do); there the DDIM
std is 0 (a deterministic step, which no log-density describes), so such a step is never trained.

Log-densities are means over the elements of one sample, not sums: a sum over a 16k-element SD latent
(10^6 for video) makes every ratio exp(+-hundreds), so the PPO clip would fire on every step whatever
its range; the mean keeps a ratio of 1 +- eps meaning "each element's density moved by a factor of at
most 1 +- eps" at every latent size (Flow-GRPO averages too). The KL term is the closed form between
the two Gaussians, which share the std: |mu_theta - mu_ref|^2 / (2 std^2), averaged the same way.
This module imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sdpo.schedules import NoiseSchedule

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class StepGaussian:
    """The density of x_s given x_t: N(mean, std^2 I)."""

    mean: Tensor
    """(B, ...) like x_t."""
    std: Tensor
    """(B, 1, ...): one std per sample, broadcast over its elements."""


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or (B,) tensor shaped to broadcast over ``like`` (B, ...), in its dtype."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape((like.shape[0],) + (1,) * (like.ndim - 1))


def ddim_step(x_t: Tensor, x0_hat: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
              sigma_s: Tensor, eta: float | Tensor) -> StepGaussian:
    """The DDIM step t -> s with ``eta`` from a clean-sample estimate (epsilon and v models).

    The noise estimate is recomputed from x0_hat, as diffusers' DDIM does after clipping, so a
    clipped estimate moves the mean consistently. ``alpha_*`` / ``sigma_*`` / ``eta``: scalars or (B,).
    """
    if bool((torch.as_tensor(eta) < 0).any()):
        raise ValueError(f"eta must be >= 0, got {eta}")
    a_t, s_t, a_s, s_s, eta_ = (_per_sample(v, x_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s, eta))
    eps_hat = (x_t - a_t * x0_hat) / s_t
    variance = (eta_**2) * (s_s**2 / s_t**2) * (1.0 - a_t**2 / a_s**2)
    variance = variance.clamp_min(0.0)
    direction = (s_s**2 - variance).clamp_min(0.0).sqrt()
    return StepGaussian(mean=a_s * x0_hat + direction * eps_hat, std=variance.sqrt())


def flow_sde_step(x_t: Tensor, velocity: Tensor, t: Tensor, s: Tensor, noise_level: float | Tensor) -> StepGaussian:
    """Flow-GRPO's marginal-preserving SDE step t -> s (t, s the flow's sigmas, s < t; each, and the noise
    level, a scalar or (B,))."""
    if bool((torch.as_tensor(noise_level) < 0).any()):
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    t_, s_, a = _per_sample(t, x_t), _per_sample(s, x_t), _per_sample(noise_level, x_t)
    # g at t = 1 is infinite: take it at the target s there (Flow-GRPO uses the next grid sigma).
    level = torch.where(t_ < 1.0, t_, s_)
    g_squared = a**2 * level / (1.0 - level)
    dt = s_ - t_
    drift = velocity + g_squared / (2.0 * t_) * (x_t + (1.0 - t_) * velocity)
    return StepGaussian(mean=x_t + drift * dt, std=(g_squared * (-dt).clamp_min(0.0)).sqrt())


def reverse_step(schedule: NoiseSchedule, x_t: Tensor, prediction: Tensor, t: Tensor, alpha_s: Tensor,
                 sigma_s: Tensor, noise_level: float | Tensor) -> StepGaussian:
    """The stochastic step from level index ``t`` (B,) to a target (alpha_s, sigma_s) (B,), per the
    schedule's parameterisation; ``noise_level`` is eta (DDIM) or a (flow)."""
    if schedule.prediction_type == "flow":
        return flow_sde_step(x_t, prediction, schedule.sigma(t).to(x_t.device), sigma_s, noise_level)
    x0_hat = schedule.x0_from_prediction(x_t, prediction, t)
    return ddim_step(x_t, x0_hat, schedule.alpha(t).to(x_t.device), schedule.sigma(t).to(x_t.device),
                     alpha_s, sigma_s, noise_level)


def gaussian_log_prob(x: Tensor, step: StepGaussian) -> Tensor:
    """Per-sample log N(x; mean, std^2 I), averaged over the elements (see the module doc), shape (B,)."""
    std = step.std
    per_element = -((x - step.mean) ** 2) / (2.0 * std**2) - std.log() - LOG_SQRT_2PI
    return per_element.flatten(1).mean(dim=1)


def gaussian_kl(policy: StepGaussian, reference: StepGaussian) -> Tensor:
    """KL(policy || reference) per element, averaged per sample (B,), for two Gaussians of one std."""
    return ((policy.mean - reference.mean) ** 2 / (2.0 * policy.std**2)).flatten(1).mean(dim=1)


def sampling_levels(schedule: NoiseSchedule, num_inference_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The levels of a sampler with ``num_inference_steps`` steps: (t, alpha_s, sigma_s), each (K,).

    ``trailing`` spacing (diffusers' name): t_i = round(T - i T / K) - 1, so the first step starts at
    the noisiest training level; step i goes to level t_{i+1}, the last one to the clean end
    (alpha = 1, sigma = 0). The targets are float64.
    """
    total = schedule.num_timesteps
    if not 1 <= num_inference_steps <= total:
        raise ValueError(f"num_inference_steps must be in 1..{total}, got {num_inference_steps}")
    levels = torch.round(torch.arange(total, 0, -total / num_inference_steps, dtype=torch.float64)).long() - 1
    levels = levels[:num_inference_steps]
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    alpha_s = torch.cat([schedule.alpha(levels[1:]), one])
    sigma_s = torch.cat([schedule.sigma(levels[1:]), zero])
    return levels, alpha_s, sigma_s


__all__ = ["StepGaussian", "ddim_step", "flow_sde_step", "gaussian_kl", "gaussian_log_prob", "reverse_step",
           "sampling_levels"]
