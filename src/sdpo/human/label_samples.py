"""``sdpo pairs GEN --from-labels`` on thumbs-up / down answers (``sdpo label --unpaired``): labelled samples.

Each candidate's answers that count (:mod:`sdpo.human.answers`) are votes, "up" or "down" ("skip" is no
vote); the strict plurality labels it desirable (up) or undesirable (down). A candidate with as many ups
as downs ("tie") or only skips ("skipped") is left out and counted. The samples are written in the format
``sdpo pairs --strategy threshold | quantile`` writes (``sdpo.data.samples``), ``score`` null and as metadata
``votes_up``, ``votes_down`` and ``raters``; no candidate is paired with another.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sdpo.errors import InputError
from sdpo.human.answers import answers_files, effective_answers, read_answers
from sdpo.human.label import labels_folder

_SAMPLE_ID = re.compile(r"p(\d{5})-c(\d{3})")


@dataclass(frozen=True)
class LabelSamplesSummary:
    """What ``samples_from_labels`` wrote."""

    out: Path
    desirable: int
    undesirable: int
    raters: list[str]
    """Raters whose unpaired answers were read."""
    counts: dict[str, int] = field(default_factory=dict)
    """"tie", "skipped" (candidates left out)."""


def unpaired_votes(gen: Path) -> tuple[dict[str, Counter[str]], dict[str, tuple[str, str]], list[str]]:
    """(item -> Counter of "up" / "down" / "skip", item -> (prompt, media path), raters) over ``gen``'s
    unpaired answers files."""
    votes: dict[str, Counter[str]] = {}
    shown: dict[str, tuple[str, str]] = {}
    raters = []
    for path in answers_files(labels_folder(gen)):
        header, records = read_answers(path)
        if header["mode"] != "unpaired":
            continue
        raters.append(str(header["rater"]))
        for answer in effective_answers(records).values():
            if not _SAMPLE_ID.fullmatch(answer.item) or len(answer.shown) != 1:
                raise InputError(f"{path}: answer {answer.seq} is not of one candidate ({answer.item!r:.40})")
            votes.setdefault(answer.item, Counter())[answer.choice] += 1
            shown.setdefault(answer.item, (answer.prompt, answer.shown[0]))
    return votes, shown, sorted(raters)


def has_unpaired_answers(gen: str | os.PathLike[str]) -> bool:
    """Whether any answers file of ``gen`` is of thumbs-up / down answers."""
    return any(read_answers(path)[0]["mode"] == "unpaired" for path in answers_files(labels_folder(Path(gen))))


def samples_from_labels(gen: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> LabelSamplesSummary:
    """Write the labelled samples of ``gen``'s unpaired answers to ``out`` (default ``gen/samples.jsonl``)."""
    from sdpo.data.samples import LabelledSample, write_samples_jsonl
    from sdpo.folders import check_owned_file
    from sdpo.stages.records import check_inside

    folder = Path(gen)
    out_path = Path(out) if out is not None else folder / "samples.jsonl"
    check_owned_file(out_path, "samples")
    votes, shown, raters = unpaired_votes(folder)
    counts: Counter[str] = Counter()
    samples = []
    for item in sorted(votes):
        up, down = votes[item]["up"], votes[item]["down"]
        if up == down:
            counts["tie" if up else "skipped"] += 1
            continue
        prompt, media = shown[item]
        samples.append(LabelledSample(prompt, check_inside(item, "media", media, folder), up > down, None,
                                      {"votes_up": up, "votes_down": down, "raters": up + down}))
    if not samples:
        raise InputError(f"no samples: no thumbs-up / down answer has a majority ({dict(counts) or 'no answers'})")
    write_samples_jsonl(samples, out_path)
    good = sum(sample.desirable for sample in samples)
    return LabelSamplesSummary(out_path, good, len(samples) - good, raters, dict(sorted(counts.items())))


__all__ = ["LabelSamplesSummary", "has_unpaired_answers", "samples_from_labels", "unpaired_votes"]
