"""A cached toy base-model folder: where it lives, what a complete one holds, and how it is checked.

The folder is diffusers-style (``unet/`` or ``transformer/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) with the marker ``sdpo_toy.json``, written last, that says it is complete and which
config (and world) it was trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sdpo.errors import InputError
from sdpo.toy.pretrain_settings import PretrainSettings

MARKER_FILE = "sdpo_toy.json"
"""Written last into a base-model folder: its presence marks the folder complete."""


class ToyCacheError(InputError):
    """A cached toy base-model folder is damaged or was made for another config."""


def corrupt_folder_error(folder: Path, why: str) -> ToyCacheError:
    """The error for a damaged cached base model, saying how to recover."""
    return ToyCacheError(f"toy base model folder {folder} is corrupt: {why}; delete it and run again to retrain it")


def default_cache_root() -> Path:
    """``$SDPO_CACHE`` if set, else ``~/.cache/sdpo``."""
    env = os.environ.get("SDPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdpo"


def base_folder(config: PretrainSettings, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the base model of ``config`` is (or will be) cached, under ``cache_root`` (default:
    ``default_cache_root()``)."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / config.folder_name()


def required_files(denoiser_subfolder: str) -> tuple[str, ...]:
    """Files that must exist in a complete folder; weights are checked further when read."""
    return (
        MARKER_FILE,
        f"{denoiser_subfolder}/config.json",
        f"{denoiser_subfolder}/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    )


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``sdpo_toy.json`` of a toy folder; ToyCacheError if missing, unreadable or incomplete."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError) as error:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} is missing or not valid JSON ({type(error).__name__})") from error
    if not isinstance(marker, dict) or marker.get("complete") is not True or "config" not in marker:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} does not mark a completed pretraining")
    return marker


def check_folder(
    folder: str | os.PathLike[str], config_class: type[PretrainSettings], config: PretrainSettings | None = None
) -> dict[str, Any]:
    """Validate a base-model folder of ``config_class``'s world without loading the models; returns its marker.

    Checks the marker (complete, of this world), that every required file exists and parses
    (safetensors headers, JSON; a truncated copy fails), that it holds a valid config and, given
    ``config``, that the folder was trained with it. Raises ToyCacheError otherwise.
    """
    from safetensors import safe_open

    folder = Path(folder)
    marker = read_marker(folder)
    world = config_class.world
    if marker.get("world") != world:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} is not a marker of world {world!r} "
                                           f"(world {marker.get('world')!r})")
    names = required_files(config_class.denoiser_subfolder)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise corrupt_folder_error(folder, f"missing {', '.join(missing)}")
    for name in names:
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as handle:
                    if not list(handle.keys()):
                        raise InputError("no tensors")
            elif name.endswith(".json"):
                json.loads((folder / name).read_text())
        except Exception as error:  # noqa: BLE001 - any read failure means the file is damaged
            raise corrupt_folder_error(folder, f"{name} is unreadable ({type(error).__name__})") from error
    try:
        stored = config_class.from_dict(marker["config"])
    except (TypeError, ValueError) as error:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} holds an invalid config ({error})") from error
    if config is not None and stored != config:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} holds a different config than its name's hash")
    return marker
