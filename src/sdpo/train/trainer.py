"""The accelerate training loop: one process, DDP, DeepSpeed or FSDP, through the same code.

The loop knows the ModelSpec protocol and the precompute cache, never a model family. ``train`` reads as
its phases, each in its own module:

- set-up (``sdpo.train.setup``): accelerator, folder claim / resume point with the config check, cache,
  policy and reference, optimizer; everything that needs no model is checked first;
- one optimizer step (``_optimizer_step``, here): accumulation and the non-finite guard (a step whose
  loss or gradient norm is NaN / inf on any process is skipped by all: no update, logged to
  ``bad_steps.jsonl``; ``max_bad_steps`` in a row checkpoint the last good weights and stop);
- the metrics log (``sdpo.train.metrics``): meter, ``metrics.jsonl``, trackers, progress bar, warnings;
- after-step actions (``_after_step``, here): validation, periodic checkpoint, stop signals;
- finish (``sdpo.train.export``): a checkpoint of the final step, the atomic export, then that
  checkpoint is dropped (kept when the run keeps checkpoints, or when the export fails).

Checkpoints (layout, atomic writes, the run lock) live in ``sdpo.train.checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.data.cache import collate_pairs
from sdpo.errors import InputError
from sdpo.models.base import ModelSpec
from sdpo.train.augment import augment_batch, samples_latents
from sdpo.train.checkpoint import NonFiniteWeightsError, RunLock, latest_checkpoint
from sdpo.train.config import TrainConfig
from sdpo.train.export import ExportError, _finish, export_run
from sdpo.train.metrics import BAD_STEPS_NAME, _MetricsLog, _read_history
from sdpo.train.pair_weights import PairWeights
from sdpo.train.preemption import StopRequests
from sdpo.train.setup import (  # _add_lora: re-exported, tests import it from here
    _accelerator,
    _add_lora,  # noqa: F401
    _already_finished,
    _build_run,
    _check_writable,
    _final_model,
    _open_cache,
    _resume_point,
    _Run,
    _save,
    cast_frozen,
)
from sdpo.train.sharding import clip_gradients, parameters_are_sharded
from sdpo.train.step import draw_for_pairs, preference_step

__all__ = ["ExportError", "GlobalBatchOrder", "NonFiniteWeightsError", "TrainResult", "TrainingDivergedError",
           "cast_frozen", "export_run", "latest_checkpoint", "train"]



@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    """The run folder (LoRA or model, metrics.jsonl, logs/, checkpoints)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Logged metrics, one dict per logging step (what metrics.jsonl holds)."""
    model: nn.Module | None = None
    """The trained denoiser (unwrapped), still in memory for evaluation."""
    stopped_at: int | None = None
    """The step after which a stop signal ended the run early (its checkpoint is saved), or None."""
    stop_signal: str | None = None
    """The signal that stopped this process's run (None if another process received it)."""
    bad_steps: int = 0
    """Steps skipped by the non-finite guard over the whole run (resumes included)."""


class GlobalBatchOrder:
    """Which pairs each process sees: one seeded permutation per epoch, cut into global batches.

    Process r takes rows [r*B, (r+1)*B) of each global batch, so the union over processes is the
    batch a single process with B x world pairs would see.

    ``buckets`` (N,) (a bucketed cache's ``bucket_ids()``; None: one bucket) keeps every global batch
    within one bucket: the epoch's permutation is split by bucket (each bucket's pairs in permutation
    order), each bucket's list is cut into global batches, and the batches run in the order of their
    first pair's place in the permutation, so buckets interleave in proportion to their size. With one
    bucket that is exactly the plain permutation cut in order. A bucket's ragged tail (fewer than a
    global batch; other pairs each epoch) waits for a later epoch, as the single order's tail does. A
    bucket with fewer pairs than one global batch is padded to one by repeating its pairs, so it still
    trains each epoch: padding rather than a smaller batch keeps B pairs on every process and micro-step,
    so the loss is a mean over the same count everywhere and the process count changes nothing.
    """

    def __init__(self, num_pairs: int, per_process: int, world: int, rank: int, seed: int,
                 buckets: Tensor | None = None) -> None:
        if num_pairs < per_process * world:
            raise InputError(
                f"the cache holds {num_pairs} pairs, fewer than one global batch "
                f"({per_process} x {world} processes)"
            )
        if buckets is not None and buckets.shape != (num_pairs,):
            raise InputError(f"buckets must give one bucket per pair ({num_pairs}), got shape {tuple(buckets.shape)}")
        self.num_pairs, self.per_process, self.world, self.rank, self.seed = num_pairs, per_process, world, rank, seed
        self.global_batch = per_process * world
        self.buckets = None if buckets is None else buckets.long()
        counts = [num_pairs] if self.buckets is None else torch.bincount(self.buckets).tolist()
        # The ragged tail of each bucket is dropped; a bucket smaller than one batch is padded to one.
        self.batches_per_epoch = sum(max(1, count // self.global_batch) for count in counts if count)
        self.padded = [index for index, count in enumerate(counts) if 0 < count < self.global_batch]
        """Buckets holding fewer pairs than one global batch (their batch repeats pairs)."""
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_step: int) -> tuple[Tensor, Tensor]:
        """(dataset indices of this process's pairs, their positions in the global batch)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, self._by_bucket(torch.randperm(self.num_pairs, generator=generator))
        start = position * self.global_batch + self.rank * self.per_process
        rows = torch.arange(start, start + self.per_process)
        return self._order[rows], rows - position * self.global_batch

    def _by_bucket(self, permutation: Tensor) -> Tensor:
        """The epoch's global batches laid end to end, each within one bucket (see the class docstring)."""
        if self.buckets is None:
            return permutation
        size, batches = self.global_batch, []
        of_each = self.buckets[permutation]
        for bucket in range(int(of_each.max()) + 1):
            places = (of_each == bucket).nonzero()[:, 0]  # ascending: the bucket's pairs in permutation order
            members = permutation[places]
            if 0 < len(members) < size:
                batches.append((int(places[0]), members.repeat(-(-size // len(members)))[:size]))
            for first in range(0, len(members) - size + 1, size):
                batches.append((int(places[first]), members[first : first + size]))
        batches.sort(key=lambda batch: batch[0])
        return torch.cat([members for _, members in batches])


def _batch_order(dataset: Any, config: TrainConfig, accelerator: Any) -> GlobalBatchOrder:
    """The run's batch order, grouped by bucket when the dataset has buckets (a bucketed CachedPairs)."""
    ids = dataset.bucket_ids() if callable(getattr(dataset, "bucket_ids", None)) else None
    order = GlobalBatchOrder(len(dataset), config.train_batch_size, accelerator.num_processes,
                             accelerator.process_index, config.seed, buckets=ids)
    if order.padded and accelerator.is_main_process:
        sizes = getattr(dataset, "buckets", None)
        named = ", ".join(f"{sizes[i][0]}x{sizes[i][1]}" if sizes else str(i) for i in order.padded)
        warnings.warn(f"bucket(s) {named} hold fewer pairs than one global batch ({order.global_batch}): each "
                      f"epoch their batch repeats some of their pairs", stacklevel=3)
    return order


class TrainingDivergedError(InputError):
    """Too many consecutive non-finite steps; the last good weights are checkpointed."""



@dataclass
class _StepOutcome:
    """One optimizer step: per-micro-step metrics, the gradient norm, and why it was skipped (None: applied)."""

    metrics: list[tuple[dict[str, float], Tensor, Tensor]]
    grad_norm: float
    skipped: str | None
    rows: Tensor
    timesteps: Tensor
    max_loss: float


def train(
    config: TrainConfig,
    spec: ModelSpec | None = None,
    dataset: Any = None,
    resume: str | None = None,
    progress: bool = True,
    on_log: Callable[[int, dict[str, float], nn.Module], None] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune ``spec.denoiser`` on the cached pairs with the configured preference objective.

    Args:
        config: the validated training configuration.
        spec: a loaded ModelSpec; None loads ``config.family`` from ``config.pretrained`` (denoiser
            and scheduler only: training reads latents and embeddings from the cache).
        dataset: pairs as dicts (see ``sdpo.data``); None opens ``config.cache_dir``.
        resume: "latest" (no checkpoint yet: a fresh start, with a note) or a checkpoint folder.
        progress: show a progress bar on the main process.
        on_log: called on the main process after each logging step with (step, metrics, model).
        overwrite: start afresh in an output folder that already holds a run (its checkpoints and
            metrics are deleted); without it, and without ``resume``, such a folder is refused.

    Everything that needs no model is checked first (folder, lock, checkpoint, config, cache).
    """
    output_dir = Path(config.output_dir)
    _check_writable(output_dir)
    accelerator = _accelerator(config, output_dir)
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(RunLock(output_dir))
        final_step = _already_finished(output_dir, config, resume)
        if final_step is not None:
            return TrainResult(output_dir=output_dir, history=_read_history(output_dir / "metrics.jsonl", final_step))
        start = _resume_point(output_dir, resume, config, overwrite, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if dataset is None and start.step < config.max_steps:
            dataset = _open_cache(config)
        # Before the model loads: a cache without the gaps pair_weighting needs is a one-line error.
        pair_weights = None if dataset is None else PairWeights.from_dataset(
            config.pair_weighting, dataset, str(getattr(dataset, "cache_dir", None) or config.cache_dir or "the dataset"))
        # Likewise latent_sampling=sample on a cache without stds.
        sample_latents = dataset is not None and samples_latents(config.latent_sampling, dataset)
        run = _build_run(config, spec, dataset, accelerator, output_dir, start)
        run.pair_weights, run.sample_latents = pair_weights, sample_latents
        if dataset is not None:
            run.order = _batch_order(dataset, config, accelerator)
        return _train_loop(run, progress, on_log)
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


def _train_loop(run: _Run, progress: bool, on_log: Callable[..., None] | None) -> TrainResult:
    config, first_step = run.config, run.resume.step
    log = _MetricsLog(run, progress, on_log)
    stopped_at: int | None = None
    with StopRequests() as stops:
        for step in range(first_step, config.max_steps):
            outcome = _optimizer_step(run, step)
            done = step + 1
            _account_for(run, outcome, done)
            log.record(outcome, done)
            if _after_step(run, done, stops):
                stopped_at = done
                break
    log.close()
    if stopped_at is not None:
        run.accelerator.end_training()
        return TrainResult(output_dir=run.output_dir, history=log.history, model=_final_model(run),
                           stopped_at=stopped_at, stop_signal=stops.received, bad_steps=run.bad_steps)
    _finish(run)
    run.accelerator.end_training()
    return TrainResult(output_dir=run.output_dir, history=log.history, model=_final_model(run),
                       bad_steps=run.bad_steps)


def _optimizer_step(run: _Run, step: int) -> _StepOutcome:
    """Forward and backward every micro-batch of one step, then update, unless a loss or the gradient
    norm is non-finite on any process: then the update is skipped (the guard)."""
    config, accelerator = run.config, run.accelerator
    metrics, rows_seen, timesteps_seen = [], [], []
    finite, max_loss, grad_norm, skipped = True, 0.0, None, None
    for micro in range(config.gradient_accumulation_steps):
        micro_step = step * config.gradient_accumulation_steps + micro
        rows, positions = run.order.indices(micro_step)
        # Conditioning follows the frozen weights' dtype: a cache encoded in bf16 then trains in fp32 too.
        batch = collate_pairs([run.dataset[int(i)] for i in rows]).to(accelerator.device, run.weight_dtype)
        pair_weights = None if run.pair_weights is None else run.pair_weights.for_batch(batch.gaps)
        batch = augment_batch(batch, positions, micro_step, config.seed, sample=run.sample_latents, flip=config.flip)
        # The batch's own shape: a bucketed cache's batches differ in size from one micro-step to the next.
        draws = draw_for_pairs(positions, micro_step, config.seed, tuple(batch.chosen.shape[1:]),
                               run.spec.schedule.num_timesteps,
                               config.t_min, config.t_max, config.method.estimator == "sampled")
        with accelerator.accumulate(run.model), accelerator.autocast():
            result = preference_step(run.spec, run.model, batch, draws, config.method, run.reference, pair_weights)
            loss = result.output.loss
            finite = finite and bool(torch.isfinite(loss))
            max_loss = max(max_loss, float(loss.detach()) if finite else math.inf)
            accelerator.backward(loss)  # even a non-finite one: DDP's backward is collective
            if accelerator.sync_gradients:
                grad_norm = clip_gradients(accelerator, run.params, config.max_grad_norm)
                skipped = _skip_reason(accelerator, finite, grad_norm)
                if skipped is None or accelerator.scaler is not None:  # fp16's scaler skips inf itself
                    run.optimizer.step()
                    run.lr_scheduler.step()
                if skipped is None and run.ema is not None:  # a skipped step left the weights alone
                    run.ema.step(run.params)
                run.optimizer.zero_grad(set_to_none=True)
        metrics.append(({k: v.item() for k, v in result.output.metrics.items()}, result.timesteps,
                        result.raw_weights))
        rows_seen.append(rows)
        timesteps_seen.append(draws.timesteps)
    norm = math.nan if grad_norm is None else float(grad_norm)
    return _StepOutcome(metrics=metrics, grad_norm=norm, skipped=skipped, rows=torch.cat(rows_seen),
                        timesteps=torch.cat(timesteps_seen), max_loss=max_loss)


def _skip_reason(accelerator: Any, finite_loss: bool, grad_norm: Tensor | None) -> str | None:
    """Why this step must not update (None: it may), agreed by every process."""
    finite_norm = grad_norm is None or bool(torch.isfinite(grad_norm))  # None: DeepSpeed did not say
    if accelerator.num_processes > 1:
        flags = torch.tensor([float(not finite_loss), float(not finite_norm)], device=accelerator.device)
        total = accelerator.reduce(flags, reduction="sum").cpu()
        finite_loss, finite_norm = bool(total[0] == 0), bool(total[1] == 0)
    if not finite_loss:
        return "non-finite loss"
    if not finite_norm:
        return f"non-finite gradient norm ({float(grad_norm)})"
    return None


def _account_for(run: _Run, outcome: _StepOutcome, done: int) -> None:
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
        warnings.warn(f"step {done} skipped ({outcome.skipped}; pairs {rows.tolist()[:8]} at timesteps "
                      f"{timesteps.tolist()[:8]}): no update, see {BAD_STEPS_NAME}", stacklevel=2)
    if run.consecutive_bad >= run.config.max_bad_steps:
        _stop_diverged(run, done)


def _stop_diverged(run: _Run, done: int) -> None:
    """Save the last good weights (skipped steps never changed them) and end the run with one line."""
    try:
        where = _save(run, done).name
    except NonFiniteWeightsError:
        latest = latest_checkpoint(run.output_dir)
        where = latest.name if latest is not None else "no checkpoint"
    run.accelerator.end_training()
    raise TrainingDivergedError(
        f"{run.consecutive_bad} consecutive steps up to step {done} had a non-finite loss or gradient "
        f"(max_bad_steps={run.config.max_bad_steps}; pairs and timesteps in {run.output_dir / BAD_STEPS_NAME}); "
        f"last good weights: {run.output_dir / where}. Lower learning_rate or method.beta, or use bf16 not fp16"
    )


def _after_step(run: _Run, done: int, stops: StopRequests) -> bool:
    """Validation samples, a periodic checkpoint, and the stop signals; True when the run must stop now."""
    config, accelerator = run.config, run.accelerator
    validate_now = config.validation_every and done % config.validation_every == 0
    # A sharded model's forward is collective, so then every process samples and the main one writes.
    samples_here = run.main or parameters_are_sharded(accelerator)
    if config.validation_prompts and samples_here and (validate_now or done == config.max_steps):
        from sdpo.train.validation import write_validation_samples

        write_validation_samples(run.spec, run.model, list(config.validation_prompts),
                                 run.output_dir / "validation" / f"step-{done:06d}",
                                 config.validation_inference_steps, config.seed, write=run.main,
                                 guidance_scale=config.validation_guidance_scale)
    saved = bool(config.checkpoint_every) and done % config.checkpoint_every == 0 and done < config.max_steps
    if saved:
        _save(run, done)
    if done < config.max_steps and stops.agreed(accelerator):
        if not saved:
            _save(run, done)
        return True
    return False
