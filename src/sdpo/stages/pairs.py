"""`sdpo pairs`: preference pairs from scored candidates, in the JSONL manifest format precompute reads.

Each pair line has ``prompt``, ``chosen``, ``rejected`` (media paths) plus ``chosen_score``,
``rejected_score`` and ``gap`` (kept by the reader as metadata). Strategies, per prompt:
``best-worst`` (the best against the worst candidate) and ``margin`` (every candidate pair whose
gap is above ``margin``). Ties and gaps not above ``margin`` are skipped and counted.
With ``frames=True`` the pairs point at the clips' PNG frame folders (``generate(...,
frame_folders=True)``) instead of the MP4s: lossless, as the MP4 codec is not.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo.data.pairs import PreferencePair, write_pairs_jsonl
from sdpo.errors import InputError
from sdpo.folders import check_owned_file
from sdpo.stages.checks import check_finite
from sdpo.stages.records import read_records

STRATEGIES = ("best-worst", "margin")


@dataclass(frozen=True)
class PairsSummary:
    """What ``build_pairs`` wrote."""

    out: Path
    """The manifest written."""
    pairs: int
    """Pairs written."""
    prompts: int
    """Prompts with at least two scored candidates."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Why candidate pairs were skipped ("tie", "gap below margin") -> count."""


def _candidate_pairs(group: list[dict[str, Any]], strategy: str) -> list[tuple[dict, dict]]:
    ranked = sorted(group, key=lambda r: (-r["total"], r["candidate_index"]))
    if strategy == "best-worst":
        return [(ranked[0], ranked[-1])]
    return list(itertools.combinations(ranked, 2))


def build_pairs(
    candidates_dir: str | Path, strategy: str = "best-worst", margin: float = 0.0, out: str | Path | None = None,
    *, frames: bool = False, media_root: str | Path | None = None,
) -> PairsSummary:
    """Write pairs of ``candidates_dir``'s scored candidates to ``out`` (default ``candidates_dir/pairs.jsonl``);
    ``frames``: point at the frame folders (see the module docstring); ``media_root``: the folder the
    records' media paths must stay inside (default ``candidates_dir``)."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if check_finite("margin", margin) < 0:
        raise InputError(f"margin must be >= 0, got {margin}")
    folder = Path(candidates_dir)
    out_path = Path(out) if out is not None else folder / "pairs.jsonl"
    check_owned_file(out_path, "pairs")  # never over candidates.jsonl, a manifest, ... (sdpo.folders)
    records = read_records(folder, media_root)
    unscored = [r for r in records if r.get("total") is None]
    if unscored:
        raise InputError(f"{len(unscored)} candidate(s) in {folder} are not scored: run `sdpo score {folder}` first")
    key = "frames" if frames else "path"
    if frames and any(not r.get("frames") for r in records):
        raise InputError(f"{folder} has candidates without frame folders: generate with frame_folders=True")
    groups: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["prompt_index"], []).append(record)
    pairs: list[PreferencePair] = []
    skipped: dict[str, int] = {}
    for index in sorted(groups):
        if len(groups[index]) < 2:
            continue
        for chosen, rejected in _candidate_pairs(groups[index], strategy):
            gap = chosen["total"] - rejected["total"]
            if gap <= margin:
                reason = "tie" if gap == 0 else "gap below margin"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            pairs.append(PreferencePair(chosen["prompt"], (folder / chosen[key]).resolve(),
                                        (folder / rejected[key]).resolve(),
                                        {"chosen_score": chosen["total"], "rejected_score": rejected["total"],
                                         "gap": gap}))
    if not pairs:
        raise InputError(f"no pairs: every candidate pair was skipped ({skipped or 'fewer than 2 per prompt'})")
    write_pairs_jsonl(pairs, out_path)
    return PairsSummary(out_path, len(pairs), sum(len(g) > 1 for g in groups.values()), skipped)


def build_cross_pairs(
    chosen_dir: str | Path, rejected_dir: str | Path, out: str | Path, *, frames: bool = False
) -> PairsSummary:
    """Pairs across two generators: per prompt, the best candidate of ``chosen_dir`` against the worst of
    ``rejected_dir`` (both generated from the same prompts list and scored with the same rewards).

    This is how off-policy data arises in practice (a stronger model's samples as winners, a weaker
    one's as losers). A prompt whose best chosen candidate does not score above the worst rejected one
    is skipped and counted as "not preferred".
    """
    check_owned_file(out, "pairs")
    sources = []
    for folder in (Path(chosen_dir), Path(rejected_dir)):
        records = read_records(folder)
        if any(r.get("total") is None for r in records):
            raise InputError(f"candidates in {folder} are not scored: run `sdpo score {folder}` first")
        groups: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            groups.setdefault(record["prompt_index"], []).append(record)
        sources.append((folder, groups))
    (chosen_folder, chosen_groups), (rejected_folder, rejected_groups) = sources
    key = "frames" if frames else "path"
    pairs: list[PreferencePair] = []
    skipped: dict[str, int] = {}
    for index in sorted(set(chosen_groups) & set(rejected_groups)):
        chosen = _candidate_pairs(chosen_groups[index], "best-worst")[0][0]
        rejected = _candidate_pairs(rejected_groups[index], "best-worst")[0][1]
        if chosen["prompt"] != rejected["prompt"]:
            raise InputError(f"prompt {index} differs between {chosen_folder} and {rejected_folder}: "
                             "generate both from the same prompts file")
        gap = chosen["total"] - rejected["total"]
        if gap <= 0:
            skipped["not preferred"] = skipped.get("not preferred", 0) + 1
            continue
        pairs.append(PreferencePair(chosen["prompt"], (chosen_folder / chosen[key]).resolve(),
                                    (rejected_folder / rejected[key]).resolve(),
                                    {"chosen_score": chosen["total"], "rejected_score": rejected["total"], "gap": gap}))
    if not pairs:
        raise InputError(f"no pairs: no prompt of {chosen_folder} beat {rejected_folder} ({skipped})")
    write_pairs_jsonl(pairs, Path(out))
    return PairsSummary(Path(out), len(pairs), len(pairs) + sum(skipped.values()), skipped)
