"""``gradient_checkpointing: auto``: checkpoint the denoiser only where a step without it would not fit.

Gradient checkpointing costs about one more forward of the denoiser per step (a third more compute on
a LoRA step, 29% on CogVideoX-5B); it is worth paying only when memory needs it. "auto" decides:

- On one CUDA device: a probe. With checkpointing off, one forward and backward of a real micro-batch
  (the first one, or for a bucketed cache the first of its largest bucket) runs as the trainer would
  run it, without an optimizer update, under torch's RNG fork (the run's random streams are left as
  they were) and with the gradients dropped afterwards. Its peak allocation above what the model holds,
  plus the optimizer state the first update will create (two float32 values per trainable weight,
  AdamW's), must fit within the free memory measured before it (``torch.cuda.mem_get_info``, the
  allocator's cache emptied) less ``AUTO_MARGIN``; otherwise, or if the probe runs out of memory
  (caught, freed), checkpointing is turned on. So "auto" never runs out of memory where "true" would not.
- Under FSDP, DeepSpeed or more than one process: on, without a probe. The probe is one process's;
  processes deciding differently, or one running out of memory while the others wait in a collective,
  would hang the run, and FSDP's activation checkpointing must be set before the model is wrapped.
- On a CPU (or any device without CUDA's memory counters): off. Host memory has no counter of its
  peak, and running out of it ends the process (the kernel's OOM killer) instead of raising an error a
  probe could catch; the runs made on a CPU (the embedded worlds, tiny models) fit without it.

The decision is logged on the main process.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sdpo.train.log import note
from sdpo.train.optimize import cache_micro_step
from sdpo.train.sharding import enable_gradient_checkpointing

if TYPE_CHECKING:
    from sdpo.train.config import TrainConfig
    from sdpo.train.run import TrainingRun

__all__ = ["AUTO_MARGIN", "CudaMemory", "DeviceMemory", "accelerator_memory", "checkpoint_before_prepare",
           "largest_micro_step", "probe_step", "settle_checkpointing"]

AUTO_MARGIN = 0.10
"""Fraction of the free memory "auto" leaves unused: the allocator's fragmentation, and what later
steps allocate that the probe did not (validation samples, a checkpoint being written)."""


class DeviceMemory(Protocol):
    """The memory counters the probe reads."""

    def free_bytes(self) -> int:
        """Memory free for this process now, its allocator's cache emptied first."""
        ...

    def peak_bytes_of(self, fn: Callable[[], None]) -> int:
        """Peak allocation ``fn()`` adds above what is allocated before it (raises on out-of-memory)."""
        ...


class CudaMemory:
    """``DeviceMemory`` of a CUDA device, from torch's allocator counters."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def free_bytes(self) -> int:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(self.device)[0])

    def peak_bytes_of(self, fn: Callable[[], None]) -> int:
        torch.cuda.synchronize(self.device)
        held = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - held)


def accelerator_memory(device: torch.device) -> DeviceMemory | None:
    """The counters "auto" probes with on ``device`` (None: no probe there, checkpointing stays off)."""
    return CudaMemory(device) if device.type == "cuda" else None


def _probe_cannot_run(accelerator: Any) -> str | None:
    """Why no probe can decide on this accelerator (None: it can)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return f"under {accelerator.distributed_type.value}"
    if accelerator.num_processes > 1:
        return f"with {accelerator.num_processes} processes"
    return None


def checkpoint_before_prepare(config: TrainConfig, accelerator: Any) -> bool:
    """Whether to turn checkpointing on before ``accelerator.prepare``: true, or "auto" where no probe
    can run (FSDP needs it set before wrapping). "auto" elsewhere waits for ``settle_checkpointing``."""
    setting = config.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    reason = _probe_cannot_run(accelerator)
    if reason is not None:
        note(f"gradient_checkpointing auto: on ({reason} no memory probe runs)", accelerator.is_main_process)
    return reason is not None


def settle_checkpointing(run: TrainingRun, memory: DeviceMemory | None = None) -> bool:
    """Decide "auto" for a prepared run (see the module docstring) and turn checkpointing on if needed;
    returns whether it is on. Settings other than "auto", and runs decided before prepare, are left alone."""
    config, accelerator = run.config, run.accelerator
    if config.gradient_checkpointing != "auto":
        return bool(config.gradient_checkpointing)
    if _probe_cannot_run(accelerator) is not None:
        return True
    if run.resume.step >= config.max_steps:  # a finished run being exported: no step to decide for
        return False
    memory = memory if memory is not None else accelerator_memory(accelerator.device)
    if memory is None:
        note(f"gradient_checkpointing auto: off (no memory probe on {accelerator.device.type})", run.main)
        return False
    if run.dataset is None or run.order is None:
        note("gradient_checkpointing auto: on (no batch to probe with)", run.main)
        enable_gradient_checkpointing(accelerator, accelerator.unwrap_model(run.model))
        return True
    free = memory.free_bytes()
    peak: int | None = None
    # An out-of-memory error leaves peak None; it is handled below, once the error and the tensors
    # its traceback holds are gone.
    with contextlib.suppress(torch.cuda.OutOfMemoryError):
        peak = memory.peak_bytes_of(lambda: probe_step(run))
    run.optimizer.zero_grad(set_to_none=True)
    memory.free_bytes()  # gives the probe's activations back to the device
    state = 0 if run.optimizer.state else 8 * sum(p.numel() for p in run.params)
    on = peak is None or peak + state > (1 - AUTO_MARGIN) * free
    gib = 2**30
    found = ("a step without it ran out of memory" if peak is None else
             f"a step without it needs {(peak + state) / gib:.2f} GiB of {free / gib:.2f} GiB free, "
             f"{AUTO_MARGIN:.0%} kept spare")
    note(f"gradient_checkpointing auto: {'on' if on else 'off'} ({found})", run.main)
    if on:
        enable_gradient_checkpointing(accelerator, accelerator.unwrap_model(run.model))
    return on


def largest_micro_step(run: TrainingRun) -> int:
    """The first micro-step of the largest bucket (by pixels) in the first epoch; 0 without buckets."""
    order, sizes = run.order, getattr(run.dataset, "buckets", None)
    if order is None or order.buckets is None or not sizes:
        return 0
    area = [sizes[int(order.buckets[order.indices(step)[0][0]])] for step in range(order.batches_per_epoch)]
    pixels = [height * width for height, width in area]
    return pixels.index(max(pixels))


def probe_step(run: TrainingRun) -> None:
    """Forward and backward of one micro-batch as ``optimize.optimizer_step`` runs it, without an update;
    the random streams are restored after it. The gradients it leaves are the caller's to drop."""
    accelerator, dataset, order = run.accelerator, run.dataset, run.order
    if dataset is None or order is None:
        raise RuntimeError("the memory probe needs the run's data")
    micro_step = largest_micro_step(run)
    rows, positions = order.indices(micro_step)
    forward = getattr(dataset, "micro_step", None) or cache_micro_step  # the dispatch optimizer_step makes
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), accelerator.autocast():
        result = forward(run, rows, positions, micro_step)
        accelerator.backward(result.loss)
