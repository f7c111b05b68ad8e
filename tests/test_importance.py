"""Step-wise importance weights against the Gaussian densities they are defined by (float64)."""

import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from sdpo.importance import log_importance_weight, log_relative_weight
from sdpo.schedules import NoiseSchedule

SCHEDULES = {
    "sd-epsilon": lambda: NoiseSchedule.from_scheduler(DDPMScheduler()),
    "cogvideox-v": lambda: NoiseSchedule.from_scheduler(
        CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ),
    "wan-flow": lambda: NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0)),
}


@pytest.fixture(params=list(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]()


def _posterior(schedule, x0, x_t, t, s):
    """mu and var of q(x_s | x_t, x_0), written out from docs/concepts/method.md section 3."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a_t, a_s = schedule.alpha(t).reshape(shape), schedule.alpha(s).reshape(shape)
    s_t, s_s = schedule.sigma(t).reshape(shape), schedule.sigma(s).reshape(shape)
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    mu = (a_ts * s_s**2 / s_t**2) * x_t + (a_s * var_ts / s_t**2) * x0
    var = var_ts * s_s**2 / s_t**2
    return mu, var


def _gauss_logpdf(x, mu, var):
    return -0.5 * (x - mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)


def _setup(schedule, seed=0, n=5, shape=(2, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn((n, *shape), generator=g, dtype=torch.float64)
    eps = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    t = torch.tensor([21, 60, 300, 700, 998])[:n]
    s = schedule.previous_timestep(t, 50)
    x_t = schedule.add_noise(x0, eps, t)
    return x0, x0_hat, x_t, t, s, g


def test_sampled_estimator_equals_log_density_ratio(schedule):
    x0, x0_hat, x_t, t, s, g = _setup(schedule)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    mu_q, var = _posterior(schedule, x0, x_t, t, s)
    mu_p, _ = _posterior(schedule, x0_hat, x_t, t, s)
    x_s = mu_q + var.sqrt() * z
    reference = (_gauss_logpdf(x_s, mu_p, var) - _gauss_logpdf(x_s, mu_q, var)).flatten(1).mean(1)
    ours = log_importance_weight(schedule, x0, x0_hat, t, s, noise=z)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


def test_expected_estimator_is_minus_kl(schedule):
    x0, x0_hat, x_t, t, s, _ = _setup(schedule)
    mu_q, var = _posterior(schedule, x0, x_t, t, s)
    mu_p, _ = _posterior(schedule, x0_hat, x_t, t, s)
    kl = ((mu_q - mu_p) ** 2 / (2 * var)).flatten(1).mean(1)  # equal variances
    torch.testing.assert_close(log_importance_weight(schedule, x0, x0_hat, t, s), -kl, rtol=1e-9, atol=1e-12)


def test_expected_equals_monte_carlo_mean_of_sampled(schedule):
    x0, x0_hat, _, t, s, g = _setup(schedule, n=4, shape=(4,))
    draws = 20000
    z = torch.randn((draws, *x0.shape), generator=g, dtype=torch.float64)
    n = x0.shape[0]
    flat = log_importance_weight(  # every draw as its own row of one batch
        schedule, x0.repeat(draws, 1), x0_hat.repeat(draws, 1), t.repeat(draws), s.repeat(draws),
        noise=z.reshape(draws * n, -1),
    )
    sampled = flat.reshape(draws, n)
    mean, stderr = sampled.mean(0), sampled.std(0) / math.sqrt(draws)
    expected = log_importance_weight(schedule, x0, x0_hat, t, s)
    assert bool(((mean - expected).abs() <= 5 * stderr + 1e-12).all()), (mean, expected, stderr)


def test_weight_is_one_for_a_perfect_model_and_at_zero_length_steps(schedule):
    x0, x0_hat, _, t, s, g = _setup(schedule)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    assert log_importance_weight(schedule, x0, x0, t, s).abs().max() == 0
    assert log_importance_weight(schedule, x0, x0, t, s, noise=z).abs().max() == 0
    zero = torch.zeros(5, dtype=torch.long)
    assert log_importance_weight(schedule, x0, x0_hat, zero, zero).abs().max() == 0


def test_finite_on_the_whole_grid_including_both_ends(schedule):
    t = torch.arange(1000)
    s = schedule.previous_timestep(t, 50)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((1000, 8), generator=g, dtype=torch.float64)
    x0_hat = x0 + torch.randn((1000, 8), generator=g, dtype=torch.float64)
    z = torch.randn((1000, 8), generator=g, dtype=torch.float64)
    for noise in (None, z):
        log_w = log_importance_weight(schedule, x0, x0_hat, t, s, noise=noise)
        assert bool(torch.isfinite(log_w).all())
    assert bool((log_importance_weight(schedule, x0, x0_hat, t, s) <= 0).all())


def test_no_gradient_flows():
    schedule = SCHEDULES["sd-epsilon"]()
    x0 = torch.randn(2, 4, dtype=torch.float64)
    x0_hat = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([100, 500])
    out = log_importance_weight(schedule, x0, x0_hat, t, schedule.previous_timestep(t, 50))
    assert not out.requires_grad


def test_sd_coefficient_matches_worked_check():
    """docs/concepts/method.md: with SD's linear betas and K = 50 the coefficient is 31 at t = 20, 0.28 at t = 100."""
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(beta_start=1e-4, beta_end=0.02))
    # In epsilon terms log w = -1/2 (SNR(s)/SNR(t) - 1) mean (eps - eps_hat)^2; unit eps error:
    for t_value, coefficient in [(20, 31.0), (60, 0.55), (100, 0.28), (999, 0.25)]:
        t = torch.tensor([t_value])
        s = schedule.previous_timestep(t, 50)
        eps_err = torch.ones(1, 16, dtype=torch.float64)
        x0_err = schedule.sigma(t).reshape(-1, 1) / schedule.alpha(t).reshape(-1, 1) * eps_err
        log_w = log_importance_weight(schedule, x0_err, torch.zeros_like(x0_err), t, s)
        assert -log_w.item() == pytest.approx(coefficient, rel=0.05)


def test_relative_weight_is_one_at_policy_equals_reference(schedule):
    x0, x0_hat, _, t, s, g = _setup(schedule)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    assert log_relative_weight(schedule, x0, x0_hat, x0_hat, t, s).abs().max() == 0
    assert log_relative_weight(schedule, x0, x0_hat, x0_hat, t, s, noise=z).abs().max() == 0
    better = x0 + 0.5 * (x0_hat - x0)
    assert bool((log_relative_weight(schedule, x0, better, x0_hat, t, s) >= 0).all())


def test_bad_shapes_are_named():
    schedule = SCHEDULES["sd-epsilon"]()
    t = torch.tensor([10, 20])
    with pytest.raises(ValueError, match="shapes differ"):
        log_importance_weight(schedule, torch.zeros(2, 3), torch.zeros(2, 4), t, t)
    with pytest.raises(ValueError, match="one timestep per sample"):
        log_importance_weight(schedule, torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="noisier"):
        log_importance_weight(schedule, torch.zeros(2, 3), torch.zeros(2, 3), t, t + 1)
    with pytest.raises(ValueError, match="out of range"):
        log_importance_weight(schedule, torch.zeros(2, 3), torch.zeros(2, 3), t + 990, t)
