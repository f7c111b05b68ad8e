"""`sdpo score`: every candidate of a generate folder scored by one or more rewards.

Each reward's score goes to ``scores[reward.name]`` of the candidate's record in
``candidates.jsonl`` and the weighted sum of all rewards to ``total``. The file is rewritten
atomically every ``SAVE_EVERY_S`` seconds, on an error and at the end, and candidates already
scored by a reward are skipped, so a killed run continues where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdpo.errors import FolderError, InputError
from sdpo.rewards.base import Reward
from sdpo.rewards.combine import Normalize, combine_scores
from sdpo.stages.checks import check_finite, check_positive
from sdpo.stages.generate import load_pixels
from sdpo.stages.records import read_records, write_records

SAVE_EVERY_S = 10.0
"""Seconds between rewrites of candidates.jsonl while scoring: rewriting it after every batch would
cost O(candidates^2) writes on a large folder. An error or Ctrl-C saves at once; a SIGKILL loses at
most this much scoring."""


@dataclass(frozen=True)
class ScoreSummary:
    """What ``score`` did."""

    candidates: int
    """Candidates in the folder."""
    scored: dict[str, int]
    """Reward name -> candidates scored by this call."""
    weights: dict[str, float]
    """Reward name -> weight in ``total``."""


def _score_batch(folder: Path, reward: Reward, batch: list[dict[str, Any]]) -> None:
    """Score one batch of candidate records in place (``record["scores"][reward.name]``)."""
    media = torch.stack([load_pixels(folder, r) for r in batch])
    with torch.no_grad():
        values = reward.score(media, [r["prompt"] for r in batch]).detach().float().cpu().flatten()
    if values.numel() != len(batch) or not torch.isfinite(values).all():
        raise InputError(f"reward {reward.name!r} returned {tuple(values.shape)} (non-finite or not one "
                         f"score per sample) for a batch of {len(batch)}")
    for record, value in zip(batch, values.tolist(), strict=True):
        record.setdefault("scores", {})[reward.name] = value


def _check_reward_settings(folder: Path, records: list[dict[str, Any]], names: list[str],
                           options: dict[str, dict[str, Any]], rescore: bool) -> None:
    """Refuse scores made with other reward options (or, with ``rescore``, drop them); then record the
    options in the marker. Old scores are dropped on disk before the marker names the new options."""
    from sdpo.folders import first_difference, read_marker, update_marker

    marker = read_marker(folder) or {}
    recorded = dict(marker.get("scored_with") or {})
    wanted = {name: dict(options.get(name) or {}) for name in names}
    if rescore:
        for record in records:
            for name in names:
                record.get("scores", {}).pop(name, None)
            record["total"] = None
        write_records(folder, records)
    else:
        for name in names:
            if name not in recorded or not any(name in r.get("scores", {}) for r in records):
                continue  # not scored yet, or scored before options were recorded
            found = first_difference(name, recorded[name], wanted[name])
            if found is not None:
                raise FolderError(f"{folder} was scored by {name!r} with other options ({found[0]}: was {found[1]}, "
                                  f"now {found[2]}): pass --rescore to score every candidate again, or the same "
                                  f"options to keep the scores")
    update_marker(folder, scored_with={**recorded, **wanted})


def _media_kind(record: dict[str, Any]) -> str:
    return "video" if str(record["path"]).endswith(".mp4") or record.get("frames") else "image"


def score(
    candidates_dir: str | Path,
    rewards: list[Reward],
    weights: list[float] | None = None,
    *,
    batch_size: int = 8,
    normalize: Normalize = "raw",
    progress: bool = True,
    reward_options: dict[str, dict[str, Any]] | None = None,
    rescore: bool = False,
    media_root: str | Path | None = None,
) -> ScoreSummary:
    """Score every candidate under ``candidates_dir`` with each reward (see the module docstring).

    ``normalize`` is how each reward enters ``total``: "raw", or "zscore" over the candidates of one
    prompt (rewards on different scales then weigh as their weights say). ``media_root``: the folder
    the records' media paths must stay inside (default ``candidates_dir``).

    ``reward_options`` (reward name -> the options its factory was given; default none) are recorded in
    the folder's marker with the scores. Scores a reward made with other options are never kept
    silently: without ``rescore`` that reward is refused (FolderError naming the option and both
    values); ``rescore`` scores every candidate again with the rewards given.
    """
    from tqdm.auto import tqdm

    folder = Path(candidates_dir)
    records = read_records(folder, media_root)
    if not rewards:
        raise InputError("no reward given")
    check_positive("batch_size", batch_size)
    weights = [check_finite(f"weight {number}", value) for number, value in enumerate(weights, start=1)] \
        if weights is not None else [1.0] * len(rewards)
    if len(weights) != len(rewards):
        raise InputError(f"{len(weights)} weight(s) for {len(rewards)} reward(s): give one weight per reward")
    names = [reward.name for reward in rewards]
    if normalize not in ("raw", "zscore"):
        raise InputError(f"normalize must be 'raw' or 'zscore', got {normalize!r}")
    if len(set(names)) != len(names):
        raise InputError(f"reward names repeat: {', '.join(names)}")
    kind = _media_kind(records[0])
    for reward in rewards:
        if reward.media != kind:
            raise InputError(f"reward {reward.name!r} scores {reward.media}s, but {folder} holds {kind}s")
    _check_reward_settings(folder, records, names, reward_options or {}, rescore)
    scored = {}
    saved_at = time.monotonic()
    try:
        for reward in rewards:
            todo = [r for r in records if reward.name not in r.get("scores", {})]
            scored[reward.name] = len(todo)
            for start in tqdm(range(0, len(todo), batch_size), desc=f"score {reward.name}", disable=not progress):
                _score_batch(folder, reward, todo[start:start + batch_size])
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    write_records(folder, records)
                    saved_at = time.monotonic()
    except BaseException:
        write_records(folder, records)  # keep what was scored: a rerun continues from it
        raise
    table = dict(zip(names, weights, strict=True))
    parts = {name: torch.tensor([record["scores"][name] for record in records], dtype=torch.float64) for name in names}
    totals = combine_scores(parts, table, [record["prompt_index"] for record in records], normalize)
    for record, total in zip(records, totals.tolist(), strict=True):
        record["total"] = total
    write_records(folder, records)
    return ScoreSummary(len(records), scored, table)
