"""The one root of user mistakes.

Everything a user can get wrong (a value, a path, a used folder, a missing optional package) raises a
subclass of `SdpoError`; the command line prints it as one line, ``sdpo: error: ...``, with exit
status 2. An `OSError` on a user's path (read-only, disk full, not a directory) is one line too
(`describe_os_error`). Anything else is a bug: the CLI lets its traceback through with exit status 1,
so a bug never looks like a user mistake.

Each subclass also derives from the built-in exception it replaces (`ValueError`,
`FileNotFoundError`, `ImportError`), so code written against the built-ins keeps working. The math
modules (schedules, importance, objectives) import only torch and raise plain `ValueError`; the
config layer converts those into `ConfigError` where it calls them.
"""

from __future__ import annotations

import errno

__all__ = [
    "ConfigError",
    "FolderError",
    "InputError",
    "MissingFileError",
    "MissingPackageError",
    "SdpoError",
    "UnwritableError",
    "USER_ERRNOS",
    "describe_os_error",
]


class SdpoError(Exception):
    """A user mistake: printed as one line by the CLI (exit 2), never a traceback."""


class InputError(SdpoError, ValueError):
    """A bad argument, value or file content."""


class ConfigError(InputError):
    """A config field of the wrong type, out of range, or incompatible with another."""


class FolderError(InputError):
    """A folder that holds something else, or settings that differ from the run already there."""


class MissingFileError(SdpoError, FileNotFoundError):
    """A file or folder the user named (or a stage needs) does not exist."""


class UnwritableError(SdpoError, PermissionError):
    """A folder the user named cannot be written (read-only, no permission)."""


class MissingPackageError(SdpoError, ImportError):
    """An optional package a chosen feature needs is not installed; the message says what to install."""


USER_ERRNOS = frozenset({
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
    errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG,
})
"""OSError numbers that come from the user's paths and disks, not from a bug."""


def describe_os_error(error: OSError) -> str:
    """One line for an OSError on a user's path: the path (where known) and what went wrong."""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        reason += " (free some space and run the same command again)"
    names = [name for name in (error.filename, error.filename2) if name is not None]
    if names:
        return f"{' -> '.join(str(name) for name in names)}: {reason}"
    return reason
