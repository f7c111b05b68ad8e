"""Preference pairs and the two on-disk formats they are read from.

* A JSONL manifest: one object per line, ``{"prompt": str, "chosen": path, "rejected": path, ...}``.
  Paths are relative to the manifest's folder (or absolute) and name an image file, a video file or
  a folder of frame images. Any other key is kept in :attr:`PreferencePair.metadata`.
* The Pick-a-Pic layout: one parquet file, or a folder of them, with the columns ``jpg_0``, ``jpg_1``
  (encoded image bytes), ``label_0`` (1.0 when image 0 is preferred, 0.0 when image 1 is, 0.5 for a
  tie) and ``caption``. Images stay in the parquet files (:class:`ParquetImage` points at one cell)
  because the full data set is far larger than memory.

Readers check everything they can without decoding media and fail with one line that names the file
and the line (JSONL, 1-based) or row (parquet, 0-based within the file).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
"""File suffixes read as still images."""
VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".gif"})
"""File suffixes read as video clips (a folder of frame images is a clip too)."""

MediaKind = Literal["image", "video"]

PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
"""Columns a Pick-a-Pic parquet file must have."""

_JSONL_KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class ParquetImage:
    """One encoded image stored in a parquet cell (the Pick-a-Pic layout)."""

    path: Path
    """The parquet file."""
    row_group: int
    """Row group holding the row; images are read one row group at a time."""
    index: int
    """Row within the row group."""
    row: int
    """Row within the file (0-based), for messages."""
    column: str
    """Column holding the encoded bytes (``jpg_0`` or ``jpg_1``)."""

    def __str__(self) -> str:
        return f"{self.path} row {self.row} column {self.column}"


MediaRef = Path | ParquetImage | bytes
"""Where one image or clip comes from: a file or frame folder, a parquet cell, or encoded image bytes."""


@dataclass
class PreferencePair:
    """One prompt with a preferred (chosen) and a dispreferred (rejected) image or clip."""

    prompt: str
    chosen: MediaRef
    rejected: MediaRef
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else the source had for this pair (extra JSONL keys, parquet columns); not used in training."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"empty prompt in preference pair (chosen={self.chosen!s:.80})")
        if isinstance(self.chosen, str):
            self.chosen = Path(self.chosen)
        if isinstance(self.rejected, str):
            self.rejected = Path(self.rejected)


class PairList(list):
    """The pairs a reader found, plus how many rows it skipped and why (``skipped``: reason -> count)."""

    def __init__(self, pairs: Iterable[PreferencePair] = (), skipped: dict[str, int] | None = None) -> None:
        super().__init__(pairs)
        self.skipped: dict[str, int] = dict(skipped or {})


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``frame2`` before ``frame10`` (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a frame folder, in natural name order (``f2.png`` before ``f10.png``)."""
    frames = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(frames, key=lambda p: natural_key(p.name))


def media_kind(ref: MediaRef) -> MediaKind:
    """``"image"`` or ``"video"`` for a media reference, from its suffix (folders are frame clips).

    Raises ValueError for a suffix that is neither, or a folder without frame images.
    """
    if isinstance(ref, (ParquetImage, bytes)):
        return "image"
    path = Path(ref)
    if path.is_dir():
        if not frame_files(path):
            raise ValueError(f"frame folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): {path}")
        return "video"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    known = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
    raise ValueError(f"unknown media type {suffix or '(no suffix)'!r} for {path} (expected {known} or a frame folder)")


# --------------------------------------------------------------------------------------------- readers


def detect_format(source: str | os.PathLike[str]) -> Literal["jsonl", "pickapic"]:
    """Which reader handles ``source``: a ``.jsonl`` manifest, or parquet file(s) in the Pick-a-Pic layout.

    A folder is Pick-a-Pic when it holds ``*.parquet`` files, and JSONL when it holds ``pairs.jsonl``.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"pair source not found: {path}")
    if path.is_dir():
        if any(path.glob("*.parquet")):
            return "pickapic"
        if (path / "pairs.jsonl").is_file():
            return "jsonl"
        raise ValueError(f"{path}: folder holds neither *.parquet files (Pick-a-Pic) nor pairs.jsonl")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "pickapic"
    raise ValueError(f"{path}: unknown pair format {suffix!r} (expected a .jsonl manifest or .parquet files)")


def read_pairs(
    source: str | os.PathLike[str], *, skip_ties: bool = True, skip_empty_prompts: bool = False
) -> PairList:
    """Read preference pairs from a JSONL manifest or Pick-a-Pic parquet file(s), detecting which.

    ``skip_ties`` (Pick-a-Pic only): drop rows labelled 0.5; when False they are kept with image 0 as
    "chosen" and ``metadata["tie"] = True``. ``skip_empty_prompts``: drop pairs whose prompt is empty
    instead of failing. What was skipped is logged and returned in ``PairList.skipped``.
    """
    path = Path(source)
    kind = detect_format(path)
    if kind == "jsonl":
        if path.is_dir():
            path = path / "pairs.jsonl"
        pairs = read_jsonl_pairs(path, skip_empty_prompts=skip_empty_prompts)
    else:
        pairs = read_pickapic_pairs(path, skip_ties=skip_ties, skip_empty_prompts=skip_empty_prompts)
    if pairs.skipped:
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(pairs.skipped.items()))
        logger.info("read %d pairs from %s (skipped %s)", len(pairs), source, detail)
    else:
        logger.info("read %d pairs from %s", len(pairs), source)
    return pairs


def read_jsonl_pairs(path: str | os.PathLike[str], *, skip_empty_prompts: bool = False) -> PairList:
    """Read a JSONL manifest (see the module docstring); checks that every media file exists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair manifest not found: {path}")
    base = path.parent
    pairs = PairList()
    empty_prompts = 0
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for key in _JSONL_KEYS:
                if key not in record:
                    raise ValueError(f"{where}: missing key {key!r} (each line needs prompt, chosen, rejected)")
            prompt = record["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
            if not prompt.strip():
                if skip_empty_prompts:
                    empty_prompts += 1
                    continue
                raise ValueError(f"{where}: empty prompt")
            chosen = _manifest_media(record["chosen"], "chosen", base, where)
            rejected = _manifest_media(record["rejected"], "rejected", base, where)
            if chosen == rejected:
                raise ValueError(f"{where}: chosen and rejected are the same file: {chosen}")
            chosen_kind, rejected_kind = media_kind(chosen), media_kind(rejected)
            if chosen_kind != rejected_kind:
                raise ValueError(f"{where}: chosen is {chosen_kind} but rejected is {rejected_kind}")
            metadata = {key: value for key, value in record.items() if key not in _JSONL_KEYS}
            pairs.append(PreferencePair(prompt, chosen, rejected, metadata))
    if empty_prompts:
        pairs.skipped["empty prompt"] = empty_prompts
    if not pairs:
        raise ValueError(f"{path}: no pairs at all" + (f" ({empty_prompts} had empty prompts)" if empty_prompts else ""))
    return pairs


def _manifest_media(value: Any, key: str, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty path string")
    media = Path(value).expanduser()
    if not media.is_absolute():
        media = base / media
    if not media.exists():
        raise FileNotFoundError(f"{where}: {key} file not found: {media}")
    try:
        media_kind(media)
    except ValueError as error:
        raise ValueError(f"{where}: {key}: {error}") from None
    return media


def read_pickapic_pairs(
    source: str | os.PathLike[str], *, skip_ties: bool = True, skip_empty_prompts: bool = False
) -> PairList:
    """Read Pick-a-Pic parquet file(s): a single file, or every ``*.parquet`` in a folder (sorted).

    Only the small columns are read here; images are decoded later from their :class:`ParquetImage`.
    Rows with ``has_label`` false (unlabelled) or ``are_different`` false (identical images) are
    skipped when those optional columns exist, since neither carries a preference.
    """
    import pyarrow.parquet as pq

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"Pick-a-Pic source not found: {path}")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no *.parquet files")
    pairs = PairList()
    skipped = {"tie": 0, "unlabelled": 0, "identical images": 0, "empty prompt": 0}
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise ValueError(f"{file}: not a readable parquet file ({error})") from None
        names = parquet.schema_arrow.names
        for column in PICKAPIC_COLUMNS:
            if column not in names:
                raise ValueError(f"{file}: missing column {column!r} (Pick-a-Pic needs {', '.join(PICKAPIC_COLUMNS)})")
        # Everything but the image bytes is small: keep it as metadata for provenance.
        small = [name for name in names if name not in ("jpg_0", "jpg_1")]
        row = 0
        for group in range(parquet.num_row_groups):
            records = parquet.read_row_group(group, columns=small).to_pylist()
            for index, record in enumerate(records):
                where = f"{file} row {row}"
                row += 1
                if record.get("has_label") is False:
                    skipped["unlabelled"] += 1
                    continue
                if record.get("are_different") is False:
                    skipped["identical images"] += 1
                    continue
                label = record["label_0"]
                if not isinstance(label, (int, float)) or isinstance(label, bool) or label not in (0.0, 0.5, 1.0):
                    raise ValueError(f"{where}: label_0 must be 1.0, 0.0 or 0.5 (tie), got {label!r}")
                caption = record["caption"]
                if caption is not None and not isinstance(caption, str):
                    raise ValueError(f"{where}: caption must be a string, got {type(caption).__name__}")
                if not caption or not caption.strip():
                    if skip_empty_prompts:
                        skipped["empty prompt"] += 1
                        continue
                    raise ValueError(f"{where}: empty prompt (caption); pass skip_empty_prompts=True to skip such rows")
                label = float(label)
                metadata = {key: value for key, value in record.items() if key != "caption"}
                if label == 0.5:
                    if skip_ties:
                        skipped["tie"] += 1
                        continue
                    metadata["tie"] = True
                first = ParquetImage(file, group, index, row - 1, "jpg_0")
                second = ParquetImage(file, group, index, row - 1, "jpg_1")
                chosen, rejected = (second, first) if label == 0.0 else (first, second)
                pairs.append(PreferencePair(caption, chosen, rejected, metadata))
    pairs.skipped = {reason: count for reason, count in skipped.items() if count}
    if not pairs:
        detail = ", ".join(f"{count} {reason}" for reason, count in pairs.skipped.items())
        raise ValueError(f"{path}: no pairs at all" + (f" (skipped {detail})" if detail else ""))
    return pairs


# --------------------------------------------------------------------------------------------- writer


def write_pairs_jsonl(pairs: Iterable[PreferencePair], path: str | os.PathLike[str]) -> Path:
    """Write pairs as a JSONL manifest, atomically (a temporary file renamed over ``path``).

    A relative media path is taken as relative to the manifest's folder (as readers take it) and
    written unchanged; an absolute one inside that folder is made relative, so the folder can be
    moved as a whole, and any other stays absolute. Metadata keys become extra keys of each line.
    Only file and folder media can be written (not parquet cells or in-memory bytes); whether the
    files exist is the reader's concern, so pairs can be written before their media.
    """
    path = Path(path)
    base = path.parent.resolve()
    lines = []
    for number, pair in enumerate(pairs):
        record: dict[str, Any] = {"prompt": pair.prompt}
        for key in ("chosen", "rejected"):
            media = getattr(pair, key)
            if not isinstance(media, (str, os.PathLike)):
                raise ValueError(f"pair {number}: {key} is {type(media).__name__}, only file paths can be written to JSONL")
            record[key] = _relative_to(Path(media), base)
        for key, value in pair.metadata.items():
            if key in _JSONL_KEYS:
                raise ValueError(f"pair {number}: metadata key {key!r} clashes with a manifest key")
            record[key] = value
        try:
            lines.append(json.dumps(record, ensure_ascii=False))
        except (TypeError, ValueError) as error:
            raise ValueError(f"pair {number}: metadata is not JSON-serialisable ({error})") from None
    if not lines:
        raise ValueError(f"no pairs to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _relative_to(media: Path, base: Path) -> str:
    if not media.is_absolute():
        return media.as_posix()
    try:
        return media.resolve().relative_to(base).as_posix()
    except ValueError:
        return str(media)
