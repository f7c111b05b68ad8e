"""The stochastic sampler of online RL: any ModelSpec, its trajectories recorded for the update.

``rollout`` samples a batch from its initial noise with the reverse steps of ``sdpo.rl.sde`` (DDIM with
eta for epsilon / v models, Flow-GRPO's SDE for flow models) and classifier-free guidance against the
empty prompt, as the families sample. Each trajectory keeps what the update needs: at each of its
trained steps the latents before (x_t) and after (x_s) and log p_old(x_s | x_t). The step noise of
candidate c is drawn from its own seeded generator per step, so batching, sharding and resuming never
change a trajectory. ``step_log_prob`` is the one computation of a step's log-density: the rollout
records it, the update recomputes it with gradient, so at the sampling policy their ratio is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.models.base import ModelSpec
from sdpo.rl.sde import StepGaussian, gaussian_log_prob, reverse_step, sampling_levels
from sdpo.schedules import NoiseSchedule
from sdpo.seeding import mix_seed

StepSelection = Literal["window", "random"]
"""Which steps of a trajectory are trained (``RolloutSettings.select``)."""
STEP_SELECTIONS: tuple[str, ...] = get_args(StepSelection)
NoiseSteps = Literal["all", "trained"]
"""Which steps add noise (``RolloutSettings.noise_steps``)."""
NOISE_STEPS: tuple[str, ...] = get_args(NoiseSteps)
STEP_NOISE_SALT = 0x5D1
"""Keeps the step-noise streams apart from any other use of a candidate's seed."""


@dataclass(frozen=True)
class RolloutSettings:
    """How trajectories are sampled and which of their steps are trained."""

    num_inference_steps: int = 10
    """Sampler steps K."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale, in sampling and in the update (1: no guidance, one forward)."""
    noise_level: float = 0.7
    """eta of the DDIM step (epsilon / v models; 1 is DDPM's variance) or a of the flow SDE (flow models)."""
    select: StepSelection = "window"
    """"window": the ``train_steps`` steps from ``window_start`` on (Flow-GRPO-Fast's choice); "random":
    ``train_steps`` steps drawn per trajectory from its seed (DanceGRPO's)."""
    train_steps: int = 2
    """How many steps of each trajectory are trained (the update costs K candidates x this many forwards)."""
    window_start: int = 0
    """First trained step of the window (0: the noisiest)."""
    noise_steps: NoiseSteps = "all"
    """"all": every step is stochastic; "trained": only the trained steps are, the others are the
    deterministic step (eta / a = 0), which puts all exploration where the gradient goes."""

    def __post_init__(self) -> None:
        if self.select not in STEP_SELECTIONS:
            raise ValueError(f"select must be one of {STEP_SELECTIONS}, got {self.select!r}")
        if self.noise_steps not in NOISE_STEPS:
            raise ValueError(f"noise_steps must be one of {NOISE_STEPS}, got {self.noise_steps!r}")
        if not self.noise_level > 0:
            raise ValueError(f"noise_level must be positive (0 is a deterministic sampler), got {self.noise_level}")
        if self.num_inference_steps < 1 or self.train_steps < 1 or self.window_start < 0:
            raise ValueError("num_inference_steps and train_steps must be positive, window_start >= 0")

    def stochastic_steps(self, prediction_type: str) -> int:
        """How many steps can be trained: all K for a flow model; K - 1 for DDIM, whose last step (to the
        clean end) has std 0."""
        return self.num_inference_steps - (0 if prediction_type == "flow" else 1)

    def check(self, prediction_type: str) -> None:
        """Refuse (InputError, one line) a selection that the model's sampler cannot train."""
        usable = self.stochastic_steps(prediction_type)
        last = self.window_start + self.train_steps if self.select == "window" else self.train_steps
        if last > usable:
            raise InputError(
                f"{self.select} selection needs {last} stochastic steps, the {self.num_inference_steps}-step "
                f"sampler of a {prediction_type} model has {usable} (its last DDIM step is deterministic)"
                if prediction_type != "flow" else f"{self.select} selection needs {last} steps, the sampler has {usable}")

    def gradient_free_steps(self, schedule: NoiseSchedule) -> list[int]:
        """Sampler steps whose mean cannot move: an epsilon model clipping its x0 estimate at a level with alpha
        near 0 (a near-zero-terminal-SNR schedule) gets x0 at the clip bound, whatever the network says."""
        if schedule.prediction_type != "epsilon" or schedule.clip_sample_range is None:
            return []
        levels, _, _ = sampling_levels(schedule, self.num_inference_steps)
        return [i for i, level in enumerate(levels.tolist()) if float(schedule.alphas[level]) < 1e-3]

    def trained(self, prediction_type: str, seed: int) -> list[int]:
        """The trained step indices of the trajectory of candidate seed ``seed``, ascending."""
        self.check(prediction_type)
        if self.select == "window":
            return list(range(self.window_start, self.window_start + self.train_steps))
        generator = torch.Generator().manual_seed(mix_seed(seed, STEP_NOISE_SALT + 1, 0))
        picked = torch.randperm(self.stochastic_steps(prediction_type), generator=generator)[: self.train_steps]
        return sorted(picked.tolist())


@dataclass
class Trajectories:
    """A batch of B sampled trajectories, n trained steps each."""

    media: Tensor
    """The decoded samples, float32 CPU in [-1, 1]."""
    steps: Tensor
    """(B, n) int64: which sampler steps were trained."""
    x_t: Tensor
    """(B, n, *latent): the latents entering each trained step (float32, CPU)."""
    x_s: Tensor
    """(B, n, *latent): the latents the step produced."""
    log_prob: Tensor
    """(B, n) float32: log p_old(x_s | x_t), per-element mean (``sdpo.rl.sde``)."""
    noise: Tensor
    """(B, *latent): the initial noise."""

    def tensors(self) -> dict[str, Tensor]:
        """What a trajectories file holds (the media are in the batch file)."""
        return {"steps": self.steps, "x_t": self.x_t, "x_s": self.x_s, "log_prob": self.log_prob, "noise": self.noise}


def _float_like(conditions: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    return {key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
            for key, value in conditions.items()}


def guided_prediction(spec: ModelSpec, model: nn.Module, x: Tensor, level: Tensor, conditions: dict[str, Tensor],
                      empty: dict[str, Tensor], guidance_scale: float) -> Tensor:
    """The network's guided prediction u + w (c - u) at latents x (B, ...), level indices (B,), float32.

    ``conditions``: (B, ...) per sample; ``empty``: the empty prompt's, (1, ...). One batched forward
    over [unconditional; conditional] when guided, as the families' samplers run it.
    """
    model_t = spec.schedule.model_timestep(level).to(device=x.device, dtype=torch.float32)
    if guidance_scale == 1.0:
        return spec.predict(model, x, model_t, conditions).float()
    batch = x.shape[0]
    both = {key: torch.cat([empty[key].expand(batch, *empty[key].shape[1:]), value])
            for key, value in conditions.items()}
    prediction = spec.predict(model, torch.cat([x, x]), torch.cat([model_t, model_t]), both).float()
    unconditional, conditional = prediction.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def step_gaussian(schedule: NoiseSchedule, x_t: Tensor, prediction: Tensor, step: Tensor, num_steps: int,
                  noise_level: Tensor | float) -> StepGaussian:
    """The density of sampler step ``step`` (B,) given x_t and the prediction, in float64."""
    levels, alpha_s, sigma_s = sampling_levels(schedule, num_steps)
    step = step.cpu()
    level = levels[step].to(x_t.device)
    return reverse_step(schedule, x_t.double(), prediction.double(), level, alpha_s[step].to(x_t.device),
                        sigma_s[step].to(x_t.device), noise_level)


def step_log_prob(spec: ModelSpec, model: nn.Module, x_t: Tensor, x_s: Tensor, step: Tensor,
                  conditions: dict[str, Tensor], empty: dict[str, Tensor], settings: RolloutSettings,
                  ) -> tuple[Tensor, StepGaussian]:
    """log p(x_s | x_t) under ``model`` at sampler step ``step`` (B,), and the step's Gaussian: what the
    rollout records and the update recomputes (gradient flows through the mean)."""
    levels, _, _ = sampling_levels(spec.schedule, settings.num_inference_steps)
    prediction = guided_prediction(spec, model, x_t, levels[step.cpu()].to(x_t.device), conditions, empty,
                                   settings.guidance_scale)
    gaussian = step_gaussian(spec.schedule, x_t, prediction, step, settings.num_inference_steps,
                             settings.noise_level)
    return gaussian_log_prob(x_s.double(), gaussian), gaussian


@torch.no_grad()
def rollout(spec: ModelSpec, prompts: Sequence[str], latents: Tensor, seeds: Sequence[int],
            settings: RolloutSettings, model: nn.Module | None = None) -> Trajectories:
    """Sample ``prompts`` from the initial noise ``latents`` (B, *latent) and record the trained steps."""
    decode: Any = getattr(spec, "decode_latents", None)
    if decode is None:
        raise TypeError(f"the {spec.family} spec has no decode_latents: online RL cannot turn its latents into media")
    model = spec.denoiser if model is None else model
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    kind = spec.schedule.prediction_type
    trained = [settings.trained(kind, int(seed)) for seed in seeds]
    conditions = _float_like(spec.encode_prompts(list(prompts)), device, dtype)
    empty = _float_like(spec.encode_prompts([""]), device, dtype)
    was_training = model.training
    model.eval()
    x = latents.to(device=device, dtype=dtype)
    records: dict[str, list[list[Tensor]]] = {"x_t": [[] for _ in seeds], "x_s": [[] for _ in seeds],
                                              "log_prob": [[] for _ in seeds]}
    try:
        for i in range(settings.num_inference_steps):
            noisy = [settings.noise_steps == "all" or i in rows for rows in trained]
            eta = torch.tensor([settings.noise_level if flag else 0.0 for flag in noisy], dtype=torch.float64,
                               device=device)
            step = torch.full((x.shape[0],), i, dtype=torch.long)
            levels, _, _ = sampling_levels(spec.schedule, settings.num_inference_steps)
            prediction = guided_prediction(spec, model, x, levels[step].to(device), conditions, empty,
                                           settings.guidance_scale)
            gaussian = step_gaussian(spec.schedule, x, prediction, step, settings.num_inference_steps, eta)
            z = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
                mix_seed(int(seed), STEP_NOISE_SALT, i))) for seed in seeds]).to(device)
            x_next = (gaussian.mean + gaussian.std * z.double()).to(dtype)
            log_prob = gaussian_log_prob(x_next.double(), gaussian)
            for row, rows in enumerate(trained):
                if i in rows:
                    records["x_t"][row].append(x[row].float().cpu())
                    records["x_s"][row].append(x_next[row].float().cpu())
                    records["log_prob"][row].append(log_prob[row].float().cpu())
            x = x_next
    finally:
        model.train(was_training)
    media = decode(x).clamp(-1.0, 1.0).float().cpu()
    stacked = {key: torch.stack([torch.stack(row) for row in rows]) for key, rows in records.items()}
    return Trajectories(media=media, steps=torch.tensor(trained, dtype=torch.long), noise=latents.float().cpu(),
                        **stacked)


__all__ = ["RolloutSettings", "Trajectories", "guided_prediction", "rollout", "step_log_prob"]
