"""One door for the events a training run reports to the person running it, on the main process only.

Three kinds, each on the channel it always had, so the terminal shows the same text as before:

- ``note``: a fact about the run ("resuming from checkpoint-20 ...") as one ``sdpo: ...`` line on stderr;
- ``warn``: something the user should act on (a saturated loss, a skipped step) as a Python warning,
  so ``-W error`` and warning filters apply and tests can ``pytest.warns`` it;
- ``announce``: the line saying what the run is about to do, written above the progress bar.

Every event is also a record of the ``sdpo.train`` logger (notes and announcements at INFO, warnings at
WARNING). The ``sdpo`` logger holds a ``NullHandler``, so nothing extra reaches the terminal unless an
application configures logging, e.g. to keep a run's events in a file.
"""

from __future__ import annotations

import logging
import sys
import warnings

from tqdm.auto import tqdm

logging.getLogger("sdpo").addHandler(logging.NullHandler())
logger = logging.getLogger("sdpo.train")


def note(text: str, main: bool = True, *, new_line: bool = False) -> None:
    """``sdpo: text`` on stderr when ``main``; ``new_line`` first ends a line a progress bar left open."""
    if not main:
        return
    logger.info(text)
    print(("\n" if new_line else "") + f"sdpo: {text}", file=sys.stderr, flush=True)


def warn(text: str, main: bool = True, *, stacklevel: int = 2) -> None:
    """A UserWarning when ``main``, attributed ``stacklevel`` frames up from the caller (as ``warnings.warn``)."""
    if not main:
        return
    logger.warning(text)
    warnings.warn(text, stacklevel=stacklevel + 1)


def announce(text: str, main: bool = True) -> None:
    """``text`` on its own line above the progress bar when ``main``."""
    if not main:
        return
    logger.info(text)
    tqdm.write(text)
