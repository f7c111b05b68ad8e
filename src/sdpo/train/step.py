"""One preference step on a batch of pairs: family-agnostic, it knows only the ModelSpec protocol."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sdpo.data.batch import PairBatch
from sdpo.errors import InputError
from sdpo.importance import log_importance_weight, log_relative_weight
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
    """Timestep per pair member (winners then losers), shape (2B,)."""
    raw_weights: Tensor
    """Importance weight w per pair member, shape (2B,), no gradient."""
    weights: Tensor
    """Objective weight W per pair member, shape (2B,), no gradient."""


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
    """
    schedule = spec.schedule
    chosen, rejected = batch.chosen, batch.rejected
    device = chosen.device
    pairs = chosen.shape[0]
    x0 = torch.cat([chosen, rejected]).float()
    t = torch.cat([draws.timesteps, draws.timesteps]).to(device)
    noise = torch.cat([draws.noise, draws.noise]).to(device, x0.dtype)
    conditions = {key: torch.cat([value, value]) for key, value in batch.conditions.items()}

    noisy = schedule.add_noise(x0, noise, t)
    target = schedule.target(x0, noise, t)
    model_timesteps = schedule.model_timestep(t).to(device=device, dtype=torch.float32)

    prediction = spec.predict(model, noisy, model_timesteps, conditions).float()
    with torch.no_grad(), reference() as reference_model:
        reference_prediction = spec.predict(reference_model, noisy, model_timesteps, conditions).float()

    error = (prediction - target).square().flatten(1).mean(1)
    reference_error = (reference_prediction - target).square().flatten(1).mean(1)

    with torch.no_grad():
        x0_hat = schedule.x0_from_prediction(noisy, prediction.detach(), t)
        previous = schedule.previous_timestep(t, method.num_inference_steps)
        weight_noise = None
        if method.estimator == "sampled" and draws.weight_noise is not None:
            weight_noise = torch.cat([draws.weight_noise, draws.weight_noise]).to(device, x0.dtype)
        if method.estimator == "relative":
            x0_hat_ref = schedule.x0_from_prediction(noisy, reference_prediction, t)
            log_w = log_relative_weight(schedule, x0, x0_hat, x0_hat_ref, t, previous)
        else:
            log_w = log_importance_weight(schedule, x0, x0_hat, t, previous, noise=weight_noise)
        raw_weights = log_w.exp()
        weights = method.transform(raw_weights)

    loser_scale = None
    if method.safeguard:
        residual = (prediction.detach() - target).flatten(1)
        loser_scale = safeguard_scale(residual[:pairs], residual[pairs:], weights[:pairs], weights[pairs:])
    output = preference_loss(
        error[:pairs],
        error[pairs:],
        reference_error[:pairs],
        reference_error[pairs:],
        method.beta,
        weights[:pairs],
        weights[pairs:],
        loser_scale=loser_scale,
        sft_weight=method.sft_weight,
        pair_weights=pair_weights,
    )
    return StepResult(output=output, timesteps=t, raw_weights=raw_weights, weights=weights)
