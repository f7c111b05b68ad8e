"""Crash-safe file writes shared by every stage: a reader sees the old file or the whole new one.

Every stage writes through :func:`write_atomic` (bytes it has in hand) or :func:`atomic_output` (a
temporary path for a library that writes the file itself: PIL, imageio, safetensors), so a full disk or
a kill leaves no half-written file and no temporary one behind. :func:`disk_budget` makes these writes
run out of space after a number of bytes, to test exactly that.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class DiskBudget:
    """The space a :func:`disk_budget` block has left, and what its writes have used of it."""

    def __init__(self, free_bytes: int) -> None:
        self.free_bytes, self.left = free_bytes, free_bytes

    @property
    def spent(self) -> int:
        """Bytes written through this module within the block (those that fit)."""
        return self.free_bytes - self.left


_budget: list[DiskBudget] = []
"""The active :func:`disk_budget` blocks (innermost last)."""


@contextlib.contextmanager
def disk_budget(free_bytes: int) -> Iterator[DiskBudget]:
    """Within the block, writes through this module fail with ENOSPC (naming their path) once more than
    ``free_bytes`` would have been written: a full disk, for tests, without mounting one. With a large
    budget, the yielded :class:`DiskBudget` measures what a stage writes (``spent``)."""
    _budget.append(DiskBudget(free_bytes))
    try:
        yield _budget[-1]
    finally:
        _budget.pop()


def _spend(path: Path, size: int) -> None:
    if not _budget:
        return
    if size > _budget[-1].left:
        _budget[-1].left = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    _budget[-1].left -= size


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder: fsync, rename over
    ``path``, fsync the folder. Text is written as UTF-8; missing parent folders are created."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, _plain_mode())
        with os.fdopen(descriptor, "wb") as handle:
            _spend(path, len(raw))
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, sync_folder: bool = True) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (same suffix) to write the file at; renamed over ``path``
    when the block ends without error, deleted when it raises.

    ``sync_folder=False`` leaves the rename's durability to the caller, who writes many files into a
    folder and syncs it once (:func:`fsync_dir`) before the file that marks them done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        os.chmod(temporary, _plain_mode())
        yield temporary
        _spend(path, temporary.stat().st_size)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_dir(path.parent)


def named_for(error: OSError, staging: str | os.PathLike[str], final: str | os.PathLike[str]) -> OSError:
    """``error`` with a path inside the ``staging`` folder named as the file it was to become in
    ``final``: a stage that writes into a temporary folder reports (say) a full disk at the path the
    user asked for, not at a temporary one that is gone by the time the message is read."""
    staging, final = Path(staging), Path(final)
    name = error.filename
    if name is None or not Path(name).is_relative_to(staging):
        return error
    return OSError(error.errno, error.strerror, str(final / Path(name).relative_to(staging)))


def _plain_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file (0o666 less the umask): a temporary file is made
    private (0o600), which would leave every output unreadable to the user's group."""
    mask = os.umask(0o22)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make renames inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
