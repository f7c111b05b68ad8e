"""sdpo.train.log: run events keep their terminal text and are records of the ``sdpo.train`` logger."""

from __future__ import annotations

import logging

import pytest

from sdpo.train import log


def test_a_note_is_one_sdpo_line_on_stderr_and_a_log_record(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="sdpo.train"):
        log.note("resuming from checkpoint-4")
        log.note("Ctrl-C: saving", new_line=True)
        log.note("not the main process", main=False)
    assert capsys.readouterr().err == "sdpo: resuming from checkpoint-4\n\nsdpo: Ctrl-C: saving\n"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "resuming from checkpoint-4"), ("INFO", "Ctrl-C: saving")]


def test_a_warning_points_at_the_caller_and_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="sdpo.train"), pytest.warns(UserWarning, match="^loss 9 is") as seen:
        log.warn("loss 9 is above 8", stacklevel=1)
        log.warn("silent", main=False)
    assert len(seen) == 1 and seen[0].filename == __file__
    assert [r.getMessage() for r in caplog.records] == ["loss 9 is above 8"]

