"""LoRA plumbing the specs share: which target names exist, the adapter config saved beside the weights,
the checks of a run folder before loading from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from sdpo.errors import InputError, MissingFileError
from sdpo.models.base import unwrap


def existing_suffixes(model: nn.Module, candidates: tuple[str, ...]) -> list[str]:
    """The entries of ``candidates`` that name at least one Linear layer of ``model`` (as peft matches them).

    peft matches a string target ``s`` against module names equal to ``s`` or ending in ``"." + s``.
    """
    names = [name for name, module in unwrap(model).named_modules() if isinstance(module, nn.Linear)]
    found = [s for s in candidates if any(name == s or name.endswith("." + s) for name in names)]
    if not found:
        raise InputError(f"none of the LoRA targets {candidates} exist in {type(unwrap(model)).__name__}")
    return found


def lora_adapter_metadata(model: nn.Module) -> dict[str, Any] | None:
    """The LoraConfig of the adapter being saved, as a dict diffusers stores beside the weights.

    With it, ``load_lora_weights`` rebuilds the exact config (``lora_alpha`` included) instead of
    guessing ``alpha = rank`` from the tensor shapes.
    """
    configs = getattr(unwrap(model), "peft_config", None)
    if not configs:
        return None
    config = configs.get("default") or next(iter(configs.values()))
    return config.to_dict()


def checked_lora_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a Path, once it exists and (a folder) holds safetensors weights; else MissingFileError."""
    path = Path(folder)
    if not path.exists():
        raise MissingFileError(f"LoRA folder not found: {path}")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise MissingFileError(f"no LoRA weights (*.safetensors) in {path}: is it a finished training run?")
    return path
