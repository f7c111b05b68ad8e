"""Does a LoRA run folder fit a model? Read from the folder's own records, before the model loads.

A training run folder holds ``train_config.json`` (its family and base model) and the adapter weights,
whose safetensors header carries the adapter's config (rank, targets) beside the tensors' shapes. A
LoRA of another family, or whose header disagrees with its weights, is one line here instead of a
traceback from inside peft after minutes of loading. What only the loaded model can tell (a rank or a
width that does not match its layers) is caught by :func:`load_lora_checked` as one line too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sdpo.errors import InputError
from sdpo.models.base import ModelSpec

DENOISER_PREFIX = {"sd": "unet", "sdxl": "unet", "cogvideox": "transformer", "wan": "transformer"}
"""The key prefix of a diffusers family's LoRA weights (the denoiser's subfolder)."""

METADATA_KEY = "lora_adapter_metadata"
"""Where diffusers keeps the adapter config in the weights file's header."""


def _weights_file(folder: Path) -> Path | None:
    if folder.is_file():
        return folder
    preferred = folder / "pytorch_lora_weights.safetensors"
    if preferred.is_file():
        return preferred
    return next(iter(sorted(folder.glob("*.safetensors"))), None)


def _recorded_family(folder: Path) -> str | None:
    path = folder / "train_config.json"
    if not path.is_file():
        return None
    try:
        family = json.loads(path.read_text(encoding="utf-8")).get("family")
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise InputError(f"{path}: not a readable training config (JSON object)") from None
    return family if isinstance(family, str) else None


def _header(weights: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as handle:
            return dict(handle.metadata() or {}), {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a torn or foreign file
        raise InputError(f"{weights}: not a readable safetensors file ({' '.join(str(error).split())[:120]})") from None


def _adapter_configs(metadata: dict[str, str], weights: Path) -> list[dict[str, Any]]:
    configs: list[Any] = []
    for key, text in metadata.items():
        if not key.endswith(METADATA_KEY):
            continue
        try:
            config = json.loads(text)
        except ValueError:
            raise InputError(f"{weights}: the adapter config in its header ({key}) is not JSON") from None
        configs.extend(config.values() if isinstance(config, dict) and all(
            isinstance(v, dict) for v in config.values()) and "r" not in config else [config])
    return [config for config in configs if isinstance(config, dict)]


def check_lora_fits(folder: str | os.PathLike[str], family: str, label: str | None = None) -> None:
    """Raise InputError when the LoRA at ``folder`` was trained for another family, or its header's rank
    disagrees with its weights; a folder that records nothing passes (the load itself then decides)."""
    folder = Path(folder)
    label = label or str(folder)
    recorded = _recorded_family(folder) if folder.is_dir() else None
    if recorded is not None and recorded != family:
        raise InputError(f"{label} is a LoRA of the {recorded} family, not {family}: give --family "
                         f"{recorded} with its base model, or a run trained on {family}")
    weights = _weights_file(folder)
    if weights is None:
        return
    metadata, shapes = _header(weights)
    prefix = DENOISER_PREFIX.get(family)
    if prefix and shapes and not any(key.startswith(f"{prefix}.") for key in shapes):
        other = sorted({key.split(".", 1)[0] for key in shapes})
        raise InputError(f"{label}: its weights are for a {'/'.join(other)}, but the {family} model's "
                         f"denoiser is a {prefix}: is it a LoRA of another family?")
    ranks = {shape[0] for key, shape in shapes.items() if "lora_A" in key or "lora.down" in key}
    for config in _adapter_configs(metadata, weights):
        rank = config.get("r")
        if isinstance(rank, int) and ranks and ranks != {rank} and not config.get("rank_pattern"):
            raise InputError(f"{label}: its adapter config says rank {rank} but its weights have rank "
                             f"{', '.join(map(str, sorted(ranks)))}: the folder is torn or mixed; retrain or re-export it")


def load_lora_checked(spec: ModelSpec, folder: str | os.PathLike[str]) -> None:
    """``spec.load_lora(folder)``; a LoRA whose shapes do not fit the loaded model is one line naming both."""
    try:
        spec.load_lora(folder)
    except (RuntimeError, ValueError, KeyError) as error:
        if isinstance(error, InputError):
            raise
        text = " ".join(str(error).split())
        if not any(word in text for word in ("size mismatch", "shape", "Target modules", "not found", "rank")):
            raise
        raise InputError(f"the LoRA {folder} does not fit the {spec.family} model {spec.pretrained}"
                         f" (another base model, rank or targets?): {text[:200]}") from error


__all__ = ["check_lora_fits", "load_lora_checked"]
