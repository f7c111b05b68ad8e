"""``sdpo pairs GEN --from-labels``: the raters' answers as ``pairs.jsonl``, in the format ``sdpo pairs`` writes.

For every labelled pair of candidates, each rater's answer that counts (:mod:`sdpo.human.answers`)
is a vote: for one candidate, for a tie, or a skip (no vote). The plurality decides: the candidate
with strictly the most votes (ties counted as their own option) is chosen; a tie plurality, a
pair with no strict plurality ("no majority") and a pair only skipped make no pair, and are counted.
A pair on which raters voted for both sides is a contradiction (counted; resolved by the plurality).

Each pair line: ``prompt``, ``chosen``, ``rejected`` (media paths) and as metadata ``votes_chosen``,
``votes_rejected``, ``votes_tie``, ``raters`` and ``gap`` = (chosen - rejected votes) / votes (1 when
unanimous; ``pair_weighting: gap`` weighs by it). A summary (counts and the raters' agreement,
:mod:`sdpo.human.agreement`) is written beside the manifest as ``<name>.summary.json``.
Unpaired answers (thumbs up / down) make no pairs; they are counted.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdpo.errors import InputError, MissingFileError
from sdpo.files import write_atomic
from sdpo.human.agreement import Agreement, agreement
from sdpo.human.answers import answers_files, effective_answers, read_answers
from sdpo.human.label import labels_folder

_PAIR_ID = re.compile(r"p(\d{5})-c(\d{3})-c(\d{3})")


@dataclass(frozen=True)
class LabelPairsSummary:
    """What ``pairs_from_labels`` wrote."""

    out: Path
    pairs: int
    """Pairs written."""
    raters: list[str]
    """Raters whose paired answers were read."""
    items: int
    """Candidate pairs with at least one answer."""
    counts: dict[str, int] = field(default_factory=dict)
    """"tie", "no majority", "skipped" (pairs that made no pair), "contradictions", "contradictions resolved",
    "tie answers", "skip answers", "unpaired answers" (not used)."""
    agreement: Agreement | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


def read_votes(gen: Path, order: dict[str, int]) -> tuple[dict[str, dict[str, tuple[str, str]]], int,
                                                         dict[str, list[str]]]:
    """(rater -> item -> (choice, chosen path or ""), unpaired answers, item -> its two media paths ordered by
    ``order`` (path -> candidate index); an answer naming media not in ``order`` is InputError."""
    votes: dict[str, dict[str, tuple[str, str]]] = {}
    unpaired = 0
    sides: dict[str, list[str]] = {}
    for path in answers_files(labels_folder(gen)):
        header, records = read_answers(path)
        answers = effective_answers(records)
        if header["mode"] != "paired":
            unpaired += len(answers)
            continue
        mine = votes.setdefault(str(header["rater"]), {})
        for answer in answers.values():
            if not _PAIR_ID.fullmatch(answer.item) or len(answer.shown) != 2:
                raise InputError(f"{path}: answer {answer.seq} is not of a candidate pair ({answer.item!r:.40})")
            unknown = [media for media in answer.shown if media not in order]
            if unknown:
                raise InputError(f"{path}: answer {answer.seq} names {unknown[0]!r:.80}, which is not a candidate "
                                 f"of {gen}: are these this folder's answers?")
            left, right = answer.shown
            mine[answer.item] = (answer.choice, {"left": left, "right": right}.get(answer.choice, ""))
            sides.setdefault(answer.item, sorted(answer.shown, key=order.__getitem__))
    return votes, unpaired, sides


def pairs_from_labels(gen: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> LabelPairsSummary:
    """Write the pairs of ``gen``'s answers files to ``out`` (default ``gen/pairs.jsonl``) (see the module doc)."""
    from sdpo.data.pairs import PreferencePair, write_pairs_jsonl
    from sdpo.folders import check_owned_file
    from sdpo.stages.records import check_inside, read_records

    folder = Path(gen)
    out_path = Path(out) if out is not None else folder / "pairs.jsonl"
    check_owned_file(out_path, "pairs")
    if not answers_files(labels_folder(folder)):
        raise MissingFileError(f"no answers in {labels_folder(folder)}: label first with `sdpo label {folder}`")
    records = read_records(folder)
    order = {record["path"]: record["candidate_index"] for record in records}
    prompts = {record["prompt_index"]: record["prompt"] for record in records}
    votes, unpaired, sides = read_votes(folder, order)
    counts: Counter[str] = Counter({"unpaired answers": unpaired})
    pairs = []
    for item in sorted(sides):
        first, second = sides[item]
        ballots: Counter[str] = Counter()
        for rater_votes in votes.values():
            if item in rater_votes:
                choice, chosen = rater_votes[item]
                ballots[{"tie": "tie", "skip": "skip"}.get(choice, chosen)] += 1
        counts["tie answers"] += ballots["tie"]
        counts["skip answers"] += ballots["skip"]
        if ballots[first] and ballots[second]:
            counts["contradictions"] += 1
        winner = decide(ballots, first, second)
        if winner not in (first, second):
            counts[winner] += 1
            continue
        chosen, rejected = (first, second) if winner == first else (second, first)
        if ballots[first] and ballots[second]:
            counts["contradictions resolved"] += 1
        total = ballots[first] + ballots[second] + ballots["tie"]
        prompt_index = int(item[1:6])
        pairs.append(PreferencePair(prompts[prompt_index], check_inside(item, "chosen", chosen, folder),
                                    check_inside(item, "rejected", rejected, folder),
                                    {"votes_chosen": ballots[chosen], "votes_rejected": ballots[rejected],
                                     "votes_tie": ballots["tie"], "raters": total,
                                     "gap": (ballots[chosen] - ballots[rejected]) / total}))
    ratings = {rater: {item: _category(choice, chosen, sides[item]) for item, (choice, chosen) in mine.items()
                       if choice != "skip"} for rater, mine in votes.items()}
    summary = LabelPairsSummary(out_path, len(pairs), sorted(votes), len(sides),
                                {key: counts[key] for key in sorted(counts)}, agreement(ratings))
    if not pairs:
        raise InputError(f"no pairs: no labelled pair has a winner ({dict(summary.counts)})")
    write_pairs_jsonl(pairs, out_path)
    write_atomic(summary_path(out_path), json.dumps(summary.as_dict(), indent=2, sort_keys=True) + "\n")
    return summary


def decide(ballots: Counter[str], first: str, second: str) -> str:
    """The plurality of one pair's votes: ``first`` or ``second`` (the winning candidate), else why there
    is no pair: "tie", "no majority" or "skipped" (see the module docstring)."""
    options = {key: ballots[key] for key in (first, second, "tie") if ballots[key]}
    if not options:
        return "skipped"
    best = max(options.values())
    winners = [key for key, count in options.items() if count == best]
    return winners[0] if len(winners) == 1 else "no majority"


def _category(choice: str, chosen: str, sides: list[str]) -> str:
    """A vote as one of "first", "second" (by candidate index) or "tie", for the agreement figures."""
    if choice == "tie":
        return "tie"
    return "first" if chosen == sides[0] else "second"


def summary_path(out: Path) -> Path:
    """Where the summary of the manifest ``out`` goes."""
    return out.with_name(out.stem + ".summary.json")


__all__ = ["LabelPairsSummary", "decide", "pairs_from_labels", "read_votes", "summary_path"]
