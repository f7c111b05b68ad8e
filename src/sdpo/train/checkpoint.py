"""Resumable checkpoints and atomic writes: a kill at any moment leaves a run that resumes or exports.

Layout of ``RUN/checkpoint-N/`` (N = optimizer steps done):

- ``trainable.safetensors``: the trainable parameters by name (the LoRA adapters only, for a LoRA
  run; every denoiser weight for full fine-tuning). Under FSDP / DeepSpeed the backend writes its
  own sharded model files instead (``pytorch_model_fsdp_0/``, ``pytorch_model/``).
- ``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``: accelerate's optimizer, LR
  scheduler and RNG state (the data position is the step: the batch order is a function of it).
- ``ema.safetensors`` (``ema_decay`` only): the moving average of the trainable parameters, by the
  same names; its update count is ``ema_updates`` in the trainer state.
- ``train_config.json``: the TrainConfig the checkpoint was made with (checked on resume).
- ``trainer_state.json``: ``{"step": N, "format": 1, "bad_steps": ..., "config_changes": [...]}``,
  written last and atomically: it is what makes the folder a checkpoint. A folder without it (an
  interrupted save) or with one that does not parse is skipped by ``latest_checkpoint``.

The frozen base weights are never stored: resume rebuilds them from ``pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sdpo.errors import FolderError, InputError
from sdpo.files import write_atomic
from sdpo.models.base import unwrap
from sdpo.train import log
from sdpo.train.ema import save_ema

if TYPE_CHECKING:
    from sdpo.train.run import TrainingRun

CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
CONFIG_NAME = "train_config.json"
TRAINABLE_NAME = "trainable.safetensors"
STATE_FORMAT = 1


class NonFiniteWeightsError(InputError):
    """Trained weights hold NaN or inf; nothing was written."""


def checkpoint_step(folder: Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, or None for any other name."""
    suffix = folder.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def read_state(folder: Path) -> dict[str, Any] | None:
    """A checkpoint's trainer state, or None when it is missing or does not parse (a torn write)."""
    try:
        state = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("step"), int) else None


def complete_checkpoints(output_dir: Path, warn: bool = False) -> list[Path]:
    """The run's complete checkpoints, oldest first; ``warn`` says which are skipped as unreadable."""
    done = []
    for folder in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if checkpoint_step(folder) is None or not folder.is_dir():
            continue
        if read_state(folder) is not None:
            done.append(folder)
        elif warn and (folder / STATE_NAME).exists():
            log.warn(f"skipping {folder}: its {STATE_NAME} does not parse (a torn write)", stacklevel=3)
    return sorted(done, key=lambda p: checkpoint_step(p) or 0)


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder of a run, or None (unreadable ones are skipped, with a warning)."""
    done = complete_checkpoints(Path(output_dir), warn=True)
    return done[-1] if done else None


def prune_checkpoints(output_dir: Path, keep: int | None, protect: Path | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``protect`` is never deleted)."""
    if keep is None:
        return
    for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else complete_checkpoints(output_dir):
        if protect is None or old.resolve() != protect.resolve():
            remove_checkpoint(old)


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint, its state file first, so a kill midway leaves an incomplete folder, not a torn one."""
    (folder / STATE_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name in the unwrapped model, on the CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in unwrap(model).named_parameters() if p.requires_grad}


def register_trainable_hooks(accelerator: Any, model: nn.Module) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` store only the trainable parameters.

    Applies where accelerate hands the hooks the weights (one process, DDP); FSDP and DeepSpeed
    save through their own engines and keep their format.
    """

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if not weights:
            return
        weights.clear()  # accelerate would write every frozen base weight too
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(trainable_parameters(model), str(Path(output_dir) / TRAINABLE_NAME))

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        path = Path(input_dir) / TRAINABLE_NAME
        if not models or not path.is_file():
            return  # a sharded backend's own files, or an old full-state checkpoint
        models.clear()
        load_trainable(model, path)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load ``trainable.safetensors`` into ``model``; every trainable parameter must be in it."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    inner = unwrap(model)
    wanted = {name for name, p in inner.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise InputError(
            f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}): was it made "
            f"with another lora_rank / lora_target_modules?"
        )
    inner.load_state_dict(tensors, strict=False)


def weights_are_finite(accelerator: Any, params: list[nn.Parameter]) -> bool:
    """Whether every process's trainable weights are finite (collective with several processes)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([0.0 if local else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == 0)


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, params: list[nn.Parameter],
                    config_data: dict[str, Any], state: dict[str, Any],
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoint-<step>`` (collective); the state file last, atomically. Refuses NaN weights.

    ``extra(folder)``, run on the main process before the state file, writes further files (the EMA).
    """
    if not weights_are_finite(accelerator, params):
        raise NonFiniteWeightsError(f"the weights after step {step} hold NaN or inf; checkpoint-{step} not written")
    folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        (folder / STATE_NAME).unlink(missing_ok=True)  # re-saving a step: the old state must not vouch for new files
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    _pause_for_tests("SDPO_TEST_SAVE_PAUSE")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra is not None:
            extra(folder)
        write_atomic(folder / CONFIG_NAME, json.dumps(config_data, indent=2))
        write_atomic(folder / STATE_NAME, json.dumps({"step": step, "format": STATE_FORMAT, **state}))
    accelerator.wait_for_everyone()
    return folder


def save_run(run: TrainingRun, done: int, final: bool = False) -> Path:
    """Checkpoint a run after ``done`` steps (collective), with its guard counts, config changes and moving
    average, then prune old checkpoints down to ``checkpoints_total_limit`` (never this one).

    ``final`` marks a checkpoint made only so the export has one to fall back on (dropped after it)."""
    state: dict[str, Any] = {"bad_steps": run.bad_steps, "config_changes": run.config_changes, "final": final}
    if run.ema is not None:
        state["ema_updates"] = run.ema.optimization_step
    ema, model = run.ema, run.model
    extra = None if ema is None else (lambda folder: save_ema(ema, model, folder))
    folder = save_checkpoint(run.accelerator, run.output_dir, done, run.params, run.config.to_dict(), state,
                             extra=extra)
    if run.main:
        prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit, protect=folder)
    run.accelerator.wait_for_everyone()
    return folder


def _pause_for_tests(variable: str) -> None:
    # The fault-injection test sets this to widen the window in which a kill lands inside a save.
    seconds = os.environ.get(variable)
    if seconds:
        import time

        time.sleep(float(seconds))


LOCK_NAME = ".sdpo-train.lock"


class RunLockedError(FolderError):
    """Another process is training into the same output folder."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/.sdpo-train.lock`` for the life of a run (released by the kernel
    when the process dies, so a killed run never leaves a stale lock). The file holds the owner's pid."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_NAME
        self._handle: Any = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunLockedError(f"{self.path.parent} is in use by another sdpo train (pid {owner}); wait for it "
                                 f"to finish or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None
