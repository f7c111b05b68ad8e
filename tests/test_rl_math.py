"""The GRPO math in float64 against closed forms computed here independently (scipy, hand formulas, diffusers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from sdpo.rl.grpo import group_advantages, grpo_loss
from sdpo.rl.sde import (
    StepGaussian,
    ddim_step,
    flow_sde_step,
    gaussian_kl,
    gaussian_log_prob,
    reverse_step,
    sampling_levels,
)
from sdpo.schedules import NoiseSchedule

D = torch.float64


def _ddpm(prediction_type: str = "epsilon") -> NoiseSchedule:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=D)
    return NoiseSchedule.from_alphas_cumprod(torch.cumprod(1 - betas, 0), prediction_type)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_step_matches_the_papers_form_in_abar(eta: float) -> None:
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=D), torch.randn(3, 2, 4, 4, generator=g, dtype=D)
    abar_t, abar_s = 0.3, 0.7
    x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
    alpha_t, sigma_t, alpha_s, sigma_s = (torch.tensor(math.sqrt(v), dtype=D)
                                          for v in (abar_t, 1 - abar_t, abar_s, 1 - abar_s))
    step = ddim_step(x_t, x0, alpha_t, sigma_t, alpha_s, sigma_s, eta)
    # Song et al. (2021) eq. 12 and 16, written in abar.
    sigma = eta * math.sqrt((1 - abar_s) / (1 - abar_t)) * math.sqrt(1 - abar_t / abar_s)
    mean = math.sqrt(abar_s) * x0 + math.sqrt(1 - abar_s - sigma**2) * eps
    torch.testing.assert_close(step.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.std.flatten(), torch.full((3,), sigma, dtype=D), rtol=1e-12, atol=0)
    # With the true x0 and eps, x_s's variance over eps is sigma_s^2 whatever eta: the marginal is kept.
    assert (1 - abar_s - sigma**2) + sigma**2 == pytest.approx(1 - abar_s, rel=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_mean_at_eta_zero_is_diffusers_deterministic_step(prediction_type: str) -> None:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(prediction_type=prediction_type, timestep_spacing="trailing", set_alpha_to_one=True,
                              clip_sample=False)
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    levels, alpha_s, sigma_s = sampling_levels(schedule, 10)
    assert levels.tolist() == scheduler.timesteps.tolist()  # the same trailing grid
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    prediction = torch.randn(2, 4, 8, 8, generator=g)
    for i in (0, 4, 9):  # the first, a middle and the last (to the clean end) step
        t = levels[i].expand(2)
        expected = scheduler.step(prediction, levels[i], x, eta=0.0).prev_sample
        for eta in (0.0, 1e-9):
            step = reverse_step(schedule, x.double(), prediction.double(), t, alpha_s[i], sigma_s[i], eta)
            torch.testing.assert_close(step.mean.float(), expected, rtol=1e-4, atol=1e-5)
    # and with eta > 0, diffusers' stochastic step is our mean plus our std times its noise
    z = torch.randn(2, 4, 8, 8, generator=g)
    noisy = scheduler.step(prediction, levels[4], x, eta=0.8, variance_noise=z).prev_sample
    step = reverse_step(schedule, x.double(), prediction.double(), levels[4].expand(2), alpha_s[4], sigma_s[4], 0.8)
    torch.testing.assert_close((step.mean + step.std * z.double()).float(), noisy, rtol=1e-4, atol=1e-5)


def test_the_last_ddim_step_is_deterministic() -> None:
    schedule = _ddpm()
    levels, alpha_s, sigma_s = sampling_levels(schedule, 4)
    x = torch.randn(2, 3, dtype=D)
    step = reverse_step(schedule, x, x, levels[-1].expand(2), alpha_s[-1], sigma_s[-1], 1.0)
    assert float(step.std.max()) == 0.0 and float(alpha_s[-1]) == 1.0


def test_flow_sde_step_matches_the_hand_form_and_is_euler_at_zero_noise() -> None:
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, 4, generator=g, dtype=D), torch.randn(2, 3, 4, generator=g, dtype=D)
    t, s, a = 0.6, 0.45, 0.7
    step = flow_sde_step(x, v, torch.tensor(t, dtype=D), torch.tensor(s, dtype=D), a)
    # Written the other way round: x (1 + g^2 dt / (2t)) + v (1 + g^2 (1 - t) / (2t)) dt.
    g2, dt = a**2 * t / (1 - t), s - t
    mean = x * (1 + g2 * dt / (2 * t)) + v * (1 + g2 * (1 - t) / (2 * t)) * dt
    torch.testing.assert_close(step.mean, mean, rtol=1e-12, atol=1e-12)
    assert step.std.flatten().tolist() == pytest.approx([math.sqrt(g2 * (t - s))] * 2, rel=1e-12)
    euler = flow_sde_step(x, v, torch.tensor(t, dtype=D), torch.tensor(s, dtype=D), 0.0)
    torch.testing.assert_close(euler.mean, x + v * dt, rtol=0, atol=1e-15)
    assert float(euler.std.max()) == 0.0
    # at t = 1 the noise is taken at the target level (finite), as Flow-GRPO does
    top = flow_sde_step(x, v, torch.tensor(1.0, dtype=D), torch.tensor(0.8, dtype=D), a)
    assert top.std.flatten().tolist() == pytest.approx([math.sqrt(a**2 * 0.8 / 0.2 * 0.2)] * 2, rel=1e-12)


def test_flow_sde_keeps_the_marginals_of_gaussian_data() -> None:
    """x0 ~ N(0, c^2): the exact velocity is linear in x_t, so one step's output variance is closed form; it
    must match the forward marginal at s up to O(dt^2) (a wrong drift sign leaves an O(dt) error)."""
    c, a, t = 0.5, 0.9, 0.7

    def variance(u: float) -> float:
        return (1 - u) ** 2 * c**2 + u**2

    errors = []
    for dt in (0.02, 0.01):
        s = t - dt
        k = (t - (1 - t) * c**2) / variance(t)  # v(x, t) = E[eps - x0 | x_t = x] = k x
        x = torch.ones(1, 1, dtype=D)
        step = flow_sde_step(x, k * x, torch.tensor(t, dtype=D), torch.tensor(s, dtype=D), a)
        m = float(step.mean)  # the mean is m x: variance m^2 V_t + std^2
        errors.append(abs(m**2 * variance(t) + float(step.std) ** 2 - variance(s)))
    assert errors[1] < errors[0] / 3  # second order: halving dt quarters the error


def test_gaussian_log_prob_and_kl_match_closed_forms() -> None:
    g = torch.Generator().manual_seed(3)
    mean, other = torch.randn(3, 2, 5, generator=g, dtype=D), torch.randn(3, 2, 5, generator=g, dtype=D)
    std = torch.tensor([0.3, 1.0, 2.5], dtype=D).reshape(3, 1, 1)
    x = torch.randn(3, 2, 5, generator=g, dtype=D)
    got = gaussian_log_prob(x, StepGaussian(mean, std))
    expected = norm.logpdf(x.numpy(), mean.numpy(), std.numpy()).reshape(3, -1).mean(1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    kl = gaussian_kl(StepGaussian(mean, std), StepGaussian(other, std))
    s1 = s2 = std.numpy()
    general = np.log(s2 / s1) + (s1**2 + (mean.numpy() - other.numpy()) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(kl.numpy(), general.reshape(3, -1).mean(1), rtol=1e-12)


def test_group_advantages_standardise_within_each_prompt() -> None:
    rewards = torch.tensor([1.0, 3.0, 0.5, 0.5, 2.0, -1.0, 4.0], dtype=D)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    got = group_advantages(rewards, groups)
    expected = []
    for values in ([1.0, 3.0], [0.5, 0.5], [2.0, -1.0, 4.0]):
        array = np.array(values)
        spread = array.std()  # population std
        expected += list((array - array.mean()) / spread) if spread > 0 else [0.0] * len(array)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert got[2:4].tolist() == [0.0, 0.0]  # equal rewards: no signal


def test_grpo_loss_is_the_clipped_surrogate_plus_the_kl() -> None:
    old = torch.tensor([-1.0, -1.0, -2.0, -0.5], dtype=D)
    log_prob = (old + torch.tensor([0.0, 0.5, -0.5, 0.1], dtype=D)).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -2.0], dtype=D)
    kl = torch.tensor([0.1, 0.2, 0.0, 0.3], dtype=D, requires_grad=True)
    out = grpo_loss(log_prob, old, advantages, clip_range=0.2, kl=kl, kl_coefficient=0.5)
    terms = []
    for lp, o, adv in zip(log_prob.tolist(), old.tolist(), advantages.tolist(), strict=True):
        ratio = math.exp(lp - o)
        terms.append(max(-adv * ratio, -adv * min(max(ratio, 0.8), 1.2)))
    expected = sum(terms) / 4 + 0.5 * (0.1 + 0.2 + 0.0 + 0.3) / 4
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-12)
    out.loss.backward()
    # a clipped member (ratio e^0.5 > 1.2 with A > 0) passes no gradient; an unclipped one passes -A rho / B
    assert float(log_prob.grad[1]) == 0.0
    assert float(log_prob.grad[0]) == pytest.approx(-1.0 / 4, rel=1e-12)
    assert float(out.metrics["ratio_deviation"]) == pytest.approx(math.exp(0.5) - 1, rel=1e-12)


def test_steps_whose_clipped_mean_cannot_move_are_named() -> None:
    from diffusers import DDPMScheduler

    from sdpo.rl.rollout import RolloutSettings

    settings = RolloutSettings(num_inference_steps=6, train_steps=2)
    cosine = NoiseSchedule.from_scheduler(DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True))
    assert settings.gradient_free_steps(cosine) == [0]  # alpha_999 = 5e-5: x0 / alpha lands on the clip bound
    unclipped = NoiseSchedule.from_scheduler(DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False))
    assert settings.gradient_free_steps(unclipped) == []
    assert settings.gradient_free_steps(_ddpm()) == []
