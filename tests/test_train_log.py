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



def test_the_announcement_names_what_the_rows_are_and_what_trains_on_them():
    from types import SimpleNamespace

    import torch

    from sdpo.train.metrics import run_announcement

    config = SimpleNamespace(lora_rank=4, train_batch_size=2, gradient_accumulation_steps=3, max_steps=10,
                             mixed_precision="no", method=SimpleNamespace(name="sdpo"))
    accelerator = SimpleNamespace(num_processes=1)
    spec = SimpleNamespace(family="toy")
    params = [torch.zeros(5, 2)]

    class Rows(list):
        pass

    pairs = Rows(range(40))
    line = run_announcement(spec, config, accelerator, params, pairs)
    assert line.startswith("sdpo: toy, sdpo, LoRA rank 4 (10 trainable parameters), one process")
    assert line.endswith("10 steps of 6 pairs from 40 pairs")
    trajectories = Rows(range(12))
    trajectories.row_name, trajectories.objective_name = "trajectory steps", "grpo"
    line = run_announcement(spec, config, accelerator, params, trajectories)
    assert "sdpo: toy, grpo," in line and line.endswith("6 trajectory steps from 12 trajectory steps")
