"""What training under FSDP needs beyond ``accelerator.prepare``.

- Gradient checkpointing is FSDP's own activation checkpointing of the blocks it wraps. The model's
  built-in checkpointing recomputes a block inside FSDP's input casts and, for Wan (whose rotary
  tables stay float32), saves bf16 tensors that the recomputation makes in float32.
- A full fine-tune's frozen reference is sharded exactly like the policy, with the same
  mixed-precision policy, so that at step 0 both compute the same function (loss ln 2) and the
  reference's memory is split over the processes like the policy's. accelerate's ``prepare``
  insists on an optimizer next to each FSDP2 model, so the reference is sharded here directly.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def uses_fsdp(accelerator: Any) -> bool:
    """Whether accelerate runs this process under FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def enable_gradient_checkpointing(accelerator: Any, model: nn.Module) -> None:
    """Checkpoint activations: FSDP's way under FSDP (set before ``prepare``), the model's otherwise."""
    if uses_fsdp(accelerator):
        accelerator.state.fsdp_plugin.activation_checkpointing = True
    else:
        model.enable_gradient_checkpointing()


def _block_class_names(plugin: Any, model: nn.Module) -> set[str]:
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) or getattr(model, "_no_split_modules", None)
    return set(names or [])


def shard_like_policy(accelerator: Any, reference: nn.Module) -> nn.Module:
    """``fully_shard`` the reference per block and at the root, with the policy's plugin settings."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 2) != 2:
        raise ValueError("full fine-tuning under FSDP needs fsdp_version: 2 in the accelerate config")
    options: dict[str, Any] = {
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "reshard_after_forward": plugin.reshard_after_forward,
    }
    reference.to(accelerator.device)
    blocks = _block_class_names(plugin, reference)
    for module in reversed(list(reference.modules())[1:]):  # inner blocks before the ones holding them
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(reference, **options)
    return reference
