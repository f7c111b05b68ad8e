"""NoiseSchedule against diffusers' own schedulers, in float64."""

import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from sdpo.schedules import NoiseSchedule

FAMILIES = {  # clip_sample as the released models' scheduler configs set it
    "sd-epsilon": lambda: DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False),
    "sd-v": lambda: DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", clip_sample=False),
    "cogvideox": lambda: CogVideoXDDIMScheduler(
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0, clip_sample=False
    ),
    "wan-flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    scheduler = FAMILIES[request.param]()
    return request.param, scheduler, NoiseSchedule.from_scheduler(scheduler)


def _batch(schedule, n=6, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    noise = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])[:n]
    return x0, noise, t


def test_prediction_types(family):
    name, _, schedule = family
    expected = {"sd-epsilon": "epsilon", "sd-v": "v_prediction", "cogvideox": "v_prediction", "wan-flow": "flow"}
    assert schedule.prediction_type == expected[name]
    assert schedule.num_timesteps == 1000


def test_variance_preserving_or_flow(family):
    name, _, schedule = family
    if name == "wan-flow":
        torch.testing.assert_close(schedule.alphas + schedule.sigmas, torch.ones(1000, dtype=torch.float64))
    else:
        torch.testing.assert_close(schedule.alphas**2 + schedule.sigmas**2, torch.ones(1000, dtype=torch.float64))
    assert bool((schedule.snr(torch.arange(1000))[1:] <= schedule.snr(torch.arange(1000))[:-1]).all())


def test_zero_terminal_snr_end(family):
    name, _, schedule = family
    if name in ("cogvideox", "wan-flow"):
        assert schedule.alpha(torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-12)
        assert schedule.snr(torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-12)


def test_add_noise_matches_diffusers(family):
    name, scheduler, schedule = family
    x0, noise, t = _batch(schedule)
    ours = schedule.add_noise(x0, noise, t)
    if name == "wan-flow":
        # diffusers' flow scheduler indexes sigmas by model timestep (sigma * T)
        theirs = scheduler.scale_noise(x0, schedule.model_timestep(t).to(torch.float32), noise)
        sig = scheduler.sigmas.flip(0)[t].to(torch.float64).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(ours, (1 - sig) * x0 + sig * noise)
        torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-5, rtol=1e-5)
    else:
        theirs = scheduler.add_noise(x0, noise, t)
        torch.testing.assert_close(ours, theirs.to(torch.float64), atol=1e-6, rtol=1e-6)


def test_target_matches_diffusers(family):
    name, scheduler, schedule = family
    x0, noise, t = _batch(schedule)
    ours = schedule.target(x0, noise, t)
    if name.startswith("sd-epsilon"):
        torch.testing.assert_close(ours, noise)
    elif name == "wan-flow":
        torch.testing.assert_close(ours, noise - x0)
    else:
        theirs = scheduler.get_velocity(x0, noise, t) if hasattr(scheduler, "get_velocity") else None
        if theirs is None:  # CogVideoX schedulers have no get_velocity: use DDPM's on the same table
            ddpm = DDPMScheduler(prediction_type="v_prediction")
            ddpm.alphas_cumprod = scheduler.alphas_cumprod
            theirs = ddpm.get_velocity(x0, noise, t)
        torch.testing.assert_close(ours, theirs.to(torch.float64), atol=1e-6, rtol=1e-6)


def test_x0_recovered_from_true_target(family):
    name, _, schedule = family
    x0, noise, t = _batch(schedule)
    if schedule.prediction_type == "epsilon":
        t = t[t < 999]  # alpha_999 is tiny but positive; keep the check tight elsewhere
        x0, noise = x0[: len(t)], noise[: len(t)]
    x_t = schedule.add_noise(x0, noise, t)
    recovered = schedule.x0_from_prediction(x_t, schedule.target(x0, noise, t), t)
    torch.testing.assert_close(recovered, x0, atol=1e-8, rtol=1e-6)


def test_model_timestep(family):
    name, scheduler, schedule = family
    t = torch.tensor([0, 500, 999])
    if name == "wan-flow":
        torch.testing.assert_close(schedule.model_timestep(t), scheduler.timesteps.flip(0)[t].to(torch.float64))
    else:
        torch.testing.assert_close(schedule.model_timestep(t), t.to(torch.float64))


def test_from_scheduler_ignores_set_timesteps():
    scheduler = DDPMScheduler()
    before = NoiseSchedule.from_scheduler(scheduler)
    scheduler.set_timesteps(10)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow_before = NoiseSchedule.from_scheduler(flow)
    flow.set_timesteps(10)
    torch.testing.assert_close(NoiseSchedule.from_scheduler(scheduler).alphas, before.alphas)
    torch.testing.assert_close(NoiseSchedule.from_scheduler(flow).sigmas, flow_before.sigmas)


def test_previous_timestep_and_sampling():
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler())
    t = torch.tensor([0, 5, 20, 21, 999])
    assert schedule.previous_timestep(t, 50).tolist() == [0, 0, 0, 1, 979]
    assert schedule.previous_timestep(t, 1000).tolist() == [0, 4, 19, 20, 998]
    g = torch.Generator().manual_seed(0)
    drawn = schedule.sample_timesteps(4096, generator=g, t_min=100, t_max=199)
    assert int(drawn.min()) == 100 and int(drawn.max()) == 199


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.alpha(torch.tensor([1000])), "out of range"),
        (lambda s: s.alpha(torch.tensor([-1])), "out of range"),
        (lambda s: s.previous_timestep(torch.tensor([3]), 0), "num_inference_steps"),
        (lambda s: s.sample_timesteps(2, t_min=10, t_max=5), "timestep range"),
    ],
)
def test_bad_input_is_named(call, message):
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler())
    with pytest.raises(ValueError, match=message):
        call(schedule)


def test_float_timesteps_rejected():
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler())
    with pytest.raises(TypeError, match="integer"):
        schedule.alpha(torch.tensor([0.5]))


def test_flow_sigma_unipc_is_not_misread_as_ddpm():
    from diffusers import UniPCMultistepScheduler

    from sdpo.models.wan import flow_training_scheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    with pytest.raises(ValueError, match="flow_training_scheduler"):
        NoiseSchedule.from_scheduler(unipc)
    converted = NoiseSchedule.from_scheduler(flow_training_scheduler(unipc))
    reference = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert converted.prediction_type == "flow"
    torch.testing.assert_close(converted.sigmas, reference.sigmas)


def test_a_clipping_sampler_s_estimate_is_what_the_weights_see():
    """With clip_sample the clean-sample estimate is diffusers' own pred_original_sample, clipped; so
    near t = T, where an epsilon model's estimate is its noise error over alpha_T (about 2e4 here), the
    weight stays bounded away from 0 instead of vanishing."""
    from sdpo.importance import log_importance_weight

    scheduler = DDPMScheduler(beta_schedule="linear", clip_sample=True, clip_sample_range=1.0)
    schedule = NoiseSchedule.from_scheduler(scheduler)
    assert schedule.clip_sample_range == 1.0
    assert NoiseSchedule.from_scheduler(DDPMScheduler(clip_sample=False)).clip_sample_range is None
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    for step in (10, 500, 999):
        t = torch.full((3,), step)
        expected = torch.stack([scheduler.step(eps[i:i + 1], step, x_t[i:i + 1]).pred_original_sample[0]
                                for i in range(3)])
        assert torch.allclose(schedule.x0_from_prediction(x_t, eps, t), expected, atol=1e-6)
    t, s = torch.full((3,), 999), torch.full((3,), 959)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x0_hat = schedule.x0_from_prediction(x_t, eps, t)
    floor = -0.5 * float(schedule.snr(s)[0] - schedule.snr(t)[0]) * 4.0  # |x0 - x0_hat| <= 2 per element
    assert bool((log_importance_weight(schedule, x0, x0_hat, t, s) >= floor).all())
    unclipped = NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    assert bool((log_importance_weight(unclipped, x0, unclipped.x0_from_prediction(x_t, eps, t), t, s) < floor).all())
    with pytest.raises(ValueError, match="clip_sample_range must be positive"):
        NoiseSchedule.from_alphas_cumprod(scheduler.alphas_cumprod, clip_sample_range=0.0)
