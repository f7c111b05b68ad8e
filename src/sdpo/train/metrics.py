"""The metrics side of a run: the interval meter, metrics.jsonl and its truncation on resume, trackers,
the progress bar, the warnings about a saturated or fully masked loss."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sdpo.files import write_atomic
from sdpo.models.base import ModelSpec, unwrap
from sdpo.train.config import TrainConfig
from sdpo.train.log import announce, warn
from sdpo.train.run import StepOutcome, TrainingRun

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["BAD_STEPS_NAME", "LOSS_BOUND", "LoggedRow", "MetricsLog", "read_history"]

LoggedRow = dict[str, float | None]
"""One logged step of metrics.jsonl: name -> value (None: not reported, e.g. a skipped step's gradient norm)."""

TIMESTEP_BUCKETS = 10

MINIMUM_KEY = "weight_min"

BAD_STEPS_NAME = "bad_steps.jsonl"

LOSS_BOUND = 100.0
"""A loss above this is reported: -log sigmoid(-100), the objective saturated far past any useful step."""


class _IntervalMeter:
    """Sums metrics between logging steps, then reduces them over processes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new interval."""
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

    def flush(self, accelerator: Accelerator, num_timesteps: int) -> dict[str, float]:
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
        self.reset()
        return result


class MetricsLog:
    """The metrics side of a run: meter, metrics.jsonl (cut back to the resume step), trackers, progress
    bar and warnings. ``record`` each step's outcome, ``close`` at the end; ``history`` is what was logged."""

    def __init__(self, run: TrainingRun, progress: bool, on_log: Callable[..., None] | None) -> None:
        config, accelerator = run.config, run.accelerator
        self.run, self.on_log, self.meter = run, on_log, _IntervalMeter()
        self.path = run.output_dir / "metrics.jsonl"
        self.history = read_history(self.path, run.resume.step, rewrite=run.main)  # a fresh run: step 0, none
        if run.main:
            _cut_jsonl(run.output_dir / BAD_STEPS_NAME, run.resume.step)
        self.trackers = config.report_to != "none"
        if run.main and self.trackers:
            accelerator.init_trackers("sdpo", config=_flat_config(config))
        if progress and run.dataset is not None:
            announce(run_announcement(run.spec, config, accelerator, run.params, run.dataset), run.main)
        objective = getattr(run.dataset, "objective_name", config.method.name)  # GRPO's trajectories name theirs
        self.bar = tqdm(total=config.max_steps, initial=run.resume.step, desc=f"train {objective}",
                        disable=not (progress and run.main), unit="step")
        self.warned_masked = self.warned_large = False

    def record(self, outcome: StepOutcome, done: int) -> None:
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
        logged: LoggedRow = {**self.meter.flush(run.accelerator, num_timesteps)}
        # A skipped step's NaN / inf norm, or DeepSpeed's unreported one, is written as null (strict JSON).
        norm = outcome.grad_norm if math.isfinite(outcome.grad_norm) else None
        logged.update(grad_norm=norm, lr=float(run.lr_scheduler.get_last_lr()[0]), bad_steps=run.bad_steps,
                      step=done)
        if run.main:
            self._write(logged, done)

    def _write(self, logged: LoggedRow, done: int) -> None:
        if (logged.get("masked_fraction") or 0.0) >= 1.0 and not self.warned_masked:
            self.warned_masked = True
            warn(
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
            warn(f"loss {loss:.4g} at step {done} is above {LOSS_BOUND:g}: the objective is saturated "
                          f"(method.beta {self.run.config.method.beta:g} may be far too large)", stacklevel=3)

    def close(self) -> None:
        self.bar.close()


def run_announcement(spec: ModelSpec, config: TrainConfig, accelerator: Accelerator, params: list,
                  dataset: Any) -> str:
    """One line saying what the run is about to do; the dataset's ``row_name`` says what its rows are
    (default pairs) and its ``objective_name`` what trains on them (default the method)."""
    rows = getattr(dataset, "row_name", "pairs")
    objective = getattr(dataset, "objective_name", config.method.name)
    trainable = sum(p.numel() for p in params)
    what = f"LoRA rank {config.lora_rank}" if config.lora_rank > 0 else "full fine-tuning"
    processes = accelerator.num_processes
    launch = "one process" if processes == 1 else f"{processes} processes ({accelerator.distributed_type.value})"
    per_step = config.train_batch_size * config.gradient_accumulation_steps * processes
    return (f"sdpo: {spec.family}, {objective}, {what} ({trainable:,} trainable parameters), {launch}, "
            f"mixed precision {config.mixed_precision}; {config.max_steps} steps of {per_step} {rows} from "
            f"{len(dataset)} {rows}")


def read_history(path: Path, up_to_step: int, rewrite: bool = False) -> list[LoggedRow]:
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
        read_history(path, up_to_step, rewrite=True)


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
