"""The only files a page serves: media registered from the folder's own records, under opaque tokens.

A URL never carries a path: ``/media/<token>`` maps to a file registered at start-up, so no
``../``, encoded or not, and no absolute path can name anything else. Each file is checked again when
asked for (resolved inside the folder, so a symlink out of it is refused; a regular file) and probed
once for what it claims to be (a PNG's signature and a decode, an MP4's ``ftyp`` box): a missing or
damaged file is an error message for its card, never an error of the server.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

CONTENT_TYPES = {".png": "image/png", ".mp4": "video/mp4"}
"""The media a page shows, by suffix; nothing else is served."""


@dataclass(frozen=True)
class Media:
    """One registered media file."""

    token: str
    """Its URL is ``/media/<token>``."""
    relative: str
    """Its path relative to the folder, as the records name it."""
    kind: str
    """"image" or "video"."""


class MediaIndex:
    """The media files of one folder that a page may serve."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).resolve()
        self._by_token: dict[str, Media] = {}
        self._by_path: dict[str, Media] = {}
        self._problems: dict[str, str | None] = {}

    def register(self, relative: str) -> Media:
        """The token of ``relative`` (a path the folder's records name), registering it once."""
        if relative not in self._by_path:
            suffix = Path(relative).suffix.lower()
            media = Media(secrets.token_urlsafe(9), relative, "video" if suffix == ".mp4" else "image")
            self._by_path[relative], self._by_token[media.token] = media, media
        return self._by_path[relative]

    def resolve(self, relative: str) -> Path | None:
        """The file ``relative`` names, if it is a regular file inside the folder (after symlinks)."""
        if not relative or "\x00" in relative or Path(relative).is_absolute():
            return None
        path = (self.folder / relative).resolve()
        if not path.is_relative_to(self.folder) or path.suffix.lower() not in CONTENT_TYPES or not path.is_file():
            return None
        return path

    def lookup(self, token: str) -> tuple[Path, str] | None:
        """(file, content type) of a token, checked now; None for an unknown token or a file that is no longer good."""
        media = self._by_token.get(token)
        if media is None:
            return None
        path = self.resolve(media.relative)
        return None if path is None else (path, CONTENT_TYPES[path.suffix.lower()])

    def problem(self, relative: str) -> str | None:
        """Why ``relative`` cannot be shown (one line), or None when it looks good; probed once."""
        if relative not in self._problems:
            self._problems[relative] = self._probe(relative)
        return self._problems[relative]

    def _probe(self, relative: str) -> str | None:
        if Path(relative).suffix.lower() not in CONTENT_TYPES:
            return f"{relative}: not a PNG or MP4 file"
        candidate = self.folder / relative
        path = self.resolve(relative)
        if path is None:
            if candidate.is_symlink() or (candidate.exists() and not candidate.resolve().is_relative_to(self.folder)):
                return f"{relative}: points outside the folder, so it is not shown"
            return f"{relative}: missing"
        try:
            with open(path, "rb") as handle:
                head = handle.read(12)
            if path.suffix.lower() == ".mp4":
                return None if head[4:8] == b"ftyp" else f"{relative}: not an MP4 file (damaged?)"
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        except OSError as error:
            return f"{relative}: unreadable ({' '.join(str(error).split())[:100]})"
        except Exception as error:  # PIL raises many kinds on a damaged file; the card says which
            return f"{relative}: damaged ({type(error).__name__})"
        return None


__all__ = ["CONTENT_TYPES", "Media", "MediaIndex"]
