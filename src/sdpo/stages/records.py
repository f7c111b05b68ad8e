"""Small file helpers shared by the stages: atomic writes, the candidates file and the prompts file.

Every reader here names the file and line of what it cannot use: a torn line, a non-UTF-8 byte, a
number that is not finite, a media path that leaves its folder. A stage never starts work on a file it
would trip over later.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sdpo.errors import InputError, MissingFileError
from sdpo.files import write_atomic

CANDIDATES_FILE = "candidates.jsonl"
"""The candidates manifest inside a generate output folder."""

_MEDIA_KEYS = ("path", "pixels", "frames")
"""Record fields holding a path relative to the candidates folder."""


def read_text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, blank lines left out; a non-UTF-8 byte is one line
    naming the file, the line and the byte."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); save the file as UTF-8") from None
    return [(number, line) for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1)
            if line.strip()]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 is valid JSON, but parses to infinity
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json_line(where: str, line: str) -> Any:
    """One JSON value, strictly (NaN and Infinity are not JSON, and a number too large for a float is
    refused rather than read as infinity): a torn or invalid line names ``where``."""
    try:
        return json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: invalid JSON ({error.msg} at column {error.colno}): is the line cut short?") from None
    except (ValueError, RecursionError) as error:
        raise InputError(f"{where}: invalid JSON ({' '.join(str(error).split())[:120] or 'nested too deeply'})") from None


def read_json_file(path: str | os.PathLike[str], what: str = "file") -> dict[str, Any]:
    """A JSON object file (a stage's settings): one line naming the file when it is not one."""
    path = Path(path)
    text = "\n".join(line for _, line in read_text_lines(path))
    data = parse_json_line(str(path), text) if text.strip() else None
    if not isinstance(data, dict):
        raise InputError(f"{path}: the {what} is not a JSON object (torn or edited?): move it away and run again")
    return data


def _is_finite_number(value: Any) -> bool:
    """A number (not a bool) that is a finite float: an integer of 400 digits is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_record(where: str, record: Any, folder: Path, root: Path | None) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object per line")
    for key, kind in (("prompt", str), ("prompt_index", int), ("candidate_index", int), ("path", str)):
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{where}: {key!r} must be {'a string' if kind is str else 'an integer'}, "
                             f"got {value!r:.80}")
    total = record.get("total")
    if total is not None and not _is_finite_number(total):
        raise InputError(f"{where}: 'total' must be a finite number (or absent), got {total!r:.80}")
    scores = record.get("scores", {})
    if not isinstance(scores, dict):
        raise InputError(f"{where}: 'scores' must be an object of reward -> number, got {scores!r:.80}")
    for name, value in scores.items():
        if not _is_finite_number(value):
            raise InputError(f"{where}: score {name!r} must be a finite number, got {value!r:.80}")
    for key in _MEDIA_KEYS:
        if record.get(key) is not None:
            check_inside(where, key, record[key], folder, root)
    return record


def check_inside(where: str, key: str, value: Any, folder: Path, root: Path | None = None) -> Path:
    """``value``, a media path relative to ``folder``, resolved; it must stay inside ``folder`` (no absolute
    path, no ``..`` out of it), or inside ``root`` when the user names one (then absolute paths may too)."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InputError(f"{where}: {key!r} must be a non-empty path string, got {value!r:.80}")
    resolved = (folder / value).resolve()
    inside = (root or folder).resolve()
    if (root is None and Path(value).is_absolute()) or not resolved.is_relative_to(inside):
        raise InputError(f"{where}: {key} {value!r:.120} is outside {root or folder}: media paths must stay "
                         "inside their folder (or inside the folder named with --media-root)")
    return resolved


def read_records(folder: str | os.PathLike[str], media_root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The records of ``folder/candidates.jsonl``, each checked (see the module docstring); media paths
    must stay inside ``media_root`` (default: ``folder``)."""
    path = Path(folder) / CANDIDATES_FILE
    if not path.is_file():
        raise MissingFileError(f"no {CANDIDATES_FILE} in {folder}: run `sdpo generate --out {folder}` first")
    root = Path(media_root) if media_root is not None else None
    records = [_check_record(f"{path}:{number}", parse_json_line(f"{path}:{number}", line), Path(folder), root)
               for number, line in read_text_lines(path)]
    if not records:
        raise InputError(f"{path} is empty: run `sdpo generate --out {folder}` again to rebuild it")
    return records


def write_records(folder: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    """Rewrite ``folder/candidates.jsonl`` atomically."""
    text = "".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)
    return write_atomic(Path(folder) / CANDIDATES_FILE, text)


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL with a "prompt" key."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompts file not found: {path}")
    lines = read_text_lines(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        prompts = []
        for number, line in lines:
            record = parse_json_line(f"{path}:{number}", line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise InputError(f"{path}:{number}: each line needs a string \"prompt\"")
            prompts.append(record["prompt"])
    else:
        prompts = [line.strip() for _, line in lines]
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts
