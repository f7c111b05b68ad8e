"""What training under FSDP needs beyond ``accelerator.prepare``.

- Gradient checkpointing is FSDP's own activation checkpointing of the blocks it wraps. The model's
  built-in checkpointing recomputes a block inside FSDP's input casts and, for Wan (whose rotary
  tables stay float32), saves bf16 tensors that the recomputation makes in float32.
- A full fine-tune's frozen reference is sharded like the policy, by the same accelerate function
  with the same mixed-precision policy, so that both cast at the same places and compute the same
  function at step 0, and the reference's memory is split over the processes like the policy's. accelerate's
  ``prepare`` insists on an optimizer next to each FSDP2 model, so that function is called directly.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from sdpo.errors import InputError


def start_cpu_process_group() -> None:
    """Start the gloo process group that DeepSpeed or FSDP needs when the processes run on the CPU.

    accelerate (1.16) chooses a distributed backend only for an accelerator device: launched on CPUs with
    a DeepSpeed or FSDP config, it starts no group, and every process trains alone as process 0 of 1.
    gloo is what DeepSpeed's CPU accelerator uses without oneCCL. accelerate turns only a multi-device
    type into FSDP, so the group is announced as one (the device stays the CPU). Does nothing on an
    accelerator, in one process, or where accelerate was told to run the CPU's own way (ACCELERATE_USE_CPU).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    def flag(name: str) -> bool:
        return os.environ.get(name, "false").lower() in ("1", "true", "yes")

    deepspeed, fsdp = flag("ACCELERATE_USE_DEEPSPEED"), flag("ACCELERATE_USE_FSDP")
    if not (deepspeed or fsdp) or flag("ACCELERATE_USE_CPU") or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if torch.accelerator.current_accelerator() is not None or PartialState._shared_state:
        return
    if deepspeed:
        _skip_deepspeed_shared_memory_op()
    state = PartialState(backend="gloo")
    if fsdp and not deepspeed and state.distributed_type == DistributedType.NO:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def end_run(accelerator: Any) -> None:
    """End a training run: its trackers finish, and the process group stays up.

    accelerate's ``end_training`` also destroys the group. A process that goes on after a run (``sdpo
    online``'s next round, several runs in one launch) then starts it again over the launcher's store,
    and that second rendezvous hangs now and then: one rank finds its peer's old address and waits in
    its first barrier (1 of 3 two-process online runs here). The process's exit ends the group
    (``close_process_group``, called by the ``sdpo`` command).
    """
    for tracker in accelerator.trackers:
        tracker.finish()


def close_process_group() -> None:
    """Destroy the default process group if this process started one (at exit, as torch asks)."""
    import sys

    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def uses_fsdp(accelerator: Any) -> bool:
    """Whether accelerate runs this process under FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def parameters_are_sharded(accelerator: Any) -> bool:
    """Whether the policy's parameters are split over processes (FSDP, DeepSpeed), so that a forward
    pass needs every process, not only the main one."""
    from accelerate.utils import DistributedType

    return accelerator.num_processes > 1 and accelerator.distributed_type in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
    )


def _skip_deepspeed_shared_memory_op() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory op at start-up (about 40 s, and a C++ compiler):
    only its inference all-reduce uses that op, training's collectives go through gloo either way. DeepSpeed
    keeps the table of buildable ops in one dict that it reads when its communication starts."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def set_deepspeed_batch_size(accelerator: Any, per_process: int) -> None:
    """Tell DeepSpeed the micro-batch size, the run's ``train_batch_size``: accelerate reads it from a
    prepared dataloader, and the trainer prepares none (its batch order is its own), so DeepSpeed's
    "auto" was refused. DeepSpeed only checks and reports it; the trainer's batches are what it trains on."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_process


class _Checkpointable(Protocol):
    """A denoiser with diffusers' switch (every family's is a diffusers model; ModelSpec types it as a
    plain torch module)."""

    def enable_gradient_checkpointing(self) -> None: ...


def enable_gradient_checkpointing(accelerator: Any, model: nn.Module) -> None:
    """Checkpoint activations: FSDP's way under FSDP (set before ``prepare``), the model's otherwise."""
    if uses_fsdp(accelerator):
        accelerator.state.fsdp_plugin.activation_checkpointing = True
    else:
        cast(_Checkpointable, model).enable_gradient_checkpointing()


def shard_like_policy(accelerator: Any, reference: nn.Module) -> nn.Module:
    """Shard the frozen reference with accelerate's own FSDP2 preparation, as the policy is sharded.

    The same wrap policy, extra units (accelerate gives the final norm its own) and mixed-precision
    policy, so both cast inputs and parameters at the same places. Upcasting touches only trainable
    parameters, so the frozen reference keeps the dtype it was copied in.
    """
    from accelerate.utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 2) != 2:
        raise InputError("full fine-tuning under FSDP needs fsdp_version: 2 in the accelerate config")
    plugin.set_auto_wrap_policy(reference)
    reference.to(accelerator.device)
    return fsdp2_prepare_model(accelerator, reference)


def clip_gradients(accelerator: Any, params: list[nn.Parameter], max_norm: float) -> Tensor | None:
    """Clip the gradients to ``max_norm`` (0: no clip) and return their global norm as a plain tensor.

    FSDP2 returns the norm as a DTensor (made whole here); DeepSpeed clips inside its engine and may
    report nothing: None, "unknown", which the non-finite guard must not count as a bad step.
    """
    norm = accelerator.clip_grad_norm_(params, max_norm or math.inf)
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm).detach().float().cpu()
