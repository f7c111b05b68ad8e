"""The exponential moving average of the trained weights (``ema_decay``), through diffusers' ``EMAModel``.

The average covers exactly the trainable parameters (the LoRA adapters, or every denoiser weight for
full fine-tuning), lives on their device in float32, and is keyed by their names in the unwrapped
model, so that a checkpoint stores it as ``ema.safetensors`` beside ``trainable.safetensors`` (its
update count in ``trainer_state.json``) and the export writes it in the same formats as the raw
weights. Under FSDP or DeepSpeed, where each process holds only a shard of the parameters, it is
refused (one line at set-up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.errors import InputError, MissingFileError
from sdpo.models.base import unwrap

EMA_NAME = "ema.safetensors"
"""The moving average inside ``checkpoint-N/``."""
EMA_FOLDER = "ema"
"""Where the export writes the averaged weights inside the run folder."""


def build_ema(config: Any, params: list[nn.Parameter]) -> Any:
    """diffusers' ``EMAModel`` of ``params`` as ``config`` asks (None when ``config.ema_decay`` is 0)."""
    if config.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=config.ema_decay, use_ema_warmup=config.ema_warmup, power=config.ema_power,
                    foreach=True)


def check_ema_supported(config: Any, sharded: bool) -> None:
    """Refuse ``ema_decay`` where the parameters are sharded (each process would average a shard)."""
    if config.ema_decay > 0 and sharded:
        raise InputError("ema_decay is not supported under FSDP or DeepSpeed (each process holds a shard of the "
                         "weights); train with one process or DDP, or set ema_decay to 0")


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters in the unwrapped model, in ``parameters()`` order (the EMA's order)."""
    return [name for name, p in unwrap(model).named_parameters() if p.requires_grad]


def ema_weights(ema: Any, model: nn.Module) -> dict[str, Tensor]:
    """The averaged weights by parameter name, on the CPU (what checkpoints and the export store)."""
    names = trainable_names(model)
    if len(names) != len(ema.shadow_params):
        raise InputError(f"the moving average holds {len(ema.shadow_params)} tensors for {len(names)} trainable "
                         f"parameters")
    return {name: shadow.detach().cpu().contiguous() for name, shadow in zip(names, ema.shadow_params, strict=True)}


def save_ema(ema: Any, model: nn.Module, folder: Path) -> None:
    """Write the averaged weights to ``folder/ema.safetensors`` (the update count goes in the trainer state)."""
    from safetensors.torch import save_file

    save_file(ema_weights(ema, model), str(folder / EMA_NAME))


def load_ema(ema: Any, model: nn.Module, checkpoint: Path, updates: Any) -> None:
    """Restore the average saved in ``checkpoint`` and its update count ``updates`` (from the trainer state)."""
    from safetensors.torch import load_file

    path = checkpoint / EMA_NAME
    if not path.is_file() or not isinstance(updates, int):
        raise MissingFileError(f"{checkpoint} holds no moving average ({EMA_NAME} and ema_updates in its trainer "
                                f"state), though ema_decay is set: resume with the ema_decay it was made with")
    tensors = load_file(str(path))
    names = trainable_names(model)
    missing = [name for name in names if name not in tensors]
    if missing or len(tensors) != len(names):
        raise InputError(f"{path} does not fit this model (missing {missing[:3]}): was it made with another "
                         f"lora_rank / lora_target_modules?")
    with torch.no_grad():
        for shadow, name in zip(ema.shadow_params, names, strict=True):
            shadow.copy_(tensors[name])
    ema.optimization_step = updates


def averaged_state_dict(ema: Any, model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` (the model's full state) with every trainable weight replaced by its average."""
    averaged = ema_weights(ema, model)
    unknown = sorted(set(averaged) - set(state_dict))
    if unknown:
        raise InputError(f"the model's state dict has no entry for trained weights {unknown[:3]}")
    return {**state_dict, **averaged}
