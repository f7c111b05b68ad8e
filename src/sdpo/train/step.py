"""One preference step on a batch of pairs (``preference_step``), or on a batch of labelled samples
(``sample_step``, Diffusion-KTO): family-agnostic, it knows only the ModelSpec protocol."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sdpo.data.batch import PairBatch, SampleBatch
from sdpo.errors import InputError
from sdpo.importance import log_importance_weight, log_relative_weight
from sdpo.kto_mapo import kto_loss, mapo_loss
from sdpo.models.base import ModelSpec, unwrap
from sdpo.objectives import MethodConfig, PreferenceOutput, preference_loss, safeguard_scale
from sdpo.seeding import mix_seed

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer


@dataclass
class StepDraws:
    """The random draws of one step, one row per pair (shared by winner and loser)."""

    timesteps: Tensor
    """Training timestep index per pair, shape (B,)."""
    noise: Tensor
    """Forward-process noise per pair, the latents' shape."""
    weight_noise: Tensor | None = None
    """Standard-normal draw for the sampled importance estimator (None otherwise)."""


@dataclass
class StepResult:
    """The loss to back-propagate and what to log about the step."""

    output: PreferenceOutput
    """Loss, per-pair logits and scalar metrics."""
    timesteps: Tensor
    """Timestep per pair member (winners then losers), shape (2B,); per sample (B,) for ``sample_step``."""
    raw_weights: Tensor
    """Importance weight w per pair member (or sample), no gradient; KTO and MaPO only log them."""
    weights: Tensor
    """Objective weight W per pair member (or sample), no gradient."""


def draw_for_pairs(
    global_indices: Tensor,
    step: int,
    seed: int,
    latent_shape: tuple[int, ...],
    num_timesteps: int,
    t_min: int = 0,
    t_max: int | None = None,
    with_weight_noise: bool = False,
) -> StepDraws:
    """Draw t and noise per pair from (seed, step, the pair's global position in the batch).

    Because nothing depends on which process holds a pair or on earlier steps, one process and
    several processes with the same global batch draw the same values, and a resumed run continues
    exactly where it stopped.
    """
    t_max = num_timesteps - 1 if t_max is None else t_max
    timesteps, noises, weight_noises = [], [], []
    for index in global_indices.tolist():
        generator = torch.Generator().manual_seed(mix_seed(seed, step, index))
        timesteps.append(torch.randint(t_min, t_max + 1, (1,), generator=generator))
        noises.append(torch.randn(latent_shape, generator=generator))
        if with_weight_noise:
            weight_noises.append(torch.randn(latent_shape, generator=generator))
    return StepDraws(
        timesteps=torch.cat(timesteps),
        noise=torch.stack(noises),
        weight_noise=torch.stack(weight_noises) if with_weight_noise else None,
    )


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base network of a LoRA model: the reference, with no second copy in memory.

    Switches the adapted layers themselves, as diffusers' ``disable_adapters`` does, but from a list
    found once per model: diffusers walks every module on each call, which on a small network costs
    about 6% of a preference step."""
    inner = unwrap(model)
    layers = _TUNER_LAYERS.get(inner)
    if layers is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = _TUNER_LAYERS[inner] = [m for m in inner.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise InputError("the model has no LoRA adapters to disable: the reference needs adapters or a frozen copy")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield inner
    finally:
        for layer in layers:
            layer.enable_adapters(True)


_TUNER_LAYERS: weakref.WeakKeyDictionary[nn.Module, list[BaseTunerLayer]] = weakref.WeakKeyDictionary()
"""Each LoRA model's adapted layers (adapters are added once, before training starts)."""


def preference_step(
    spec: ModelSpec,
    model: nn.Module,
    batch: PairBatch,
    draws: StepDraws,
    method: MethodConfig,
    reference: Callable[[], contextlib.AbstractContextManager[nn.Module]],
    pair_weights: Tensor | None = None,
) -> StepResult:
    """Forward policy and reference on winners and losers, weight the members, return the loss.

    ``batch`` holds the pairs on the model's device; ``reference()`` is a context manager yielding the frozen reference network.
    ``pair_weights`` (B,): a per-pair factor on the preference loss (``pair_weighting``), None for 1.
    A reference-free method (``method.needs_reference`` false: MaPO) runs no reference forward at all.
    """
    schedule = spec.schedule
    chosen, rejected = batch.chosen, batch.rejected
    device = chosen.device
    pairs = chosen.shape[0]
    x0 = torch.cat([chosen, rejected]).float()
    t = torch.cat([draws.timesteps, draws.timesteps]).to(device)
    noise = torch.cat([draws.noise, draws.noise]).to(device, x0.dtype)
    weight_noise = None if draws.weight_noise is None else torch.cat([draws.weight_noise, draws.weight_noise])
    conditions = {key: torch.cat([value, value]) for key, value in batch.conditions.items()}
    forward = _forward(spec, model, x0, noise, t, conditions, reference if method.needs_reference else None)
    raw_weights, weights = _member_weights(spec, method, x0, forward, t, weight_noise)
    error = forward.error
    if method.name == "mapo":
        scale = method.mapo_margin_scale or float(schedule.num_timesteps)
        output = mapo_loss(error[:pairs], error[pairs:], method.beta, method.mapo_snr, scale)
        return StepResult(output=output, timesteps=t, raw_weights=raw_weights, weights=weights)
    if forward.reference_error is None:
        raise RuntimeError(f"method {method.name} needs the reference's errors")
    loser_scale = None
    if method.safeguard:
        residual = (forward.prediction.detach() - forward.target).flatten(1)
        loser_scale = safeguard_scale(residual[:pairs], residual[pairs:], weights[:pairs], weights[pairs:])
    output = preference_loss(
        error[:pairs],
        error[pairs:],
        forward.reference_error[:pairs],
        forward.reference_error[pairs:],
        method.beta,
        weights[:pairs],
        weights[pairs:],
        loser_scale=loser_scale,
        sft_weight=method.sft_weight,
        pair_weights=pair_weights,
    )
    return StepResult(output=output, timesteps=t, raw_weights=raw_weights, weights=weights)


def sample_step(
    spec: ModelSpec,
    model: nn.Module,
    batch: SampleBatch,
    draws: StepDraws,
    method: MethodConfig,
    reference: Callable[[], contextlib.AbstractContextManager[nn.Module]],
) -> StepResult:
    """Diffusion-KTO on a batch of labelled samples: policy and reference forward on each sample, one
    timestep and noise per sample (``draws`` has one row per sample), the KTO loss.

    z_ref is this micro-batch's estimate on this process (the official code averages it over processes)."""
    if method.name != "kto":
        raise InputError(f"method {method.name} trains on pairs; a cache of labelled samples trains method kto")
    x0 = batch.latents.float()
    device = x0.device
    t = draws.timesteps.to(device)
    noise = draws.noise.to(device, x0.dtype)
    forward = _forward(spec, model, x0, noise, t, batch.conditions, reference)
    raw_weights, weights = _member_weights(spec, method, x0, forward, t, draws.weight_noise)
    if forward.reference_error is None:
        raise RuntimeError("kto needs the reference's errors")
    output = kto_loss(forward.error, forward.reference_error, batch.desirable.to(device), method.beta,
                      method.kto_desirable_weight, method.kto_undesirable_weight)
    return StepResult(output=output, timesteps=t, raw_weights=raw_weights, weights=weights)


@dataclass
class _Forward:
    noisy: Tensor
    target: Tensor
    prediction: Tensor
    error: Tensor
    reference_prediction: Tensor | None
    reference_error: Tensor | None


def _forward(spec: ModelSpec, model: nn.Module, x0: Tensor, noise: Tensor, t: Tensor, conditions: dict[str, Tensor],
             reference: Callable[[], contextlib.AbstractContextManager[nn.Module]] | None) -> _Forward:
    """Noise ``x0`` at ``t``, predict with the policy (and the reference unless ``reference`` is None)."""
    schedule = spec.schedule
    noisy = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    model_timesteps = schedule.model_timestep(t).to(device=x0.device, dtype=torch.float32)
    prediction = spec.predict(model, noisy, model_timesteps, conditions).float()
    error = (prediction - target).square().flatten(1).mean(1)
    reference_prediction = reference_error = None
    if reference is not None:
        with torch.no_grad(), reference() as reference_model:
            reference_prediction = spec.predict(reference_model, noisy, model_timesteps, conditions).float()
        reference_error = (reference_prediction - target).square().flatten(1).mean(1)
    return _Forward(noisy, target, prediction, error, reference_prediction, reference_error)


def _member_weights(spec: ModelSpec, method: MethodConfig, x0: Tensor, forward: _Forward, t: Tensor,
                    weight_noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """Raw importance weights w of every row and the objective weights W (``method.transform``), no gradient."""
    schedule = spec.schedule
    with torch.no_grad():
        x0_hat = schedule.x0_from_prediction(forward.noisy, forward.prediction.detach(), t)
        previous = schedule.previous_timestep(t, method.num_inference_steps)
        noise = None
        if method.estimator == "sampled" and weight_noise is not None:
            noise = weight_noise.to(x0.device, x0.dtype)
        if method.estimator == "relative":
            if forward.reference_prediction is None:
                raise InputError('the "relative" estimator needs the reference, and this method runs none')
            x0_hat_ref = schedule.x0_from_prediction(forward.noisy, forward.reference_prediction, t)
            log_w = log_relative_weight(schedule, x0, x0_hat, x0_hat_ref, t, previous)
        else:
            log_w = log_importance_weight(schedule, x0, x0_hat, t, previous, noise=noise)
        raw_weights = log_w.exp()
        return raw_weights, method.transform(raw_weights)
