"""The end of a run (``finish_run``): the final checkpoint, the atomic export of the LoRA / model (and,
with ``ema_decay``, of its moving average in ``ema/``, same format). ``sdpo export`` (the same export from
a run's latest checkpoint, without training) is ``sdpo.train.trainer.export_run``: it runs ``train``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sdpo.errors import FolderError, InputError
from sdpo.files import fsync_dir, write_atomic
from sdpo.train.checkpoint import (
    CHECKPOINT_PREFIX,
    STATE_NAME,
    NonFiniteWeightsError,
    checkpoint_step,
    read_state,
    remove_checkpoint,
    save_run,
    weights_are_finite,
)
from sdpo.train.ema import EMA_FOLDER, averaged_state_dict
from sdpo.train.model_card import export_card
from sdpo.train.run import TrainingRun, final_model
from sdpo.train.setup import EXPORT_TMP_NAME

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["ExportError", "finish_run", "refuse_older_export"]


class ExportError(InputError):
    """The final weights could not be written; the checkpoint they come from is kept."""


def finish_run(run: TrainingRun) -> None:
    """Checkpoint the final step, export the weights atomically, then drop a checkpoint made only for it."""
    config, output_dir = run.config, run.output_dir
    final = output_dir / f"{CHECKPOINT_PREFIX}{config.max_steps}"
    made_here = run.resume.step != config.max_steps  # else the run resumed from it: it holds these weights
    if made_here:
        save_run(run, config.max_steps, final=True)
    _export(run, final)
    # Kept only until the export landed when the run asked for no checkpoints; a mid-run checkpoint
    # exported by `sdpo export` stays, to continue from.
    if run.main and not config.checkpoint_every and (made_here or run.resume.state.get("final")):
        remove_checkpoint(final)
    run.accelerator.wait_for_everyone()


def _export(run: TrainingRun, checkpoint: Path) -> None:
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


def _write_export(run: TrainingRun, state_dict: dict[str, Tensor], staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    final = final_model(run)
    state_dict = owning_storage(state_dict)
    save = run.spec.save_lora if run.config.lora_rank > 0 else run.spec.save_full
    save(staging, final, state_dict)
    if run.ema is not None:  # the moving average, in the same format, in its own folder
        save(staging / EMA_FOLDER, final, averaged_state_dict(run.ema, final, state_dict))
    write_atomic(staging / "train_config.json", json.dumps(run.config.to_dict(), indent=2))
    info = {**_run_info(run.accelerator), "final_step": run.config.max_steps, "bad_steps": run.bad_steps,
            "config_changes": run.config_changes}
    write_atomic(staging / "run_info.json", json.dumps(info, indent=2))
    export_card(staging, run.config, run.spec.media_kind, run.output_dir)
    _move_into_place(staging, run.output_dir)


def owning_storage(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor copied out of a larger storage that it only partly covers: FSDP2 gathers a parameter that
    splits unevenly over the processes into a padded buffer and returns a view of it (Wan's 1-row
    ``scale_shift_table`` over two processes), and safetensors refuses to write such a view."""
    return {name: tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
            for name, tensor in state_dict.items()}


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


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _run_info(accelerator: Accelerator) -> dict[str, Any]:
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


def refuse_older_export(run_dir: Path, checkpoint: Path) -> None:
    """Refuse (FolderError) to export ``checkpoint`` when the run holds newer work: a newer checkpoint whose
    state is torn, or final weights of a later step (``run_info.json``)."""
    step = checkpoint_step(checkpoint) or 0
    torn = sorted((f for f in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (checkpoint_step(f) or 0) > step
                   and (f / STATE_NAME).exists() and read_state(f) is None), key=lambda f: checkpoint_step(f) or 0)
    if torn:
        raise FolderError(f"{torn[-1]} has a torn {STATE_NAME}: exporting would write the older {checkpoint.name} "
                          f"over the run's weights; pass --allow-older to export {checkpoint.name} anyway")
    try:
        final = json.loads((run_dir / "run_info.json").read_text()).get("final_step")
    except (OSError, ValueError, AttributeError):
        final = None
    if isinstance(final, int) and final > step:
        raise FolderError(f"{run_dir} holds the final weights of step {final}, newer than {checkpoint.name}: pass "
                          f"--allow-older to write {checkpoint.name}'s weights over them")
