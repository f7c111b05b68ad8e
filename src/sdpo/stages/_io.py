"""Small file helpers shared by the stages: atomic writes and the candidates file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sdpo.errors import InputError, MissingFileError
from sdpo.files import write_atomic

CANDIDATES_FILE = "candidates.jsonl"
"""The candidates manifest inside a generate output folder."""


def read_records(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``folder/candidates.jsonl`` (FileNotFoundError naming it when missing)."""
    path = Path(folder) / CANDIDATES_FILE
    if not path.is_file():
        raise MissingFileError(f"no {CANDIDATES_FILE} in {folder}: run `sdpo generate --out {folder}` first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_records(folder: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    """Rewrite ``folder/candidates.jsonl`` atomically."""
    text = "".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)
    return write_atomic(Path(folder) / CANDIDATES_FILE, text)


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or JSONL with a "prompt" key."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompts file not found: {path}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        prompts = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise InputError(f"{path}:{number}: each line needs a string \"prompt\"")
            prompts.append(record["prompt"])
    else:
        prompts = [line.strip() for line in lines]
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts
