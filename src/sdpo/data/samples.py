"""Labelled samples: one image or clip with a desirable / undesirable label, no pairing (Diffusion-KTO's data).

The on-disk form is a JSONL manifest, ``samples.jsonl`` by default, one object per line::

    {"prompt": str, "media": path, "desirable": true | false, "score": float | null, ...}

``media`` is relative to the manifest's folder (or absolute) and names an image file, a video file or a
folder of frame images; ``score`` is what a score-based label came from (null for a person's label);
any other key is kept in :attr:`LabelledSample.metadata`. `sdpo pairs --strategy threshold | quantile`
writes it from scored candidates and `sdpo pairs LABELS --from-labels` from thumbs-up / down answers;
`sdpo precompute` turns it into a samples cache (``sdpo.data.cache.samples``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo.errors import InputError, MissingFileError
from sdpo.files import write_atomic

SAMPLES_KIND = "samples"
"""The ``kind`` a samples manifest line may carry, and a samples cache's manifest does."""
_KEYS = ("prompt", "media", "desirable", "score")


@dataclass
class LabelledSample:
    """One prompt with one image or clip, labelled desirable or undesirable."""

    prompt: str
    media: Path
    """The image file, video file or frame folder."""
    desirable: bool
    """True: thumbs up (or scored above the threshold); False: thumbs down."""
    score: float | None = None
    """The score the label was derived from, or None for a person's label."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else the line had (not used in training)."""


def is_samples_manifest(path: str | os.PathLike[str]) -> bool:
    """Whether a JSONL file's first line is a labelled sample (has ``media`` and ``desirable``), not a pair."""
    try:
        with Path(path).open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        record = json.loads(first) if first else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and "media" in record and "desirable" in record


def write_samples_jsonl(samples: Iterable[LabelledSample], path: str | os.PathLike[str]) -> Path:
    """Write samples as a JSONL manifest, atomically; media inside the manifest's folder are written relative."""
    path = Path(path)
    base = path.parent.resolve()
    lines = []
    for number, sample in enumerate(samples):
        clash = set(sample.metadata) & set(_KEYS)
        if clash:
            raise InputError(f"sample {number}: metadata key {sorted(clash)[0]!r} clashes with a manifest key")
        media = Path(sample.media)
        try:
            where = media.resolve().relative_to(base).as_posix() if media.is_absolute() else media.as_posix()
        except ValueError:
            where = str(media)
        record = {"prompt": sample.prompt, "media": where, "desirable": bool(sample.desirable),
                  "score": sample.score, **sample.metadata}
        lines.append(json.dumps(record, ensure_ascii=False))
    if not lines:
        raise InputError(f"no samples to write to {path}")
    return write_atomic(path, "\n".join(lines) + "\n")


def read_samples(path: str | os.PathLike[str]) -> list[LabelledSample]:
    """The samples of a JSONL manifest; every bad line is listed in one InputError before anything is used."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"samples manifest not found: {path}")
    base = path.parent
    samples, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            samples.append(_parse(json.loads(line), base))
        except (json.JSONDecodeError, InputError) as error:
            problems.append(f"line {number}: {error}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise InputError(f"{path}: {'; '.join(problems[:5])}{more}")
    if not samples:
        raise InputError(f"{path} holds no samples")
    return samples


def _parse(record: Any, base: Path) -> LabelledSample:
    if not isinstance(record, dict):
        raise InputError("not a JSON object")
    missing = [key for key in ("prompt", "media", "desirable") if key not in record]
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    prompt, media, desirable, score = (record.get(key) for key in _KEYS)
    if not isinstance(prompt, str) or not isinstance(media, str) or not media:
        raise InputError("prompt and media must be strings")
    if not isinstance(desirable, bool):
        raise InputError(f"desirable must be true or false, got {desirable!r}")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not math.isfinite(score)):
        raise InputError(f"score must be a finite number or null, got {score!r}")
    where = Path(media) if Path(media).is_absolute() else base / media
    if not where.exists():
        raise InputError(f"media not found: {where}")
    return LabelledSample(prompt, where, desirable, None if score is None else float(score),
                          {k: v for k, v in record.items() if k not in _KEYS})
