"""One optimizer step of a run and its non-finite guard.

``optimizer_step`` runs the forward and backward of every micro-batch (gradient accumulation), clips,
and updates, unless a loss or the gradient norm is NaN / inf on any process: then every process skips
the update (``skip_reason``). ``account_for`` counts a skipped step, logs its pairs and timesteps to
``bad_steps.jsonl``, and after ``max_bad_steps`` in a row checkpoints the last good weights and stops
with ``TrainingDivergedError``. Both work on any objective: the dataset's own micro-step (GRPO's
trajectories), else ``preference_step`` on pairs or ``sample_step`` on Diffusion-KTO's labelled samples.

Under DeepSpeed the update runs inside ``accelerator.backward`` (the engine's step), before the guard
looks: the guard only counts and logs; DeepSpeed skips a step whose gradient norm is not finite itself.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from sdpo.data.cache import collate_pairs, collate_samples
from sdpo.errors import InputError
from sdpo.train.augment import augment_batch
from sdpo.train.checkpoint import NonFiniteWeightsError, latest_checkpoint, save_run
from sdpo.train.log import warn
from sdpo.train.metrics import BAD_STEPS_NAME
from sdpo.train.run import MicroStep, PairDataset, StepOutcome, TrainingRun
from sdpo.train.sharding import clip_gradients, end_run
from sdpo.train.step import draw_for_pairs, preference_step, sample_step

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["TrainingDivergedError", "account_for", "optimizer_step", "cache_micro_step", "skip_reason"]


class TrainingDivergedError(InputError):
    """Too many consecutive non-finite steps; the last good weights are checkpointed."""


def optimizer_step(run: TrainingRun, step: int) -> StepOutcome:
    """Forward and backward every micro-batch of one step, then update, unless a loss or the gradient
    norm is non-finite on any process: then the update is skipped (the guard)."""
    config, accelerator, order, dataset = run.config, run.accelerator, run.order, run.dataset
    if order is None or dataset is None:
        raise RuntimeError("an optimizer step needs the run's pairs; this run was built without a dataset")
    metrics, rows_seen, timesteps_seen = [], [], []
    finite, max_loss, grad_norm, skipped = True, 0.0, None, None
    # The objective's micro-step: a dataset that brings its own (GRPO's trajectories), else the preference step.
    forward = getattr(dataset, "micro_step", None) or cache_micro_step
    for micro in range(config.gradient_accumulation_steps):
        micro_step = step * config.gradient_accumulation_steps + micro
        rows, positions = order.indices(micro_step)
        with accelerator.accumulate(run.model), accelerator.autocast():
            result = forward(run, rows, positions, micro_step)
            loss = result.loss
            finite = finite and bool(torch.isfinite(loss))
            max_loss = max(max_loss, float(loss.detach()) if finite else math.inf)
            accelerator.backward(loss)  # even a non-finite one: DDP's backward is collective
            if accelerator.sync_gradients:
                grad_norm = clip_gradients(accelerator, run.params, config.max_grad_norm)
                skipped = skip_reason(accelerator, finite, grad_norm)
                if skipped is None or accelerator.scaler is not None:  # fp16's scaler skips inf itself
                    run.optimizer.step()
                    run.lr_scheduler.step()
                if skipped is None and run.ema is not None:  # a skipped step left the weights alone
                    run.ema.step(run.params)
                run.optimizer.zero_grad(set_to_none=True)
        metrics.append((result.metrics, result.timesteps, result.raw_weights))
        rows_seen.append(rows)
        timesteps_seen.append(result.drawn)
    norm = math.nan if grad_norm is None else float(grad_norm)
    return StepOutcome(metrics=metrics, grad_norm=norm, skipped=skipped, rows=torch.cat(rows_seen),
                        timesteps=torch.cat(timesteps_seen), max_loss=max_loss)


def cache_micro_step(run: TrainingRun, rows: Tensor, positions: Tensor, micro_step: int) -> MicroStep:
    """The micro-step of a cache's rows: ``preference_step`` on pairs (collated, augmented), or Diffusion-KTO's
    ``sample_step`` on labelled samples (one latent per row: one timestep and noise each, no augmentation)."""
    config, device = run.config, run.accelerator.device
    dataset = cast(PairDataset, run.dataset)  # the dispatch sends only cache datasets (pairs or samples) here
    items: list[Any] = [dataset[int(i)] for i in rows]  # Pair, or Sample for a samples cache
    estimator_noise = config.method.estimator == "sampled"
    num_timesteps = run.spec.schedule.num_timesteps
    if config.method.unpaired:
        samples = collate_samples(items).to(device, run.weight_dtype)
        draws = draw_for_pairs(positions, micro_step, config.seed, tuple(samples.latents.shape[1:]), num_timesteps,
                               config.t_min, config.t_max, estimator_noise)
        result = sample_step(run.spec, run.model, samples, draws, config.method, run.reference)
    else:
        # Conditioning follows the frozen weights' dtype: a cache encoded in bf16 then trains in fp32 too.
        batch = collate_pairs(items).to(device, run.weight_dtype)
        pair_weights = None if run.pair_weights is None else run.pair_weights.for_batch(batch.gaps)
        batch = augment_batch(batch, positions, micro_step, config.seed, sample=run.sample_latents, flip=config.flip)
        # The batch's own shape: a bucketed cache's batches differ in size from one micro-step to the next.
        draws = draw_for_pairs(positions, micro_step, config.seed, tuple(batch.chosen.shape[1:]), num_timesteps,
                               config.t_min, config.t_max, estimator_noise)
        result = preference_step(run.spec, run.model, batch, draws, config.method, run.reference, pair_weights)
    return MicroStep(loss=result.output.loss, metrics={k: v.item() for k, v in result.output.metrics.items()},
                     timesteps=result.timesteps, raw_weights=result.raw_weights, drawn=draws.timesteps)


def skip_reason(accelerator: Accelerator, finite_loss: bool, grad_norm: Tensor | None) -> str | None:
    """Why this step must not update (None: it may), agreed by every process."""
    finite_norm = grad_norm is None or bool(torch.isfinite(grad_norm))  # None: DeepSpeed did not say
    if accelerator.num_processes > 1:
        flags = torch.tensor([float(not finite_loss), float(not finite_norm)], device=accelerator.device)
        total = accelerator.reduce(flags, reduction="sum").cpu()
        finite_loss, finite_norm = bool(total[0] == 0), bool(total[1] == 0)
    if not finite_loss:
        return "non-finite loss"
    if not finite_norm:
        return f"non-finite gradient norm ({math.nan if grad_norm is None else float(grad_norm)})"
    return None


def account_for(run: TrainingRun, outcome: StepOutcome, done: int) -> None:
    """Count a skipped step, log which pairs and timesteps it had, stop after too many in a row."""
    if outcome.skipped is None:
        run.consecutive_bad = 0
        return
    run.bad_steps += 1
    run.consecutive_bad += 1
    rows, timesteps = outcome.rows, outcome.timesteps
    if run.accelerator.num_processes > 1:  # every process is here: they agreed to skip
        rows = run.accelerator.gather(rows.to(run.accelerator.device)).cpu()
        timesteps = run.accelerator.gather(timesteps.to(run.accelerator.device)).cpu()
    if run.main:
        record = {"step": done, "reason": outcome.skipped, "pairs": rows.tolist(), "timesteps": timesteps.tolist()}
        with (run.output_dir / BAD_STEPS_NAME).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        warn(f"step {done} skipped ({outcome.skipped}; pairs {rows.tolist()[:8]} at timesteps "
             f"{timesteps.tolist()[:8]}): no update, see {BAD_STEPS_NAME}", stacklevel=2)
    if run.consecutive_bad >= run.config.max_bad_steps:
        _stop_diverged(run, done)


def _stop_diverged(run: TrainingRun, done: int) -> None:
    """Save the last good weights (skipped steps never changed them) and end the run with one line."""
    try:
        where = save_run(run, done).name
    except NonFiniteWeightsError:
        latest = latest_checkpoint(run.output_dir)
        where = latest.name if latest is not None else "no checkpoint"
    end_run(run.accelerator)
    raise TrainingDivergedError(
        f"{run.consecutive_bad} consecutive steps up to step {done} had a non-finite loss or gradient "
        f"(max_bad_steps={run.config.max_bad_steps}; pairs and timesteps in {run.output_dir / BAD_STEPS_NAME}); "
        f"last good weights: {run.output_dir / where}. Lower learning_rate or method.beta, or use bf16 not fp16"
    )
