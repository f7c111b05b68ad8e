"""``sdpo label GEN``: a rater's session over a generate folder's candidates.

Answers go to ``GEN/labels/<rater>.jsonl`` (:mod:`sdpo.human.answers`); the header records the mode
and the queue's settings (seed, pairs per prompt), so a restart resumes the same queue where the
rater stopped, and a second rater gets a file of their own.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdpo.errors import FolderError, MissingFileError
from sdpo.human.answers import AnswersFile, check_rater
from sdpo.human.queue import label_items
from sdpo.human.session import Session

LABELS_DIR = "labels"
"""Folder of the answers files inside a generate folder."""


def labels_folder(gen: str | os.PathLike[str]) -> Path:
    return Path(gen) / LABELS_DIR


def open_label_session(gen: str | os.PathLike[str], rater: str, *, unpaired: bool = False,
                       pairs_per_prompt: int | None = None, seed: int = 0) -> Session:
    """The session of ``rater`` on the generate folder ``gen`` (created, or resumed from their file)."""
    from sdpo.folders import folder_kind, saved_settings
    from sdpo.stages.records import read_records

    folder = Path(gen)
    if not folder.is_dir():
        raise MissingFileError(f"no folder {folder}: run `sdpo generate --out {folder}` first")
    kind = folder_kind(folder)
    if kind != "generate":
        raise FolderError(f"{folder} holds {'a ' + kind if kind else 'no'} generate output: label a folder that "
                          "`sdpo generate --out` wrote")
    check_rater(rater)
    records = read_records(folder)
    mode = "unpaired" if unpaired else "paired"
    items = label_items(records, mode, pairs_per_prompt, seed)
    settings = {"seed": seed, "pairs_per_prompt": pairs_per_prompt, "items": len(items)}
    answers = AnswersFile(labels_folder(folder) / f"{rater}.jsonl", rater, mode, settings)
    fps = (saved_settings(folder, "generate", legacy="generate.json") or {}).get("fps", 8)
    what = "one candidate at a time" if unpaired else "which of the two is better?"
    return Session(folder, items, answers, title=f"{folder.name}: {what}", fps=int(fps) if fps else 8)


__all__ = ["LABELS_DIR", "labels_folder", "open_label_session"]
