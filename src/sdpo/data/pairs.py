"""Preference pairs and the two on-disk formats they are read from.

* A JSONL manifest: one object per line, ``{"prompt": str, "chosen": path, "rejected": path, ...}``.
  Paths are relative to the manifest's folder (or absolute) and name an image file, a video file or
  a folder of frame images. Any other key is kept in :attr:`PreferencePair.metadata`.
* The Pick-a-Pic layout: one parquet file, or a folder of them, with the columns ``jpg_0``, ``jpg_1``
  (encoded image bytes), ``label_0`` (1.0 when image 0 is preferred, 0.0 when image 1 is, 0.5 for a
  tie) and ``caption``. Images stay in the parquet files (:class:`ParquetImage` points at one cell)
  because the full data set is far larger than memory.

Readers check everything they can without decoding media, reading the whole source before they
raise: a BadPairsError lists every bad line (JSONL, 1-based) or row (parquet, 0-based within the
file), one line each with the file. ``on_bad_pair="skip"`` skips them instead; every skipped pair,
and why, is kept in ``PairList.problems`` (Pick-a-Pic ties and unlabelled rows are always skipped
and recorded there too), so precompute can record them in the cache manifest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sdpo.errors import InputError, MissingFileError
from sdpo.files import write_atomic

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
    source: str | None = field(default=None, compare=False, repr=False)
    """The manifest or parquet file the pair was read from (None for a pair made in code), for messages."""
    line: int | None = field(default=None, compare=False, repr=False)
    """Its line in a JSONL manifest (1-based) or row in a parquet file (0-based), for messages."""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError(f"empty prompt in preference pair (chosen={self.chosen!s:.80})")
        if isinstance(self.chosen, str):
            self.chosen = Path(self.chosen)
        if isinstance(self.rejected, str):
            self.rejected = Path(self.rejected)

    @property
    def where(self) -> str:
        """``file:line`` (JSONL) or ``file row N`` (parquet), or "" for a pair made in code."""
        return _where(self.source, self.line)


def _where(source: str | None, line: int | None) -> str:
    if source is None:
        return "" if line is None else f"pair {line}"  # a pair made in code: its position in the list
    if line is None:
        return source
    return f"{source} row {line}" if source.endswith(".parquet") else f"{source}:{line}"


@dataclass(frozen=True)
class PairProblem:
    """A pair (a manifest line, a parquet row) that was skipped or cannot be used, and why."""

    source: str | None
    """The manifest or parquet file (None for a pair made in code)."""
    line: int | None
    """JSONL line (1-based) or parquet row (0-based); None when not known."""
    kind: str
    """A short category, the key of the skip counts: "tie", "empty prompt", "bad line", "missing file", ..."""
    reason: str
    """What is wrong, in words (one line)."""
    bad: bool = field(default=True, compare=False)
    """False for a pair skipped by design (a tie, an unlabelled row, an empty prompt with
    ``skip_empty_prompts``), True for bad data that the "fail" policy refuses."""

    @property
    def where(self) -> str:
        """``file:line`` or ``file row N`` (see :attr:`PreferencePair.where`)."""
        return _where(self.source, self.line)

    def describe(self) -> str:
        """One line: where, then why."""
        return f"{self.where}: {self.reason}" if self.where else self.reason

    def to_json(self) -> dict[str, Any]:
        """The entry recorded in a cache manifest's ``skipped`` list."""
        return {"source": self.source, "line": self.line, "kind": self.kind, "reason": self.reason}


MAX_LISTED_PROBLEMS = 20
"""How many problems an error message lists one per line before it says "... and N more"."""


class BadPairsError(InputError):
    """Pairs that cannot be used; the message lists every one (file and line), ``problems`` holds them."""

    def __init__(self, problems: Sequence[PairProblem], hint: str = "") -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0].describe() + (f" ({hint})" if hint else "")
        else:
            shown = [f"  {problem.describe()}" for problem in self.problems[:MAX_LISTED_PROBLEMS]]
            if len(self.problems) > MAX_LISTED_PROBLEMS:
                shown.append(f"  ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
            message = f"{len(self.problems)} bad pairs" + (f" ({hint})" if hint else "") + ":\n" + "\n".join(shown)
        super().__init__(message)


class MissingMediaError(BadPairsError, FileNotFoundError):
    """Every bad pair names a media file that does not exist."""


def raise_problems(problems: Sequence[PairProblem], hint: str = "") -> None:
    """Raise BadPairsError (MissingMediaError when every problem is a missing file) for ``problems``, if any."""
    if not problems:
        return
    kind = MissingMediaError if all(problem.kind == "missing file" for problem in problems) else BadPairsError
    raise kind(problems, hint)


SKIP_HINT = "fix the data, or skip bad pairs with on_bad_pair='skip' / --on-bad-pair skip"

OnBadPair = Literal["fail", "skip"]
"""What to do with a pair that cannot be used: stop with every problem listed, or skip it and record why."""


class PairList(list):
    """The pairs a reader found, plus what it skipped: ``problems`` (each with where and why) and
    ``skipped`` (kind -> count)."""

    def __init__(
        self,
        pairs: Iterable[PreferencePair] = (),
        skipped: dict[str, int] | None = None,
        problems: Iterable[PairProblem] = (),
    ) -> None:
        super().__init__(pairs)
        self.problems: list[PairProblem] = list(problems)
        self.skipped: dict[str, int] = dict(skipped or {})
        for problem in self.problems:
            if skipped is None:
                self.skipped[problem.kind] = self.skipped.get(problem.kind, 0) + 1

    def skip(self, problem: PairProblem) -> None:
        """Record a skipped pair."""
        self.problems.append(problem)
        self.skipped[problem.kind] = self.skipped.get(problem.kind, 0) + 1


def check_policy(on_bad_pair: str) -> OnBadPair:
    """``on_bad_pair`` itself when it is "fail" or "skip"; ValueError otherwise."""
    if on_bad_pair not in ("fail", "skip"):
        raise InputError(f"on_bad_pair must be 'fail' or 'skip', got {on_bad_pair!r}")
    return on_bad_pair  # type: ignore[return-value]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``frame2`` before ``frame10`` (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a frame folder, in natural name order (``f2.png`` before ``f10.png``)."""
    frames = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(frames, key=lambda p: natural_key(p.name))


def file_path(ref: MediaRef) -> Path:
    """The file or frame folder behind ``ref``: only images come from parquet cells or bytes."""
    if isinstance(ref, (ParquetImage, bytes)):
        raise InputError("an in-memory image (parquet cell or bytes) was given where a video file is needed")
    return Path(ref)


def media_kind(ref: MediaRef) -> MediaKind:
    """``"image"`` or ``"video"`` for a media reference, from its suffix (folders are frame clips).

    Raises ValueError for a suffix that is neither, or a folder without frame images.
    """
    if isinstance(ref, (ParquetImage, bytes)):
        return "image"
    path = Path(ref)
    if path.is_dir():
        if not frame_files(path):
            raise InputError(f"frame folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): {path}")
        return "video"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    known = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
    raise InputError(f"unknown media type {suffix or '(no suffix)'!r} for {path} (expected {known} or a frame folder)")


# --------------------------------------------------------------------------------------------- readers


def detect_format(source: str | os.PathLike[str]) -> Literal["jsonl", "pickapic"]:
    """Which reader handles ``source``: a ``.jsonl`` manifest, or parquet file(s) in the Pick-a-Pic layout.

    A folder is Pick-a-Pic when it holds ``*.parquet`` files, and JSONL when it holds ``pairs.jsonl``.
    """
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"pair source not found: {path}")
    if path.is_dir():
        if any(path.glob("*.parquet")):
            return "pickapic"
        if (path / "pairs.jsonl").is_file():
            return "jsonl"
        raise InputError(f"{path}: folder holds neither *.parquet files (Pick-a-Pic) nor pairs.jsonl")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "pickapic"
    raise InputError(f"{path}: unknown pair format {suffix!r} (expected a .jsonl manifest or .parquet files)")


def read_pairs(
    source: str | os.PathLike[str],
    *,
    skip_ties: bool = True,
    skip_empty_prompts: bool = False,
    on_bad_pair: OnBadPair = "fail",
) -> PairList:
    """Read preference pairs from a JSONL manifest or Pick-a-Pic parquet file(s), detecting which.

    ``skip_ties`` (Pick-a-Pic only): drop rows labelled 0.5; when False they are kept with image 0 as
    "chosen" and ``metadata["tie"] = True``. ``skip_empty_prompts``: drop pairs whose prompt is empty
    instead of failing. ``on_bad_pair``: "fail" reads the whole source, then raises BadPairsError
    listing every bad line or row; "skip" drops them. What was skipped, and why, is logged and
    returned in ``PairList.problems`` / ``PairList.skipped``.
    """
    check_policy(on_bad_pair)
    path = Path(source)
    kind = detect_format(path)
    if kind == "jsonl":
        if path.is_dir():
            path = path / "pairs.jsonl"
        pairs = read_jsonl_pairs(path, skip_empty_prompts=skip_empty_prompts, on_bad_pair=on_bad_pair)
    else:
        pairs = read_pickapic_pairs(
            path, skip_ties=skip_ties, skip_empty_prompts=skip_empty_prompts, on_bad_pair=on_bad_pair
        )
    if pairs.skipped:
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(pairs.skipped.items()))
        logger.info("read %d pairs from %s (skipped %s)", len(pairs), source, detail)
    else:
        logger.info("read %d pairs from %s", len(pairs), source)
    return pairs


class _LineProblem(Exception):
    """One manifest line that cannot be used (internal: becomes a PairProblem)."""

    def __init__(self, kind: str, reason: str) -> None:
        reason = reason.replace("\r", "\\r").replace("\n", "\\n")  # a path may hold a line break: one line
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def read_jsonl_pairs(
    path: str | os.PathLike[str], *, skip_empty_prompts: bool = False, on_bad_pair: OnBadPair = "fail"
) -> PairList:
    """Read a JSONL manifest (see the module docstring); checks that every media file exists.

    The whole manifest is read before anything is raised, so one error lists every bad line.
    """
    check_policy(on_bad_pair)
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"pair manifest not found: {path}")
    base = path.parent
    pairs, problems = PairList(), []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if lineno == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise InputError(f"{path}: the manifest is UTF-16 text; save it as UTF-8 (one JSON object a line)")
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
            try:
                pair = _jsonl_pair(raw, base)
            except _LineProblem as problem:
                found = PairProblem(str(path), lineno, problem.kind, problem.reason)
                if problem.kind == "empty prompt" and skip_empty_prompts:
                    pairs.skip(replace(found, bad=False))
                else:
                    problems.append(found)
                continue
            if pair is not None:
                pair.source, pair.line = str(path), lineno
                pairs.append(pair)
    if on_bad_pair == "fail":
        raise_problems(problems, SKIP_HINT)
    for skipped in problems:
        pairs.skip(skipped)
    if not pairs:
        detail = ", ".join(f"{count} {kind}" for kind, count in sorted(pairs.skipped.items()))
        raise InputError(f"{path}: no pairs at all" + (f" (skipped {detail})" if detail else ""))
    return pairs


def _jsonl_pair(raw: bytes, base: Path) -> PreferencePair | None:
    """The pair on one manifest line, None for a blank line; raises _LineProblem."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _LineProblem("bad line", f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise _LineProblem("bad line", f"invalid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise _LineProblem("bad line", "invalid JSON (nested too deeply)") from None
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        raise _LineProblem("bad line", f"invalid JSON ({_one_line(error)[:120]})") from None
    if not isinstance(record, dict):
        raise _LineProblem("bad line", f"expected a JSON object, got {_json_type(record)}")
    for key in _JSONL_KEYS:
        if key not in record:
            raise _LineProblem("bad line", f"missing key {key!r} (each line needs prompt, chosen, rejected)")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise _LineProblem("bad line", f"'prompt' must be a string, got {_json_type(prompt)}")
    if not prompt.strip():
        raise _LineProblem("empty prompt", "empty prompt")
    chosen = _manifest_media(record["chosen"], "chosen", base)
    rejected = _manifest_media(record["rejected"], "rejected", base)
    if chosen == rejected or _same_file(chosen, rejected):
        raise _LineProblem("same media", f"chosen and rejected are the same file: {chosen}"
                           + ("" if chosen == rejected else f" and {rejected}"))  # fmt: skip
    chosen_kind, rejected_kind = media_kind(chosen), media_kind(rejected)
    if chosen_kind != rejected_kind:
        raise _LineProblem("bad line", f"chosen is {chosen_kind} but rejected is {rejected_kind}")
    metadata = {key: value for key, value in record.items() if key not in _JSONL_KEYS}
    return PreferencePair(prompt, chosen, rejected, metadata)


def _no_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which JSON does not: a NaN in metadata would travel on silently.
    raise _LineProblem("bad line", f"invalid JSON ({name} is not a JSON value)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to infinity
        raise _LineProblem("bad line", f"number {text[:40]} is out of range")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def _same_file(first: Path, second: Path) -> bool:
    # Another spelling of the same path, or a symlink to it: a pair with no preference in it.
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _manifest_media(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise _LineProblem("bad line", f"{key!r} must be a non-empty path string")
    try:
        media = Path(value).expanduser()
        if not media.is_absolute():
            media = base / media
        exists = media.exists()
    except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, a name too long, an unknown ~user
        raise _LineProblem("bad line", f"{key} is not a usable path {value!r:.80} ({error})") from None
    if not exists:
        raise _LineProblem("missing file", f"{key} file not found: {media}")
    try:
        media_kind(media)
    except (OSError, ValueError) as error:
        raise _LineProblem("bad line", f"{key}: {error}") from None
    return media


def read_pickapic_pairs(
    source: str | os.PathLike[str],
    *,
    skip_ties: bool = True,
    skip_empty_prompts: bool = False,
    on_bad_pair: OnBadPair = "fail",
) -> PairList:
    """Read Pick-a-Pic parquet file(s): a single file, or every ``*.parquet`` in a folder (sorted).

    Only the small columns are read here; images are decoded later from their :class:`ParquetImage`.
    Rows with ``has_label`` false (unlabelled) or ``are_different`` false (identical images) are
    skipped when those optional columns exist, since neither carries a preference; every skipped
    row is recorded in ``PairList.problems``. A file that cannot be read, or lacks a column, fails
    at once; bad rows are all listed (``on_bad_pair="fail"``) or skipped (``"skip"``).
    """
    check_policy(on_bad_pair)
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"Pick-a-Pic source not found: {path}")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no *.parquet files")
    pairs, problems = PairList(), list[PairProblem]()
    for file in files:
        _read_pickapic_file(file, pairs, problems, skip_ties=skip_ties, skip_empty_prompts=skip_empty_prompts)
    if on_bad_pair == "fail":
        raise_problems(problems, SKIP_HINT)
    for problem in problems:
        pairs.skip(problem)
    if not pairs:
        detail = ", ".join(f"{count} {reason}" for reason, count in pairs.skipped.items())
        raise InputError(f"{path}: no pairs at all" + (f" (skipped {detail})" if detail else ""))
    return pairs


def _open_pickapic(file: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise InputError(f"{file}: not a readable parquet file ({_one_line(error)})") from None
    schema = parquet.schema_arrow
    for column in PICKAPIC_COLUMNS:
        if column not in schema.names:
            raise InputError(f"{file}: missing column {column!r} (Pick-a-Pic needs {', '.join(PICKAPIC_COLUMNS)})")
    for column in ("jpg_0", "jpg_1"):
        kind = schema.field(column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise InputError(f"{file}: column {column!r} holds {kind}, expected encoded image bytes (binary)")
    return parquet


def _read_pickapic_file(
    file: Path, pairs: PairList, problems: list[PairProblem], *, skip_ties: bool, skip_empty_prompts: bool
) -> None:
    parquet = _open_pickapic(file)
    # Everything but the image bytes is small: keep it as metadata for provenance.
    small = [name for name in parquet.schema_arrow.names if name not in ("jpg_0", "jpg_1")]
    row = 0
    for group in range(parquet.num_row_groups):
        try:
            records = parquet.read_row_group(group, columns=small).to_pylist()
        except Exception as error:  # noqa: BLE001 - a damaged row group
            raise InputError(f"{file}: row group {group} cannot be read ({_one_line(error)})") from None
        for index, record in enumerate(records):
            row += 1
            try:
                pair = _pickapic_pair(record, file, group, index, row - 1, skip_ties)
            except _LineProblem as problem:
                found = PairProblem(str(file), row - 1, problem.kind, problem.reason)
                if problem.kind in _PICKAPIC_SKIPS or (problem.kind == "empty prompt" and skip_empty_prompts):
                    pairs.skip(replace(found, bad=False))  # no preference in it: skipped whatever the policy
                else:
                    problems.append(found)
                continue
            pairs.append(pair)


_PICKAPIC_SKIPS = ("tie", "unlabelled", "identical images")


def _pickapic_pair(
    record: dict[str, Any], file: Path, group: int, index: int, row: int, skip_ties: bool
) -> PreferencePair:
    if record.get("has_label") is False:
        raise _LineProblem("unlabelled", "unlabelled (has_label is false)")
    if record.get("are_different") is False:
        raise _LineProblem("identical images", "identical images (are_different is false)")
    label = record["label_0"]
    if not isinstance(label, (int, float)) or isinstance(label, bool) or label not in (0.0, 0.5, 1.0):
        raise _LineProblem("bad row", f"label_0 must be 1.0, 0.0 or 0.5 (tie), got {label!r:.40}")
    caption = record["caption"]
    if caption is not None and not isinstance(caption, str):
        raise _LineProblem("bad row", f"caption must be a string, got {type(caption).__name__}")
    if not caption or not caption.strip():
        raise _LineProblem("empty prompt", "empty prompt (caption); pass skip_empty_prompts=True to skip such rows")
    metadata = {key: value for key, value in record.items() if key != "caption"}
    if float(label) == 0.5:
        if skip_ties:
            raise _LineProblem("tie", "tie (label_0 is 0.5)")
        metadata["tie"] = True
    first = ParquetImage(file, group, index, row, "jpg_0")
    second = ParquetImage(file, group, index, row, "jpg_1")
    chosen, rejected = (second, first) if float(label) == 0.0 else (first, second)
    return PreferencePair(caption, chosen, rejected, metadata, source=str(file), line=row)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


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
                raise InputError(f"pair {number}: {key} is {type(media).__name__}, only file paths can be written to JSONL")
            record[key] = _relative_to(Path(media), base)
        for key, value in pair.metadata.items():
            if key in _JSONL_KEYS:
                raise InputError(f"pair {number}: metadata key {key!r} clashes with a manifest key")
            record[key] = value
        try:
            lines.append(json.dumps(record, ensure_ascii=False))
        except (TypeError, ValueError) as error:
            raise InputError(f"pair {number}: metadata is not JSON-serialisable ({error})") from None
    if not lines:
        raise InputError(f"no pairs to write to {path}")
    return write_atomic(path, "\n".join(lines) + "\n")


def _relative_to(media: Path, base: Path) -> str:
    if not media.is_absolute():
        return media.as_posix()
    try:
        return media.resolve().relative_to(base).as_posix()
    except ValueError:
        return str(media)
