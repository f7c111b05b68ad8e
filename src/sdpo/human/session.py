"""A rater's session: the queue, their answers file and the folder's media, behind the page's four calls
(state, answer, undo, end). The web app (:mod:`sdpo.human.server`) only turns requests into these calls.

What the page gets for an item is :meth:`Session.item_view`: the prompt, a token URL per side, the
media kind, and an error line for a side that cannot be shown. In blind mode nothing in it names a
model (not the id, not the URL); :meth:`Session.end` is the only call that reveals them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo.errors import InputError
from sdpo.human.answers import CHOICES, AnswersFile
from sdpo.human.media import MediaIndex
from sdpo.human.queue import Item


class Refused(Exception):
    """A request the session does not accept: HTTP ``status`` with a one-line ``message``; nothing written."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Session:
    """One rater on one folder."""

    folder: Path
    items: list[Item]
    answers: AnswersFile
    title: str
    """Shown at the top of the page."""
    fps: int = 8
    """Frame rate of the clips (for frame stepping)."""
    on_end: Callable[[Session], dict[str, Any]] | None = None
    """What ending the session does and returns (``rate``: the reveal and the written results)."""

    def __post_init__(self) -> None:
        self.ended = False
        """Set by :meth:`end` in blind mode: the names were shown, so no answer is blind any more."""
        self.media = MediaIndex(self.folder)
        self.by_id = {item.id: item for item in self.items}
        for item in self.items:
            for relative in item.files:
                self.media.register(relative)

    @property
    def mode(self) -> str:
        return self.answers.mode

    @property
    def rater(self) -> str:
        return self.answers.rater

    def current(self) -> Item | None:
        """The first item of the queue this rater has not answered (None when all are)."""
        self.answers.refresh()
        done = self.answers.effective()
        return next((item for item in self.items if item.id not in done), None)

    def item_view(self, item: Item) -> dict[str, Any]:
        """What the page needs to show ``item`` (see the module docstring)."""
        sides = []
        for relative in item.files:
            media = self.media.register(relative)
            sides.append({"url": f"/media/{media.token}", "kind": media.kind, "error": self._error(relative)})
        view: dict[str, Any] = {"id": item.id, "prompt": item.prompt, "sides": sides}
        if self.mode != "blind":
            view["names"] = list(item.shown)
        return view

    def _error(self, relative: str) -> str | None:
        problem = self.media.problem(relative)
        if problem is None or self.mode != "blind":
            return problem
        return "this sample cannot be shown (missing or damaged file)"  # the file's name would name the model

    def state(self) -> dict[str, Any]:
        """The page's whole state: who, how far, and the item to show next (or None)."""
        item = self.current()
        return {"rater": self.rater, "mode": self.mode, "title": self.title, "fps": self.fps,
                "choices": list(CHOICES[self.mode]), "total": len(self.items),
                "done": sum(1 for key in self.answers.effective() if key in self.by_id),
                "item": None if item is None else self.item_view(item), "can_end": self.on_end is not None}

    def check_rater(self, body: dict[str, Any]) -> None:
        if body.get("rater") != self.rater:
            raise Refused(403, f"this page takes the answers of rater {self.rater!r}, not {body.get('rater')!r:.40}")

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Save ``{"rater", "item", "choice"}`` and return the new state."""
        _keys(body, {"rater", "item", "choice"})
        self.check_rater(body)
        if self.ended:
            raise Refused(409, "this session is ended (the names were shown): start the page again to go on")
        item = self.by_id.get(body["item"]) if isinstance(body["item"], str) else None
        if item is None:
            raise Refused(404, f"unknown item {body['item']!r:.60}")
        if body["choice"] not in CHOICES[self.mode]:
            raise Refused(422, f"choice must be one of {', '.join(CHOICES[self.mode])}, got {body['choice']!r:.40}")
        if item.id in self.answers.effective():
            raise Refused(409, f"item {item.id} is answered already (undo to change it)")
        try:  # answered meanwhile by another server on this rater's file
            self.answers.answer(item.id, body["choice"], item.prompt, item.prompt_index, list(item.shown), item.sample)
        except InputError as error:
            raise Refused(409, str(error)) from None
        return self.state()

    def undo(self, body: dict[str, Any]) -> dict[str, Any]:
        """Take back this rater's last answer and return the new state (showing that item again)."""
        _keys(body, {"rater"})
        self.check_rater(body)
        if self.answers.undo() is None:
            raise Refused(409, "nothing to undo")
        return self.state()

    def end(self, body: dict[str, Any]) -> dict[str, Any]:
        """End the session (``rate``: reveal the names and write the results)."""
        _keys(body, {"rater"})
        self.check_rater(body)
        if self.on_end is None:
            raise Refused(404, "this page has no end step: close the tab, every answer is saved")
        self.ended = self.mode == "blind"
        return self.on_end(self)


def _keys(body: Any, expected: set[str]) -> None:
    if not isinstance(body, dict):
        raise Refused(400, "expected a JSON object")
    if set(body) != expected:
        raise Refused(400, f"expected exactly the keys {', '.join(sorted(expected))}, got {', '.join(sorted(body))[:120]}")


__all__ = ["Refused", "Session"]
