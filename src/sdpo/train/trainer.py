"""The accelerate training loop: one process, DDP, DeepSpeed or FSDP, through the same code.

The loop knows the ModelSpec protocol and the precompute cache, never a model family. ``train`` is
cut into pieces, one concern each:

- set-up (``_accelerator``, ``_resume_point`` with the config check, ``_open_cache``, ``_build_run``):
  everything that needs no model (folder, lock, checkpoint, config, cache) is checked first;
- one optimizer step (``_optimizer_step``): accumulation and the non-finite guard (a step whose loss
  or gradient norm is NaN / inf on any process is skipped by all: no update, logged to
  ``bad_steps.jsonl``; ``max_bad_steps`` in a row checkpoint the last good weights and stop);
- the metrics log (``_MetricsLog``): meter, ``metrics.jsonl``, trackers, progress bar, warnings;
- after-step actions (``_after_step``): validation, periodic checkpoint, stop signals;
- finish (``_finish``): a checkpoint of the final step, the atomic export, then that checkpoint
  is dropped (kept when the run keeps checkpoints, or when the export fails).

Checkpoints (layout, atomic writes, the run lock) live in ``sdpo.train.checkpoint``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sdpo.data.cache import collate_pairs
from sdpo.models.base import ModelSpec, unwrap
from sdpo.train.checkpoint import (
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    STATE_NAME,
    NonFiniteWeightsError,
    RunLock,
    checkpoint_step,
    complete_checkpoints,
    fsync_dir,
    latest_checkpoint,
    prune_checkpoints,
    read_state,
    register_trainable_hooks,
    remove_checkpoint,
    save_checkpoint,
    weights_are_finite,
    write_atomic,
)
from sdpo.train.config import TrainConfig
from sdpo.train.preemption import StopRequests
from sdpo.train.sharding import (
    clip_gradients,
    enable_gradient_checkpointing,
    parameters_are_sharded,
    shard_like_policy,
    uses_fsdp,
)
from sdpo.train.step import adapters_disabled, draw_for_pairs, preference_step

TIMESTEP_BUCKETS = 10
MINIMUM_KEY = "weight_min"
BAD_STEPS_NAME = "bad_steps.jsonl"
EXPORT_TMP_NAME = ".export-tmp"
RUN_FILES = frozenset({"metrics.jsonl", BAD_STEPS_NAME, "run_info.json", "train_config.json", "logs", "validation",
                       "pytorch_lora_weights.safetensors", "unet", "transformer", EXPORT_TMP_NAME})
"""What a run writes into its folder (besides checkpoint-N): a folder holding any of them holds a run."""


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
    """

    def __init__(self, num_pairs: int, per_process: int, world: int, rank: int, seed: int) -> None:
        if num_pairs < per_process * world:
            raise ValueError(
                f"the cache holds {num_pairs} pairs, fewer than one global batch "
                f"({per_process} x {world} processes)"
            )
        self.num_pairs, self.per_process, self.world, self.rank, self.seed = num_pairs, per_process, world, rank, seed
        self.global_batch = per_process * world
        self.batches_per_epoch = num_pairs // self.global_batch  # the ragged tail is dropped
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_step: int) -> tuple[Tensor, Tensor]:
        """(dataset indices of this process's pairs, their positions in the global batch)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_pairs, generator=generator)
        start = position * self.global_batch + self.rank * self.per_process
        rows = torch.arange(start, start + self.per_process)
        return self._order[rows], rows - position * self.global_batch


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output folder is not writable: {output_dir} ({error.strerror})") from error


def _add_lora(model: nn.Module, config: TrainConfig, spec: ModelSpec) -> None:
    from peft import LoraConfig

    from sdpo.train.config import resolve_lora_targets

    targets = resolve_lora_targets(config.lora_target_modules, spec.lora_target_modules(), model)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    model.add_adapter(lora)


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


class _IntervalMeter:
    """Sums metrics between logging steps, then reduces them over processes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.minimum = math.inf
        self.count = 0
        self.bucket_sum = torch.zeros(TIMESTEP_BUCKETS, dtype=torch.float64)
        self.bucket_count = torch.zeros(TIMESTEP_BUCKETS, dtype=torch.float64)

    def add(self, metrics: dict[str, float], timesteps: Tensor, raw_weights: Tensor, num_timesteps: int) -> None:
        for key, value in metrics.items():
            if key == MINIMUM_KEY:  # a minimum, not a mean: reduced separately
                self.minimum = min(self.minimum, float(value))
                continue
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1
        buckets = (timesteps.cpu() * TIMESTEP_BUCKETS // num_timesteps).clamp_max(TIMESTEP_BUCKETS - 1)
        self.bucket_sum.index_add_(0, buckets, raw_weights.detach().cpu().double())
        self.bucket_count.index_add_(0, buckets, torch.ones_like(buckets, dtype=torch.float64))

    def flush(self, accelerator: Any, num_timesteps: int) -> dict[str, float]:
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] for k in keys] + [float(self.count)], dtype=torch.float64)
        packed = torch.cat([local, self.bucket_sum, self.bucket_count]).to(accelerator.device)
        total = accelerator.reduce(packed, reduction="sum").cpu()
        count = total[len(keys)].item()
        result = {key: total[i].item() / max(count, 1.0) for i, key in enumerate(keys)}
        sums = total[len(keys) + 1 : len(keys) + 1 + TIMESTEP_BUCKETS]
        counts = total[len(keys) + 1 + TIMESTEP_BUCKETS :]
        width = num_timesteps // TIMESTEP_BUCKETS
        if math.isfinite(self.minimum) or accelerator.num_processes > 1:
            local_min = torch.tensor([self.minimum], dtype=torch.float64, device=accelerator.device)
            minimum = accelerator.gather(local_min).min().item()
            if math.isfinite(minimum):  # inf: no step of the interval counted (all skipped)
                result[MINIMUM_KEY] = minimum
        for b in range(TIMESTEP_BUCKETS):
            if counts[b] > 0:
                result[f"w_by_t/{b * width:04d}-{(b + 1) * width - 1:04d}"] = (sums[b] / counts[b]).item()
        self.__init__()
        return result


LOSS_BOUND = 100.0
"""A loss above this is reported: -log sigmoid(-100), the objective saturated far past any useful step."""


class TrainingDivergedError(ValueError):
    """Too many consecutive non-finite steps; the last good weights are checkpointed."""


class ExportError(ValueError):
    """The final weights could not be written; the checkpoint they come from is kept."""


@dataclass
class _Resume:
    """Where a run starts: a checkpoint (None: step 0) and what changed in the config since it was made."""

    checkpoint: Path | None = None
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    changes: list[Any] = field(default_factory=list)


@dataclass
class _Run:
    """Everything the loop's pieces share, built once by ``_build_run``."""

    config: TrainConfig
    accelerator: Any
    spec: ModelSpec
    dataset: Any
    model: nn.Module
    optimizer: Any
    lr_scheduler: Any
    params: list[nn.Parameter]
    reference: Callable[[], Any]
    weight_dtype: torch.dtype
    output_dir: Path
    resume: _Resume
    order: GlobalBatchOrder | None = None
    sample_shape: tuple[int, ...] = ()
    bad_steps: int = 0
    consecutive_bad: int = 0
    config_changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)


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
        finished = _already_finished(output_dir, config, resume)
        if finished is not None:
            return finished
        start = _resume_point(output_dir, resume, config, overwrite, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if dataset is None and start.step < config.max_steps:
            dataset = _open_cache(config)
        run = _build_run(config, spec, dataset, accelerator, output_dir, start)
        return _train_loop(run, progress, on_log)
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


def _accelerator(config: TrainConfig, output_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    trackers = {"none": None, "all": "all"}.get(config.report_to, config.report_to)
    _forget_other_precision(config.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)
    return accelerator


def _note(text: str, main: bool = True) -> None:
    if main:
        print(f"sdpo: {text}", file=sys.stderr, flush=True)


def _resume_point(output_dir: Path, resume: str | None, config: TrainConfig, overwrite: bool, main: bool) -> _Resume:
    """The checkpoint to start from, its config checked against ``config`` (unsafe changes refused)."""
    if not resume:
        _claim_fresh_folder(output_dir, overwrite, main)
        return _Resume()
    checkpoint = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if checkpoint is None:
        _note(f"--resume latest: no checkpoint in {output_dir} yet, starting from step 0", main)
        return _Resume()
    state = read_state(checkpoint) if checkpoint.is_dir() else None
    if state is None:
        raise FileNotFoundError(f"not a complete checkpoint (no readable {STATE_NAME}): {checkpoint}")
    changes = _checked_changes(checkpoint, config)
    if changes:
        _note(f"resuming from {checkpoint.name} with changed settings: {'; '.join(map(str, changes))}", main)
    return _Resume(checkpoint=checkpoint, step=int(state["step"]), state=state, changes=changes)


def _checked_changes(checkpoint: Path, config: TrainConfig) -> list[Any]:
    from sdpo.train.config import check_resume

    path = checkpoint / CONFIG_NAME
    if not path.is_file():
        warnings.warn(f"{checkpoint} holds no {CONFIG_NAME} (an older checkpoint): the config is not checked",
                      stacklevel=3)
        return []
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
    except ValueError as error:
        raise ValueError(f"cannot read the config saved in {path}: {error}") from None
    return check_resume(saved, config)


def _claim_fresh_folder(output_dir: Path, overwrite: bool, main: bool) -> None:
    """Refuse a folder that holds a run (unless ``overwrite``); a fresh run starts with no old files."""
    found = sorted(p.name for p in output_dir.iterdir() if p.name in RUN_FILES or checkpoint_step(p) is not None)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"output folder {output_dir} already holds a run ({shown}): pass --resume latest to "
                         f"continue it, --overwrite to replace it, or choose another output_dir")
    if main:
        _note(f"--overwrite: deleting the run in {output_dir}")
        for folder in complete_checkpoints(output_dir):
            remove_checkpoint(folder)
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _already_finished(output_dir: Path, config: TrainConfig, resume: str | None) -> TrainResult | None:
    """``--resume latest`` on a run whose export has landed and that kept no checkpoint: nothing to do."""
    if resume != "latest" or complete_checkpoints(output_dir) or not (output_dir / "run_info.json").is_file():
        return None
    try:
        final_step = json.loads((output_dir / "run_info.json").read_text()).get("final_step")
    except ValueError:
        return None
    if not isinstance(final_step, int):
        return None
    if final_step < config.max_steps:
        raise FileNotFoundError(f"{output_dir} finished at step {final_step} and kept no checkpoint to continue "
                                f"from to max_steps={config.max_steps} (set checkpoint_every to keep one)")
    _note(f"{output_dir} already finished (step {final_step}): nothing to do")
    return TrainResult(output_dir=output_dir, history=_read_history(output_dir / "metrics.jsonl", final_step))


def _open_cache(config: TrainConfig) -> Any:
    from sdpo.data import CachedPairs, check_cache_matches

    dataset = CachedPairs(config.cache_dir)
    check_cache_matches(dataset.manifest, config.family, config.pretrained or None)
    return dataset


def _build_run(config: TrainConfig, spec: ModelSpec | None, dataset: Any, accelerator: Any, output_dir: Path,
               start: _Resume) -> _Run:
    """Load the model (if not given), add the adapters, prepare optimizer and schedule, load the checkpoint."""
    from diffusers.optimization import get_scheduler

    if spec is None:
        from sdpo.models.registry import load_spec

        media_format = dataset.media_format if dataset is not None else None
        spec = load_spec(config.family, config.pretrained, load_vae=False, load_text_encoder=False,
                         media_format=media_format)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    model, reference_copy = _policy_and_reference(spec, config, accelerator, weight_dtype)
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], config)
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    register_trainable_hooks(accelerator, model)

    def reference() -> Any:
        if reference_copy is None:
            return adapters_disabled(model)
        return _offloaded(reference_copy, accelerator.device, config.offload_reference and not uses_fsdp(accelerator))

    run = _Run(config=config, accelerator=accelerator, spec=spec, dataset=dataset, model=model, optimizer=optimizer,
               lr_scheduler=lr_scheduler, params=[p for p in model.parameters() if p.requires_grad],
               reference=reference, weight_dtype=weight_dtype, output_dir=output_dir, resume=start)
    if dataset is not None:
        run.order = GlobalBatchOrder(len(dataset), config.train_batch_size, accelerator.num_processes,
                                     accelerator.process_index, config.seed)
        run.sample_shape = tuple(dataset[0].chosen.shape)
    if start.checkpoint is not None:
        accelerator.load_state(str(start.checkpoint))
        run.bad_steps = int(start.state.get("bad_steps", 0))
        run.config_changes = list(start.state.get("config_changes", []))
    if start.changes:
        run.config_changes.append({"step": start.step, "changes": [
            {"field": c.field, "old": c.old, "new": c.new} for c in start.changes]})
    return run


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


def _final_model(run: _Run) -> nn.Module:
    return unwrap(run.accelerator.unwrap_model(run.model))


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
        draws = draw_for_pairs(positions, micro_step, config.seed, run.sample_shape, run.spec.schedule.num_timesteps,
                               config.t_min, config.t_max, config.method.estimator == "sampled")
        with accelerator.accumulate(run.model), accelerator.autocast():
            result = preference_step(run.spec, run.model, batch, draws, config.method, run.reference)
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


def _save(run: _Run, done: int, final: bool = False) -> Path:
    state = {"bad_steps": run.bad_steps, "config_changes": run.config_changes, "final": final}
    folder = save_checkpoint(run.accelerator, run.output_dir, done, run.params, run.config.to_dict(), state)
    if run.main:
        prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit, protect=folder)
    run.accelerator.wait_for_everyone()
    return folder


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
                                 config.validation_inference_steps, config.seed, write=run.main)
    saved = bool(config.checkpoint_every) and done % config.checkpoint_every == 0 and done < config.max_steps
    if saved:
        _save(run, done)
    if done < config.max_steps and stops.agreed(accelerator):
        if not saved:
            _save(run, done)
        return True
    return False


def _finish(run: _Run) -> None:
    """Checkpoint the final step, export the weights atomically, then drop a checkpoint made only for it."""
    config, output_dir = run.config, run.output_dir
    final = output_dir / f"{CHECKPOINT_PREFIX}{config.max_steps}"
    made_here = run.resume.step != config.max_steps  # else the run resumed from it: it holds these weights
    if made_here:
        _save(run, config.max_steps, final=True)
    _export(run, final)
    # Kept only until the export landed when the run asked for no checkpoints; a mid-run checkpoint
    # exported by `sdpo export` stays, to continue from.
    if run.main and not config.checkpoint_every and (made_here or run.resume.state.get("final")):
        remove_checkpoint(final)
    run.accelerator.wait_for_everyone()


def _export(run: _Run, checkpoint: Path) -> None:
    """Write the final LoRA / model into a temporary folder inside the run, then rename it into place."""
    accelerator, output_dir = run.accelerator, run.output_dir
    accelerator.wait_for_everyone()
    # Collective: under FSDP / ZeRO-3 each process holds a shard; this gathers the full state.
    state_dict = accelerator.get_state_dict(run.model)
    if not weights_are_finite(accelerator, run.params):
        raise NonFiniteWeightsError(f"the final weights hold NaN or inf: nothing exported to {output_dir}")
    failure = ""
    if run.main:
        try:
            _write_export(run, state_dict, output_dir / EXPORT_TMP_NAME)
        except (OSError, RuntimeError, _safetensors_error()) as error:
            shutil.rmtree(output_dir / EXPORT_TMP_NAME, ignore_errors=True)
            failure = f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}"
    if _any_process(accelerator, bool(failure)):
        raise ExportError(
            f"could not write the final weights to {output_dir} ({failure or 'on the main process'}); "
            f"{checkpoint} is kept: free the space or fix the folder, then run `sdpo export {output_dir}` "
            f"(or the same train command with --resume latest, which only exports)"
        )


def _write_export(run: _Run, state_dict: dict[str, Tensor], staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    final = _final_model(run)
    if run.config.lora_rank > 0:
        run.spec.save_lora(staging, final, state_dict)
    else:
        run.spec.save_full(staging, final, state_dict)
    (staging / "train_config.json").write_text(json.dumps(run.config.to_dict(), indent=2))
    info = {**_run_info(run.accelerator), "final_step": run.config.max_steps, "bad_steps": run.bad_steps,
            "config_changes": run.config_changes}
    (staging / "run_info.json").write_text(json.dumps(info, indent=2))
    _move_into_place(staging, run.output_dir)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename each exported entry over its old version; run_info.json (the "finished" mark) goes last."""
    entries = sorted(staging.iterdir(), key=lambda p: p.name == "run_info.json")
    for entry in entries:
        target = output_dir / entry.name
        if entry.is_dir() and target.exists():
            old = output_dir / f".old-{entry.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, target)
    fsync_dir(output_dir)
    staging.rmdir()


def _safetensors_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - older safetensors
        return OSError
    return SafetensorError


def _any_process(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


class _MetricsLog:
    """The metrics side of the loop: meter, metrics.jsonl, trackers, progress bar and warnings."""

    def __init__(self, run: _Run, progress: bool, on_log: Callable[..., None] | None) -> None:
        config, accelerator = run.config, run.accelerator
        self.run, self.on_log, self.meter = run, on_log, _IntervalMeter()
        self.path = run.output_dir / "metrics.jsonl"
        self.history = _read_history(self.path, run.resume.step, rewrite=run.main)  # a fresh run: step 0, none
        if run.main:
            _cut_jsonl(run.output_dir / BAD_STEPS_NAME, run.resume.step)
        self.trackers = config.report_to != "none"
        if run.main and self.trackers:
            accelerator.init_trackers("sdpo", config=_flat_config(config))
        if progress and run.main and run.dataset is not None:
            tqdm.write(_announcement(run.spec, config, accelerator, run.params, len(run.dataset)))
        self.bar = tqdm(total=config.max_steps, initial=run.resume.step, desc=f"train {config.method.name}",
                        disable=not (progress and run.main), unit="step")
        self.warned_masked = self.warned_large = False

    def record(self, outcome: _StepOutcome, done: int) -> None:
        """Add a step's metrics (a skipped step adds none), write them at logging steps."""
        run, config = self.run, self.run.config
        num_timesteps = run.spec.schedule.num_timesteps
        if outcome.skipped is None:
            for metrics, timesteps, raw_weights in outcome.metrics:
                self.meter.add(metrics, timesteps, raw_weights, num_timesteps)
            self._check_large(outcome.max_loss, done)
        self.bar.update(1)
        if not (done % config.log_every == 0 or done == config.max_steps):
            return
        logged = self.meter.flush(run.accelerator, num_timesteps)
        # A skipped step's NaN / inf norm, or DeepSpeed's unreported one, is written as null (strict JSON).
        norm = outcome.grad_norm if math.isfinite(outcome.grad_norm) else None
        logged.update(grad_norm=norm, lr=run.lr_scheduler.get_last_lr()[0], bad_steps=run.bad_steps,
                      step=done)
        if run.main:
            self._write(logged, done)

    def _write(self, logged: dict[str, float], done: int) -> None:
        if logged.get("masked_fraction", 0.0) >= 1.0 and not self.warned_masked:
            self.warned_masked = True
            warnings.warn(
                f"every pair member was masked up to step {done} (w below method.mask_threshold="
                f"{self.run.config.method.mask_threshold}), so the loss has no gradient; lower the threshold "
                "or start from a base model that fits the pairs better",
                stacklevel=3,
            )
        self.history.append(logged)
        with self.path.open("a") as handle:
            handle.write(json.dumps(logged) + "\n")
        if self.trackers:
            self.run.accelerator.log({k: v for k, v in logged.items() if k != "step" and v is not None}, step=done)
        if "loss" in logged:
            self.bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged.get('accuracy', math.nan):.2f}")
        if self.on_log is not None:
            self.on_log(done, logged, unwrap(self.run.model))

    def _check_large(self, loss: float, done: int) -> None:
        if loss > LOSS_BOUND and not self.warned_large and self.run.main:
            self.warned_large = True
            warnings.warn(f"loss {loss:.4g} at step {done} is above {LOSS_BOUND:g}: the objective is saturated "
                          f"(method.beta {self.run.config.method.beta:g} may be far too large)", stacklevel=3)

    def close(self) -> None:
        self.bar.close()


def export_run(run_dir: str | os.PathLike[str], progress: bool = True) -> TrainResult:
    """Re-export the final weights of a run from its latest checkpoint, without training.

    Loads the model named in the checkpoint's config (the LoRA is rebuilt on it), loads the
    checkpoint and writes the weights atomically, as the end of ``train`` does. What a failed export
    says to run.
    """
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir} to export from")
    saved = json.loads((checkpoint / CONFIG_NAME).read_text()) if (checkpoint / CONFIG_NAME).is_file() else None
    if saved is None:
        raise FileNotFoundError(f"{checkpoint} holds no {CONFIG_NAME}: train again with --resume latest instead")
    step = int(read_state(checkpoint)["step"])
    saved.update(output_dir=str(run_dir), max_steps=step, validation_prompts=[])
    return train(TrainConfig.from_dict(saved), resume=str(checkpoint), progress=progress)


class _offloaded:
    """Context manager that brings a CPU-parked reference to the device only while it is used."""

    def __init__(self, module: nn.Module, device: torch.device, offload: bool) -> None:
        self.module, self.device, self.offload = module, device, offload

    def __enter__(self) -> nn.Module:
        if self.offload:
            self.module.to(self.device)
        return self.module

    def __exit__(self, *exc: object) -> None:
        if self.offload:
            self.module.to("cpu")


def _policy_and_reference(
    spec: ModelSpec, config: TrainConfig, accelerator: Any, weight_dtype: torch.dtype
) -> tuple[nn.Module, nn.Module | None]:
    """The trainable denoiser and, for full fine-tuning, its frozen reference copy (None with LoRA:
    the reference is the same network with its adapters disabled)."""
    model = spec.denoiser
    model.requires_grad_(False)
    reference_copy: nn.Module | None = None
    if config.lora_rank > 0:
        cast_frozen(model, accelerator.device, weight_dtype)
        _add_lora(model, config, spec)
        for param in model.parameters():  # adapters train in float32 whatever the base dtype
            if param.requires_grad:
                param.data = param.data.float()
    else:
        # The reference keeps the trained weights' dtype: a bf16 copy computes differently from the
        # float32 policy and, times beta, biases the loss away from ln 2 before any update.
        reference_copy = copy.deepcopy(model).requires_grad_(False).eval()
        if uses_fsdp(accelerator):
            reference_copy = shard_like_policy(accelerator, reference_copy)
        else:
            reference_copy.to("cpu" if config.offload_reference else accelerator.device)
        model.requires_grad_(True)
        model.to(accelerator.device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(accelerator, model)
    model.train()
    return model, reference_copy


def _announcement(spec: ModelSpec, config: TrainConfig, accelerator: Any, params: list, num_pairs: int) -> str:
    """One line saying what the run is about to do."""
    trainable = sum(p.numel() for p in params)
    what = f"LoRA rank {config.lora_rank}" if config.lora_rank > 0 else "full fine-tuning"
    processes = accelerator.num_processes
    launch = "one process" if processes == 1 else f"{processes} processes ({accelerator.distributed_type.value})"
    pairs_per_step = config.train_batch_size * config.gradient_accumulation_steps * processes
    return (f"sdpo: {spec.family}, {config.method.name}, {what} ({trainable:,} trainable parameters), {launch}, "
            f"mixed precision {config.mixed_precision}; {config.max_steps} steps of {pairs_per_step} pairs from "
            f"{num_pairs} cached pairs")


def _run_info(accelerator: Any) -> dict[str, Any]:
    """How the run was launched, for the record: the config alone does not say it."""
    import accelerate
    import diffusers

    return {
        "distributed_type": str(accelerator.distributed_type.value),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "accelerate": accelerate.__version__},
    }


def _forget_other_precision(mixed_precision: str) -> None:
    """Let a second ``train`` in one process (a notebook, a sweep) use another mixed precision.

    accelerate keeps one process-wide state and refuses a new precision; the process group
    (PartialState) is kept, only the precision-bearing part is cleared.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _read_history(path: Path, up_to_step: int, rewrite: bool = False) -> list[dict[str, float]]:
    """The logged rows up to ``up_to_step``; ``rewrite`` cuts the file there too (atomically), so a
    resumed run does not log a step twice and a fresh one does not append to an old run's rows."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a row torn by a kill mid-write
    kept = [row for row in rows if isinstance(row, dict) and row.get("step", 0) <= up_to_step]
    if rewrite and (kept != rows or path.exists()):
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept


def _cut_jsonl(path: Path, up_to_step: int) -> None:
    if path.is_file():
        _read_history(path, up_to_step, rewrite=True)


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


def cast_frozen(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move a frozen base network to ``device`` and ``dtype``, keeping the modules the model marks as
    float32-only (``_keep_in_fp32_modules``, e.g. Wan's time embedder and norms) in float32, as
    ``from_pretrained`` does. diffusers' warning about casting with ``to()`` is muted: this is the fix."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model.to(device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32 and keep:
        for name, module in model.named_modules():
            if any(part in name for part in keep):
                module.to(torch.float32)
