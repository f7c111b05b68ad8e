"""Each folder a stage writes knows what it is, so no command replaces or writes into another stage's work.

A stage marks its folder with ``.sdpo.json`` (:data:`MARKER`): ``kind`` (one of :data:`KINDS`), the
``settings`` that define its content and the ``versions`` of sdpo, torch and diffusers that made it.
The marker is written atomically and only once the stage has produced its first output, so a first
run that fails (a bad size, a missing model) never binds the folder to its settings.

Folders made before markers existed are recognised by the files their stage always wrote
(:func:`folder_kind`): a cache by its ``manifest.json``, a run by ``run_info.json`` / ``checkpoint-N``
/ its metrics, a generate folder by ``generate.json`` / ``candidates.jsonl``, an evaluation or demo by
its ``results.json``, an online folder by its ``round-NN`` folders. No existing file changes format.

Three checks, each one line (:class:`~sdpo.errors.FolderError`) naming what is there:

* :func:`check_replaceable`: before a deletion (``--overwrite``), the folder is missing, empty or of
  the same kind; anything else is refused and nothing is deleted.
* :func:`check_kind`: before writing into a folder, it is not another stage's folder.
* :func:`check_reuse`: a rerun continues the same job; other settings are refused naming the first
  field that differs and both values.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sdpo.errors import FolderError
from sdpo.files import write_atomic

MARKER = ".sdpo.json"
"""The marker file of a stage's folder."""

KINDS = ("generate", "cache", "run", "evaluation", "online", "demo")
"""The kinds of folder the stages write."""

OWNED_FILES = {
    "generate": ("generate.json", "candidates.jsonl", MARKER),
    "cache": ("manifest.json", MARKER),
    "run": ("run_info.json", "train_config.json", "metrics.jsonl", "trainer_state.json", MARKER),
    "evaluation": ("results.json", "report.md", "eval_samples.safetensors", MARKER),
    "online": (MARKER,),
    "demo": ("results.json", "report.md", "eval_samples.safetensors", MARKER),
}
"""Files a kind of folder owns: no other stage may write them."""

_RUN_NAMES = ("run_info.json", "train_config.json", "metrics.jsonl", "bad_steps.jsonl",
              "pytorch_lora_weights.safetensors", ".export-tmp")
_ROUND = re.compile(r"round-\d{2,}")
_CHECKPOINT = re.compile(r"checkpoint-\d+")


def versions() -> dict[str, str | None]:
    """The versions of sdpo, torch and diffusers installed (None where one is not)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("sdpo", "torch", "diffusers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of ``folder``, or None when it has none (or one that does not parse: a foreign file)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in KINDS else None


def write_marker(folder: str | os.PathLike[str], kind: str, settings: dict[str, Any], **extra: Any) -> Path:
    """Mark ``folder`` as a ``kind`` folder made with ``settings`` (atomically); ``extra`` keys are kept
    beside them (e.g. the reward settings of a generate folder's scores)."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    data = {"kind": kind, "settings": settings, "versions": versions(), **extra}
    return write_atomic(Path(folder) / MARKER, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def update_marker(folder: str | os.PathLike[str], **fields: Any) -> Path:
    """Set top-level ``fields`` of an existing marker (one is created for a legacy generate folder)."""
    marker = read_marker(folder) or {"kind": folder_kind(folder) or "generate", "settings": {}}
    marker.update(fields, versions=versions())
    return write_atomic(Path(folder) / MARKER, json.dumps(marker, indent=2, sort_keys=True, default=str) + "\n")


def folder_kind(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` holds: one of :data:`KINDS` from its marker or its stage's files, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    marker = read_marker(path)
    if marker is not None:
        return str(marker["kind"])
    names = {entry.name for entry in path.iterdir()}
    if "manifest.json" in names:
        return "cache"
    if names & {"generate.json", "candidates.jsonl"}:
        return "generate"
    if names & set(_RUN_NAMES) or any(_CHECKPOINT.fullmatch(name) for name in names):
        return "run"
    if "results.json" in names:
        return "demo" if "config" in _json_keys(path / "results.json") else "evaluation"
    if any(_ROUND.fullmatch(name) for name in names):
        return "online"
    return None


def _json_keys(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def describe(path: str | os.PathLike[str]) -> str:
    """What is in ``path``, for a message: its kind and a few of its entries."""
    path = Path(path)
    entries = sorted(entry.name for entry in path.iterdir() if not entry.name.startswith("."))
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    kind = folder_kind(path)
    what = f"{'an' if kind and kind[0] in 'aeiou' else 'a'} {kind} folder" if kind else "files of no sdpo stage"
    return f"{what} ({shown})" if shown else what


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _refuse_file(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise FolderError(f"{path} is a file, not a folder: choose a folder")


def check_replaceable(path: str | os.PathLike[str], kind: str, flag: str = "--overwrite") -> None:
    """Refuse (FolderError, nothing deleted) to replace ``path`` unless it is missing, empty or a ``kind`` folder."""
    path = Path(path)
    _refuse_file(path)
    if _is_empty(path) or folder_kind(path) == kind:
        return
    raise FolderError(f"{path} holds {describe(path)}: {flag} replaces only {_a(kind)} folder, so nothing was "
                      f"deleted; choose another folder")


def check_kind(path: str | os.PathLike[str], kind: str) -> None:
    """Refuse (FolderError) to write ``kind`` output into another stage's folder; unknown files are left alone."""
    path = Path(path)
    _refuse_file(path)
    found = folder_kind(path)
    if found is not None and found != kind:
        raise FolderError(f"{path} holds {describe(path)}, not {_a(kind)} folder: choose another folder")


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def check_owned_file(path: str | os.PathLike[str], writer: str) -> None:
    """Refuse (FolderError) to let the ``writer`` stage write ``path`` when the folder holding it is a
    stage's folder that owns a file of that name (e.g. ``pairs --out GEN/candidates.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        raise FolderError(f"{path} is a folder: {writer} writes a file; name a file")
    kind = folder_kind(path.parent)
    if kind is not None and path.name in OWNED_FILES.get(kind, ()):
        raise FolderError(f"{path} belongs to the {kind} folder {path.parent}; {writer} would write over it: "
                          f"name another file")


def saved_settings(path: str | os.PathLike[str], kind: str, legacy: str | None = None) -> dict[str, Any] | None:
    """The settings ``path``'s marker records for ``kind``, else those of its legacy settings file
    ``legacy`` (a JSON object), else None."""
    marker = read_marker(path)
    if marker is not None and marker.get("kind") == kind and isinstance(marker.get("settings"), dict) \
            and marker["settings"]:
        return marker["settings"]
    if legacy is not None:
        data = _json_object(Path(path) / legacy)
        if data is not None:
            return data
    return None


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_reuse(path: str | os.PathLike[str], kind: str, settings: dict[str, Any],
                saved: dict[str, Any] | None = None, hint: str = "use a new --out folder, or the same settings to "
                                                                  "resume") -> None:
    """A rerun in ``path`` continues the same job: refuse (FolderError) another stage's folder, or settings
    that differ from those recorded (``saved``; default: the marker's), naming the first differing field
    and both values. Only the keys of ``settings`` are compared, so a caller may check what it knows
    before a model loads and the rest later."""
    check_kind(path, kind)
    saved = saved if saved is not None else saved_settings(path, kind)
    if saved is None:
        return
    for key in sorted(settings):
        found = first_difference(key, saved.get(key, _ABSENT), settings[key])
        if found is not None:
            field, old, new = found
            raise FolderError(f"{path} holds {_a(kind)} run with other settings ({field}: was {old}, now {new}); "
                              f"{hint}")


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


_ABSENT = _Absent()


def first_difference(field: str, old: Any, new: Any) -> tuple[str, str, str] | None:
    """(dotted field, old value, new value) of the first place where ``old`` and ``new`` differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            name = key if isinstance(key, str) and key.isprintable() else json.dumps(key)  # one line
            found = first_difference(f"{field}.{name}", old.get(key, _ABSENT), new.get(key, _ABSENT))
            if found is not None:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        if len(old) != len(new):
            return field, f"{len(old)} entries", f"{len(new)} entries"
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            found = first_difference(f"{field}[{index}]", a, b)
            if found is not None:
                return found
        return None
    if old == new and isinstance(old, bool) == isinstance(new, bool):
        return None
    return field, _short(old), _short(new)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, _Absent) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = ["KINDS", "MARKER", "OWNED_FILES", "check_kind", "check_owned_file", "check_replaceable", "check_reuse",
           "describe", "first_difference", "folder_kind", "read_marker", "saved_settings", "update_marker",
           "versions", "write_marker"]
