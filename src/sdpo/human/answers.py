"""The answers file: one per rater, append-only JSONL, each line flushed and fsynced before the page hears back.

Layout (``GEN/labels/<rater>.jsonl`` for ``sdpo label``, ``EVAL/ratings/<rater>.jsonl`` for ``sdpo rate``):

* line 1, the header: ``{"type": "header", "format": "sdpo-answers", "version": 1, "rater": ..., "mode":
  "paired" | "unpaired" | "blind", "settings": {...}}``; ``settings`` fix which items the rater sees
  (seed, pairs per prompt), so a restart with others is refused rather than mixing two queues;
* then one line per :class:`Answer` (``"type": "answer"``) or :class:`Undo` (``"type": "undo"``, which
  takes back the answer whose ``seq`` it names).

The answers that count are the answers not taken back, the latest per item (:meth:`AnswersFile.effective`).
A last line cut short by a kill (no newline; the page was never told it was saved) is dropped on open;
a damaged line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdpo.errors import FolderError, InputError
from sdpo.files import fsync_dir, write_atomic

try:
    import fcntl
except ImportError:  # not POSIX: one server per rater's file
    fcntl = None  # type: ignore[assignment]

FORMAT = "sdpo-answers"
VERSION = 1
MODES = ("paired", "unpaired", "blind")
"""paired: two candidates of a prompt; unpaired: one at a time, thumbs up/down; blind: ``sdpo rate``."""
CHOICES = {"paired": ("left", "right", "tie", "skip"), "unpaired": ("up", "down", "skip"),
           "blind": ("left", "right", "tie", "skip")}
"""The choices each mode accepts."""
RATER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A rater's name is also their file's name: letters, digits, ``_ . -``, at most 64."""


def check_rater(name: str) -> str:
    """``name`` if it can name a rater (and their file), else InputError."""
    if not isinstance(name, str) or not RATER_NAME.fullmatch(name):
        raise InputError(f"rater name {name!r:.80} must be 1-64 letters, digits, '_', '.' or '-' (starting with a "
                         "letter or digit)")
    return name


@dataclass(frozen=True)
class Answer:
    """One choice of one rater on one item."""

    seq: int
    """Its place in the rater's file (1, 2, ...; undo records take numbers too)."""
    item: str
    """The item's id (:mod:`sdpo.human.queue`)."""
    choice: str
    """One of :data:`CHOICES` of the file's mode."""
    prompt: str
    """The prompt shown."""
    prompt_index: int
    """Index of that prompt in the folder's prompts."""
    shown: list[str]
    """What was shown, left then right (one entry in unpaired mode): media paths relative to the folder
    for ``label``, model names for ``rate`` (never sent to the page before the session ends)."""
    time: str
    """When it was saved (UTC, ISO 8601)."""
    sample: int | None = None
    """``rate``: the evaluation sample's index (prompt and seed) the two media were made from."""
    type: str = field(default="answer", repr=False)


@dataclass(frozen=True)
class Undo:
    """Takes back the answer numbered ``undoes``."""

    seq: int
    item: str
    undoes: int
    time: str
    type: str = field(default="undo", repr=False)


def now() -> str:
    """The current UTC time, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AnswersFile:
    """A rater's answers file: opened (created with its header, or checked against it), then appended to.

    Safe with two requests at once (a thread lock) and with two servers on the same rater's file (each
    append holds an exclusive ``flock`` on the file and first reads what another process appended since,
    so an item is never answered twice); each append is one ``write`` of a whole line, then ``fsync``.
    """

    def __init__(self, path: str | os.PathLike[str], rater: str, mode: str, settings: dict[str, Any]) -> None:
        if mode not in MODES:
            raise InputError(f"unknown answers mode {mode!r}; one of {', '.join(MODES)}")
        self.path, self.rater, self.mode, self.settings = Path(path), check_rater(rater), mode, dict(settings)
        self.records: list[Answer | Undo] = []
        self._lock = threading.RLock()
        if self.path.exists():
            self._load()
        else:
            header = {"type": "header", "format": FORMAT, "version": VERSION, "rater": rater, "mode": mode,
                      "settings": self.settings, "created": now()}
            write_atomic(self.path, json.dumps(header, sort_keys=True) + "\n")
        self._size = self.path.stat().st_size

    def _load(self) -> None:
        from sdpo.folders import first_difference

        header, records = read_answers(self.path, repair=True)
        for key, expected in (("rater", self.rater), ("mode", self.mode)):
            if header.get(key) != expected:
                raise FolderError(f"{self.path} holds the answers of {key} {header.get(key)!r}, not {expected!r}: "
                                  "choose another --rater")
        found = first_difference("settings", header.get("settings", {}), self.settings)
        if found is not None:
            name, old, new = found
            raise FolderError(f"{self.path} was started with other settings ({name}: was {old}, now {new}): "
                              "use the same settings to resume, or another --rater")
        self.records = records

    @contextlib.contextmanager
    def _writing(self) -> Iterator[int]:
        """The file open for appending, locked against other processes, with :attr:`records` brought up to
        date with what they appended."""
        with self._lock:  # re-entrant: refresh() holds it too
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                if fcntl is not None:
                    fcntl.flock(descriptor, fcntl.LOCK_EX)
                if os.fstat(descriptor).st_size != self._size:  # another server wrote this rater's answers
                    self._load()
                    self._size = self.path.stat().st_size
                yield descriptor
            finally:
                os.close(descriptor)  # releases the flock

    def _append(self, descriptor: int, record: Answer | Undo) -> None:
        line = (json.dumps(asdict(record), ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        written = 0
        while written < len(line):
            written += os.write(descriptor, line[written:])
        os.fsync(descriptor)
        self._size += len(line)
        self.records.append(record)

    def refresh(self) -> None:
        """Read what another server appended to this file since (nothing to do when the size is unchanged)."""
        with self._lock:
            if self.path.stat().st_size != self._size:
                with self._writing():
                    pass

    def next_seq(self) -> int:
        return len(self.records) + 1

    def answer(self, item: str, choice: str, prompt: str, prompt_index: int, shown: list[str],
               sample: int | None = None) -> Answer:
        """Save one answer (durably, before returning); an item answered already is refused (InputError)."""
        if choice not in CHOICES[self.mode]:
            raise InputError(f"choice {choice!r:.40} is not one of {', '.join(CHOICES[self.mode])}")
        with self._writing() as descriptor:
            if item in self.effective():
                raise InputError(f"item {item} is answered already; undo it first")
            record = Answer(self.next_seq(), item, choice, prompt, prompt_index, list(shown), now(), sample)
            self._append(descriptor, record)
        return record

    def undo(self) -> Answer | None:
        """Take back the latest answer that counts (None when there is none)."""
        with self._writing() as descriptor:
            answers = self.effective()
            if not answers:
                return None
            last = max(answers.values(), key=lambda answer: answer.seq)
            self._append(descriptor, Undo(self.next_seq(), last.item, last.seq, now()))
        return last

    def effective(self) -> dict[str, Answer]:
        """item -> the answer that counts (see the module docstring), in the order they were given."""
        return effective_answers(self.records)


def effective_answers(records: list[Answer | Undo]) -> dict[str, Answer]:
    """item -> its latest answer not taken back, ordered by when it was given."""
    undone = {record.undoes for record in records if isinstance(record, Undo)}
    latest: dict[str, Answer] = {}
    for record in records:
        if isinstance(record, Answer) and record.seq not in undone:
            latest.pop(record.item, None)
            latest[record.item] = record
    return latest


def read_answers(path: str | os.PathLike[str], repair: bool = False) -> tuple[dict[str, Any], list[Answer | Undo]]:
    """(header, records) of an answers file. A last line cut short is dropped (``repair``: also cut from
    the file, so the next append starts on a line of its own); any other damage is InputError."""
    path = Path(path)
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as handle:
                handle.truncate(len(raw))
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(path.parent)
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text: is it an answers file?") from None
    if not lines:
        raise InputError(f"{path}: empty answers file (no header): move it away and start again")
    header = parse_json_line(f"{path}:1", lines[0])
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("mode") not in MODES:
        raise InputError(f"{path}:1: not the header of an sdpo answers file")
    records: list[Answer | Undo] = []
    for number, line in enumerate(lines[1:], start=2):
        records.append(_record(f"{path}:{number}", parse_json_line(f"{path}:{number}", line)))
    return header, records


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_json_line(where: str, line: str) -> Any:
    """One JSON value, strictly (no NaN or Infinity); a torn or invalid line is InputError naming ``where``."""
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise InputError(f"{where}: invalid JSON ({' '.join(str(error).split())[:100]})") from None


def _record(where: str, data: Any) -> Answer | Undo:
    if not isinstance(data, dict) or data.get("type") not in ("answer", "undo"):
        raise InputError(f"{where}: expected an answer or undo record")
    kind = Answer if data["type"] == "answer" else Undo
    names = set(kind.__dataclass_fields__)
    try:
        record = kind(**{key: value for key, value in data.items() if key in names})
    except TypeError as error:
        raise InputError(f"{where}: incomplete {data['type']} record ({error})") from None
    types = {"seq": int, "item": str, "time": str, "choice": str, "prompt": str, "prompt_index": int, "undoes": int}
    for key, expected in types.items():
        value = getattr(record, key, None)
        if key in names and (not isinstance(value, expected) or isinstance(value, bool)):
            what = "a string" if expected is str else "an integer"
            raise InputError(f"{where}: {key!r} must be {what}, got {value!r:.60}")
    if isinstance(record, Answer) and not (isinstance(record.shown, list) and all(isinstance(x, str) for x in record.shown)
                                           and 1 <= len(record.shown) <= 2):
        raise InputError(f"{where}: 'shown' must be a list of one or two strings")
    return record


def answers_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The answers files in ``folder`` (one per rater), sorted by name."""
    folder = Path(folder)
    return sorted(path for path in folder.glob("*.jsonl") if RATER_NAME.fullmatch(path.stem)) if folder.is_dir() else []


__all__ = ["CHOICES", "MODES", "Answer", "AnswersFile", "Undo", "answers_files", "check_rater", "effective_answers",
           "read_answers"]
