"""`sdpo pairs --strategy threshold | quantile`: labelled samples (Diffusion-KTO's data) from scored candidates.

No candidate is paired with another: each is labelled on its own. Strategies:

* ``threshold``: a candidate scoring above ``threshold`` is desirable, below it undesirable; one exactly
  at the threshold is skipped (counted "at threshold").
* ``quantile``: per prompt, the top ``quantile`` share of its candidates (at least one) is desirable and
  the bottom share undesirable; the middle is left out. A prompt whose candidates all score the same is
  skipped ("tie"). With 2 candidates per prompt and quantile 0.5 these are best-worst's members, unpaired.

The manifest is ``samples.jsonl`` (``sdpo.data.samples``): prompt, media, desirable, score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo.data.samples import LabelledSample, write_samples_jsonl
from sdpo.errors import InputError
from sdpo.folders import check_owned_file
from sdpo.stages.checks import check_finite
from sdpo.stages.records import read_records

SAMPLE_STRATEGIES = ("threshold", "quantile")


@dataclass(frozen=True)
class SamplesSummary:
    """What ``build_samples`` wrote."""

    out: Path
    """The manifest written."""
    desirable: int
    """Samples labelled desirable."""
    undesirable: int
    """Samples labelled undesirable."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Why candidates were left out ("at threshold", "tie", "middle") -> count."""


def _scored_groups(folder: Path, media_root: str | Path | None = None) -> dict[int, list[dict[str, Any]]]:
    records = read_records(folder, media_root)
    unscored = [r for r in records if r.get("total") is None]
    if unscored:
        raise InputError(f"{len(unscored)} candidate(s) in {folder} are not scored: run `sdpo score {folder}` first")
    groups: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["prompt_index"], []).append(record)
    return groups


def _sample(folder: Path, record: dict[str, Any], desirable: bool, key: str) -> LabelledSample:
    return LabelledSample(record["prompt"], (folder / record[key]).resolve(), desirable, float(record["total"]))


def _quantile_count(size: int, quantile: float) -> int:
    return min(max(1, round(quantile * size)), size // 2)


def build_samples(
    candidates_dir: str | Path, strategy: str = "quantile", *, threshold: float | None = None,
    quantile: float = 0.25, out: str | Path | None = None, frames: bool = False, media_root: str | Path | None = None,
) -> SamplesSummary:
    """Label ``candidates_dir``'s scored candidates one by one and write ``out`` (default
    ``candidates_dir/samples.jsonl``); ``frames``: point at the clips' frame folders."""
    if strategy not in SAMPLE_STRATEGIES:
        raise InputError(f"unknown sample strategy {strategy!r}; choose one of {', '.join(SAMPLE_STRATEGIES)}")
    if strategy == "threshold" and threshold is None:
        raise InputError("--strategy threshold needs --threshold X (desirable above X, undesirable below)")
    if strategy == "threshold":
        check_finite("threshold", threshold)
    if not (0 < check_finite("quantile", quantile) <= 0.5):
        raise InputError(f"quantile must be in (0, 0.5], got {quantile}")
    folder = Path(candidates_dir)
    out_path = Path(out) if out is not None else folder / "samples.jsonl"
    check_owned_file(out_path, "samples")
    groups = _scored_groups(folder, media_root)
    key = "frames" if frames else "path"
    samples: list[LabelledSample] = []
    skipped: dict[str, int] = {}
    for index in sorted(groups):
        ranked = sorted(groups[index], key=lambda r: (-r["total"], r["candidate_index"]))
        if strategy == "threshold":
            for record in ranked:
                if record["total"] == threshold:
                    skipped["at threshold"] = skipped.get("at threshold", 0) + 1
                else:
                    samples.append(_sample(folder, record, record["total"] > threshold, key))  # type: ignore[operator]
            continue
        count = _quantile_count(len(ranked), quantile)
        if count == 0 or ranked[0]["total"] == ranked[-1]["total"]:
            reason = "tie" if count else "fewer than 2 candidates"
            skipped[reason] = skipped.get(reason, 0) + len(ranked)
            continue
        samples += [_sample(folder, r, True, key) for r in ranked[:count]]
        samples += [_sample(folder, r, False, key) for r in ranked[-count:]]
        if len(ranked) > 2 * count:
            skipped["middle"] = skipped.get("middle", 0) + len(ranked) - 2 * count
    return _write(samples, out_path, skipped)


def build_cross_samples(desirable_dir: str | Path, undesirable_dir: str | Path, out: str | Path, *,
                        quantile: float = 0.5, frames: bool = False) -> SamplesSummary:
    """Labelled samples across two generators: per prompt, the top ``quantile`` of ``desirable_dir``'s
    candidates as desirable and the bottom ``quantile`` of ``undesirable_dir``'s as undesirable (the
    unpaired counterpart of ``build_cross_pairs``, which ``sdpo bench methods`` uses off-policy)."""
    check_owned_file(out, "samples")
    if not (0 < check_finite("quantile", quantile) <= 0.5):
        raise InputError(f"quantile must be in (0, 0.5], got {quantile}")
    key = "frames" if frames else "path"
    good_folder, bad_folder = Path(desirable_dir), Path(undesirable_dir)
    good, bad = _scored_groups(good_folder), _scored_groups(bad_folder)
    samples: list[LabelledSample] = []
    for index in sorted(set(good) & set(bad)):
        best = sorted(good[index], key=lambda r: (-r["total"], r["candidate_index"]))
        worst = sorted(bad[index], key=lambda r: (-r["total"], r["candidate_index"]))
        samples += [_sample(good_folder, r, True, key) for r in best[: max(1, round(quantile * len(best)))]]
        samples += [_sample(bad_folder, r, False, key) for r in worst[-max(1, round(quantile * len(worst))):]]
    return _write(samples, Path(out), {})


def _write(samples: list[LabelledSample], out: Path, skipped: dict[str, int]) -> SamplesSummary:
    if not samples:
        raise InputError(f"no samples: every candidate was left out ({skipped or 'no scored candidates'})")
    write_samples_jsonl(samples, out)
    good = sum(s.desirable for s in samples)
    return SamplesSummary(out, good, len(samples) - good, skipped)
