"""Stop cleanly when a job scheduler asks: a checkpoint at the end of the current step, then exit.

Clusters announce pre-emption or the end of a time limit with a signal (SLURM sends SIGTERM, or
SIGUSR1 with ``--signal``). Inside ``StopRequests`` those signals only set a flag; the trainer
checks it after each optimiser step, all processes agree (one process's signal stops them all),
saves ``checkpoint-N`` and returns, so ``--resume latest`` continues exactly where it stopped.

Ctrl-C (SIGINT) is a stop request too: the first one finishes the step and saves; a second one
raises KeyboardInterrupt at once (the CLI exits 130), for when the save itself is not wanted.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from sdpo.train.log import note

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
"""Signals that request a stop (those that exist on this platform are handled)."""


class StopRequests:
    """Context manager that turns the stop signals into a flag while it is active."""

    def __init__(self) -> None:
        self.received: str | None = None
        """Name of the first stop signal received, or None."""
        self.interrupts = 0
        """Ctrl-C presses seen so far."""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _note(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if name == "SIGINT":
            if self.interrupts:
                raise KeyboardInterrupt  # the second Ctrl-C: quit now, without the checkpoint
            self.interrupts += 1
            note("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit at once)", new_line=True)
        self.received = self.received or name

    def agreed(self, accelerator: Any) -> bool:
        """Whether any process received a stop signal (a collective call when there are several)."""
        local = self.received is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
