"""Checks of the stages' arguments and values that need no model: they run before one loads.

On a real video model loading costs minutes, so every mistake that can be seen from the command line
alone (a zero batch size, a size the family cannot sample, a file where a folder belongs, a run name
that would overwrite the base's results, a number that is not finite) is one line first.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import typing
from pathlib import Path
from typing import Any

from sdpo.errors import ConfigError, InputError, MissingFileError, UnwritableError

SPATIAL_MULTIPLE = {"sd": 8, "sdxl": 8, "cogvideox": 16, "wan": 16}
"""Height and width of each diffusers family's media must be multiples of this (VAE downsampling 8, times
the transformer's patch size 2 for the video families). The embedded worlds check their own folders."""

MIN_FREE_BYTES = 1 << 20
"""An output folder on a disk with less free space than this is refused before any work."""


def check_positive(flag: str, value: int | None) -> None:
    """``value`` (an integer flag; None when not given) is at least 1."""
    if value is not None and value < 1:
        raise InputError(f"{flag} must be at least 1, got {value}")


def check_finite(what: str, value: Any) -> float:
    """``value`` as a float, which must be a finite number (not NaN, not inf, not a string or a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{what} must be a number, got {value!r:.80}")
    if not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value}")
    return float(value)


def check_size(family: str, height: int | None, width: int | None, frames: int | None) -> None:
    """--height/--width/--frames are positive and, for a family whose rule is known without its model,
    multiples of its spatial factor."""
    for flag, value in (("--height", height), ("--width", width), ("--frames", frames)):
        check_positive(flag, value)
    multiple = SPATIAL_MULTIPLE.get(family)
    for flag, value in (("--height", height), ("--width", width)):
        if multiple and value is not None and value % multiple:
            lower = max(multiple, value - value % multiple)
            raise InputError(f"{flag} {value}: the {family} model needs a multiple of {multiple} "
                             f"(e.g. {lower} or {lower + multiple})")


def check_out_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """An output folder: not an existing file, and its nearest existing folder writable with free space."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder: name a folder")
    _check_writable(path, flag)
    return path


def check_out_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """An output file: not an existing folder, in a folder that is writable with free space."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder: name the file to write, e.g. {path / 'pairs.jsonl'}")
    _check_writable(path.parent, flag)
    return path


def _check_writable(folder: Path, flag: str) -> None:
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            return
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UnwritableError(f"{flag} {folder}: {existing} is not writable")
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise InputError(f"{flag} {folder}: the disk holding {existing} is full ({free} bytes free)")


def check_run_name(name: str) -> None:
    """An evaluate run name: not the base's, not the noise tensor's, and usable in a file name."""
    if name in ("base", "noise"):
        raise InputError(f"--run {name}=...: the name {name!r} is taken by the evaluation itself; pick another")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise InputError(f"--run {name}=...: a run name is part of file names (grid-NAME.png): no '/', '\\' "
                         "or leading '.'")


def check_lora_folder(folder: str | os.PathLike[str], family: str, label: str | None = None) -> Path:
    """A LoRA run folder that exists, holds weights, and fits ``family`` (see :mod:`sdpo.models.lora_check`);
    ``label`` names it in messages as the user typed it (default ``--lora FOLDER``)."""
    from sdpo.models.lora_check import check_lora_fits

    path = Path(folder)
    label = label or f"--lora {path}"
    if not path.exists():
        raise MissingFileError(f"{label}: no such folder")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise MissingFileError(f"{label}: no LoRA weights (*.safetensors) in it: is it a finished training run?")
    check_lora_fits(path, family, label)
    return path


def check_config_types(config: Any, where: str = "config") -> None:
    """Every field of the dataclass ``config`` holds a value of its annotated type, strictly: the string
    "false" is not a bool, a bool is not a number, a string is not a float. ``where`` names the source."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _is_instance(value, hints[field.name]):
            raise ConfigError(f"{where}: {field.name} must be {_type_name(hints[field.name])}, got {value!r:.80}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: {field.name} must be a finite number, got {value}")


def _is_instance(value: Any, hint: Any) -> bool:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:  # the type of its values; which value is the config's own check
        return _is_instance(value, type(arguments[0]))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_instance(value, argument) for argument in arguments)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if hint is Any:
        return True
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return _type_name(type(arguments[0]))
    if arguments and typing.get_origin(hint) is not dict:
        return " or ".join(_type_name(argument) for argument in arguments)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, "a mapping" if typing.get_origin(hint) is dict else str(hint))


__all__ = ["MIN_FREE_BYTES", "SPATIAL_MULTIPLE", "check_config_types", "check_finite", "check_lora_folder",
           "check_out_file", "check_out_folder", "check_positive", "check_run_name", "check_size"]
