"""The accelerate training loop: one process, DDP, DeepSpeed or FSDP, through the same code.

The loop knows the ModelSpec protocol and the precompute cache, never a model family. ``train`` reads as
its phases, each a public function over the run state (``sdpo.train.run.TrainingRun``) in its own module,
each importing only the ones below it:

- set-up (``sdpo.train.setup``): ``check_writable``, ``make_accelerator``, the run lock, ``resume_point``
  (folder claim, checkpoint, config check), ``open_cache``, then ``prepare_run`` (data checks, policy and
  reference, optimizer, schedule, EMA, the checkpoint's state, the batch order of ``sdpo.train.order``);
  everything that needs no model is checked first;
- one optimizer step (``sdpo.train.optimize``): accumulation and the non-finite guard (a step whose
  loss or gradient norm is NaN / inf on any process is skipped by all: no update, logged to
  ``bad_steps.jsonl``; ``max_bad_steps`` in a row checkpoint the last good weights and stop);
- the metrics log (``sdpo.train.metrics.MetricsLog``): meter, ``metrics.jsonl``, trackers, progress bar;
- after each step (``sdpo.train.after_step``): validation, periodic checkpoint, stop signals;
- finish (``sdpo.train.export.finish_run``): a checkpoint of the final step, the atomic export, then that
  checkpoint is dropped (kept when the run keeps checkpoints, or when the export fails).

Checkpoints (layout, atomic writes, the run lock, ``save_run``) live in ``sdpo.train.checkpoint``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sdpo.errors import MissingFileError
from sdpo.models.base import ModelSpec
from sdpo.train.after_step import after_step
from sdpo.train.checkpoint import CONFIG_NAME, NonFiniteWeightsError, RunLock, latest_checkpoint, read_state
from sdpo.train.config import TrainConfig
from sdpo.train.export import ExportError, finish_run, refuse_older_export
from sdpo.train.metrics import LoggedRow, MetricsLog, read_history
from sdpo.train.optimize import TrainingDivergedError, account_for, optimizer_step
from sdpo.train.order import GlobalBatchOrder
from sdpo.train.preemption import StopRequests
from sdpo.train.run import TrainingData, TrainingRun, final_model
from sdpo.train.setup import (
    already_finished,
    cast_frozen,
    check_writable,
    make_accelerator,
    open_cache,
    prepare_run,
    resume_point,
)
from sdpo.train.sharding import end_run

__all__ = ["ExportError", "GlobalBatchOrder", "NonFiniteWeightsError", "TrainResult", "TrainingDivergedError",
           "cast_frozen", "export_run", "latest_checkpoint", "train"]


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    """The run folder (LoRA or model, metrics.jsonl, logs/, checkpoints)."""
    history: list[LoggedRow] = field(default_factory=list)
    """Logged metrics, one dict per logging step (what metrics.jsonl holds)."""
    model: nn.Module | None = None
    """The trained denoiser (unwrapped), still in memory for evaluation."""
    stopped_at: int | None = None
    """The step after which a stop signal ended the run early (its checkpoint is saved), or None."""
    stop_signal: str | None = None
    """The signal that stopped this process's run (None if another process received it)."""
    bad_steps: int = 0
    """Steps skipped by the non-finite guard over the whole run (resumes included)."""


def train(
    config: TrainConfig,
    spec: ModelSpec | None = None,
    dataset: TrainingData | None = None,
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
    check_writable(output_dir)
    accelerator = make_accelerator(config, output_dir)
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(RunLock(output_dir))
        final_step = already_finished(output_dir, config, resume)
        if final_step is not None:
            return TrainResult(output_dir=output_dir, history=read_history(output_dir / "metrics.jsonl", final_step))
        start = resume_point(output_dir, resume, config, overwrite, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if dataset is None and start.step < config.max_steps:
            dataset = open_cache(config)
        run = prepare_run(config, spec, dataset, accelerator, output_dir, start)
        return _train_loop(run, progress, on_log)
    raise AssertionError("unreachable")  # pragma: no cover - the with block returns


def _train_loop(run: TrainingRun, progress: bool, on_log: Callable[..., None] | None) -> TrainResult:
    config, first_step = run.config, run.resume.step
    log = MetricsLog(run, progress, on_log)
    stopped_at: int | None = None
    with StopRequests() as stops:
        for step in range(first_step, config.max_steps):
            outcome = optimizer_step(run, step)
            done = step + 1
            account_for(run, outcome, done)
            log.record(outcome, done)
            if after_step(run, done, stops):
                stopped_at = done
                break
    log.close()
    if stopped_at is not None:
        end_run(run.accelerator)
        return TrainResult(output_dir=run.output_dir, history=log.history, model=final_model(run),
                           stopped_at=stopped_at, stop_signal=stops.received, bad_steps=run.bad_steps)
    finish_run(run)
    end_run(run.accelerator)
    return TrainResult(output_dir=run.output_dir, history=log.history, model=final_model(run),
                       bad_steps=run.bad_steps)


def export_run(run_dir: str | os.PathLike[str], progress: bool = True, allow_older: bool = False) -> TrainResult:
    """Re-export the final weights of a run from its latest checkpoint, without training.

    Loads the model named in the checkpoint's config (the LoRA is rebuilt on it), loads the
    checkpoint and writes the weights atomically, as the end of ``train`` does. What a failed export
    says to run. A newer checkpoint that is torn, or final weights newer than the latest checkpoint, are
    refused (never overwritten by older weights) unless ``allow_older``.
    """
    run_dir = Path(run_dir)
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        raise MissingFileError(f"no complete checkpoint in {run_dir} to export from")
    if not allow_older:
        refuse_older_export(run_dir, checkpoint)
    saved = json.loads((checkpoint / CONFIG_NAME).read_text()) if (checkpoint / CONFIG_NAME).is_file() else None
    if saved is None:
        raise MissingFileError(f"{checkpoint} holds no {CONFIG_NAME}: train again with --resume latest instead")
    state = read_state(checkpoint)
    if state is None:  # latest_checkpoint passes only checkpoints whose state reads; a race could still tear it
        raise MissingFileError(f"{checkpoint} holds no readable trainer state: train again with --resume latest instead")
    step = int(state["step"])
    saved.update(output_dir=str(run_dir), max_steps=step, validation_prompts=[])
    return train(TrainConfig.from_dict(saved), resume=str(checkpoint), progress=progress)
