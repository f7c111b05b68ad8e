"""What the trainer guarantees when things go wrong: non-finite steps, torn files, signals, a busy
folder, a changed config, a failed export, and kills at random points (the fault-injection test)."""

import errno
import json
import math
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.data import CachedPairs
from sdpo.files import write_atomic
from sdpo.objectives import MethodConfig
from sdpo.toy import ToySpec
from sdpo.train import optimize as optimize_module
from sdpo.train.checkpoint import RunLock, RunLockedError, latest_checkpoint
from sdpo.train.config import TrainConfig
from sdpo.train.preemption import StopRequests
from sdpo.train.resume_policy import ConfigMismatchError
from sdpo.train.trainer import ExportError, NonFiniteWeightsError, TrainingDivergedError, export_run, train


def _config(world, out: Path, **overrides) -> TrainConfig:
    base, cache = world
    settings = dict(family="toy", pretrained=str(base), cache_dir=str(cache), output_dir=str(out),
                    method=MethodConfig.preset("sdpo", beta=500.0), lora_rank=4, learning_rate=1e-2, max_steps=4,
                    train_batch_size=4, log_every=1, report_to="none", seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def _train(world, config, **kwargs):
    base, cache = world
    return train(config, spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache), progress=False, **kwargs)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ item 9: non-finite steps
def _poison_step(monkeypatch, bad_steps: set[int], accumulation: int = 1):
    """Make the loss NaN on the given optimizer steps (0-based), through the real preference step."""
    real, calls = optimize_module.preference_step, {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        if calls["n"] // accumulation in bad_steps:
            result.output.loss = result.output.loss * math.nan
        calls["n"] += 1
        return result

    monkeypatch.setattr(optimize_module, "preference_step", poisoned)


def test_a_non_finite_loss_skips_the_step_and_logs_its_pairs(world, tmp_path, monkeypatch):
    _poison_step(monkeypatch, {1})
    states = {}
    result = _train(world, _config(world, tmp_path), on_log=lambda step, row, model: states.update(
        {step: _trainable(model)}))
    assert result.bad_steps == 1 and result.history[-1]["bad_steps"] == 1
    for name, value in states[1].items():  # step 2 was skipped: no update at all
        assert torch.equal(states[2][name], value)
    assert any(not torch.equal(states[3][n], v) for n, v in states[2].items())
    assert all(math.isfinite(row["loss"]) for row in result.history if "loss" in row)
    bad = [json.loads(line) for line in (tmp_path / "bad_steps.jsonl").read_text().splitlines()]
    assert [(b["step"], b["reason"], len(b["pairs"]), len(b["timesteps"])) for b in bad] == [
        (2, "non-finite loss", 4, 4)]
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_a_skipped_step_under_gradient_accumulation_skips_every_micro_batch(world, tmp_path, monkeypatch):
    _poison_step(monkeypatch, {0}, accumulation=2)
    states = {}
    config = _config(world, tmp_path, max_steps=2, gradient_accumulation_steps=2, train_batch_size=2)
    result = _train(world, config, on_log=lambda step, row, model: states.update({step: _trainable(model)}))
    assert result.bad_steps == 1
    lora_b = [n for n in states[1] if "lora_B" in n]
    assert all(bool((states[1][n] == 0).all()) for n in lora_b)  # LoRA B starts at 0 and stayed there
    assert any(bool((states[2][n] != 0).any()) for n in lora_b)


def test_an_infinite_gradient_norm_every_step_stops_with_one_line(world, tmp_path):
    config = _config(world, tmp_path, max_steps=6, max_bad_steps=3,
                     method=MethodConfig.preset("sdpo", beta=1e38))
    with pytest.raises(TrainingDivergedError, match="3 consecutive steps up to step 3") as caught:
        _train(world, config)
    assert "\n" not in str(caught.value) and isinstance(caught.value, ValueError)
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"  # the last good (untouched) weights
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "bad_steps.jsonl").read_text().splitlines()]
    assert len(reasons) == 3 and all(r.startswith("non-finite gradient norm (inf") for r in reasons)


def test_weights_with_a_nan_are_never_written(world, tmp_path):
    def poison(step, row, model):
        if step == 3:
            next(p for p in model.parameters() if p.requires_grad).data.fill_(math.nan)

    with pytest.raises(NonFiniteWeightsError, match="NaN"):
        _train(world, _config(world, tmp_path), on_log=poison)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert latest_checkpoint(tmp_path) is None


def test_a_loss_above_the_sane_bound_is_reported(world, tmp_path, monkeypatch):
    real = optimize_module.preference_step

    def huge(*args, **kwargs):
        result = real(*args, **kwargs)
        result.output.loss = result.output.loss * 1e4
        return result

    monkeypatch.setattr(optimize_module, "preference_step", huge)
    with pytest.warns(UserWarning, match="above 100"):
        _train(world, _config(world, tmp_path, max_steps=1))


# ------------------------------------------------------------------ item 7: atomic state, torn checkpoints
def test_a_torn_trainer_state_is_skipped_saying_so(world, tmp_path):
    _train(world, _config(world, tmp_path, checkpoint_every=2, max_steps=4))
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("")
    with pytest.warns(UserWarning, match="skipping .*checkpoint-4"):
        assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_write_atomic_leaves_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("old")

    def fail(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


# ------------------------------------------------------------------ item 8: Ctrl-C, resume with nothing
def test_ctrl_c_saves_like_sigterm_and_a_second_one_quits_at_once(world, tmp_path):
    def interrupt(step, row, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = _train(world, _config(world, tmp_path), on_log=interrupt)
    assert (result.stopped_at, result.stop_signal) == (2, "SIGINT")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def test_resume_latest_without_a_checkpoint_starts_fresh(world, tmp_path, capsys):
    result = _train(world, _config(world, tmp_path, max_steps=2), resume="latest")
    assert [row["step"] for row in result.history] == [1, 2]
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------ item 4: one run per folder
def test_a_second_run_on_a_locked_folder_gets_one_line(world, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with RunLock(tmp_path), pytest.raises(RunLockedError, match=rf"{tmp_path}.*pid {os.getpid()}"):
        _train(world, _config(world, tmp_path))


def test_an_old_run_is_refused_without_resume_or_overwrite(world, tmp_path):
    _train(world, _config(world, tmp_path, max_steps=3))
    with pytest.raises(ValueError, match="already holds a run .*--overwrite"):
        _train(world, _config(world, tmp_path, max_steps=2))
    result = _train(world, _config(world, tmp_path, max_steps=2), overwrite=True)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len(result.history) == 2


# ------------------------------------------------------------------ item 2: the config travels with the checkpoint
def test_resume_refuses_an_unsafe_change_before_loading_the_model(world, tmp_path, monkeypatch):
    import sdpo.models.registry

    _train(world, _config(world, tmp_path, checkpoint_every=2))
    assert (tmp_path / "checkpoint-4" / "train_config.json").is_file()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the config check")

    monkeypatch.setattr(sdpo.models.registry, "load_spec", no_model)
    for field, value, message in [("learning_rate", 5e-3, "learning_rate was 0.01 .* is 0.005"),
                                  ("lora_rank", 8, "lora_rank was 4 .* is 8")]:
        with pytest.raises(ConfigMismatchError, match=message):
            train(_config(world, tmp_path, **{field: value}), resume="latest", progress=False)


def test_resume_takes_a_safe_change_and_records_it(world, tmp_path, capsys):
    _train(world, _config(world, tmp_path, checkpoint_every=2))
    result = train(_config(world, tmp_path, checkpoint_every=2, max_steps=6), resume="latest", progress=False)
    assert [row["step"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["final_step"] == 6
    assert info["config_changes"] == [{"step": 4, "changes": [{"field": "max_steps", "old": 4, "new": 6}]}]
    assert "max_steps: 4 -> 6" in capsys.readouterr().err


# ------------------------------------------------------------------ item 6: checkpoints hold what resume needs
def test_a_lora_checkpoint_holds_only_the_adapters(world, tmp_path):
    _train(world, _config(world, tmp_path, checkpoint_every=2))
    folder = tmp_path / "checkpoint-2"
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" not in names and "trainable.safetensors" in names
    assert {"optimizer.bin", "scheduler.bin", "train_config.json", "trainer_state.json"} <= set(names)
    weights = load_file(str(folder / "trainable.safetensors"))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)


# ------------------------------------------------------------------ item 5: the export is atomic and retryable
def test_a_failed_export_keeps_the_checkpoint_and_says_how_to_retry(world, tmp_path, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ToySpec, "save_lora", disk_full)
    with pytest.raises(ExportError, match=r"No space left on device.*checkpoint-4 is kept.*sdpo export") as caught:
        _train(world, _config(world, tmp_path))
    assert "\n" not in str(caught.value)
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists() and not (tmp_path / ".export-tmp").exists()
    monkeypatch.undo()
    reference = _train(world, _config(world, tmp_path / "reference"))
    result = export_run(tmp_path, progress=False)
    assert result.output_dir == tmp_path and len(result.history) == 4
    ours = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    theirs = load_file(str(reference.output_dir / "pytorch_lora_weights.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _losses(tmp_path) == _losses(reference.output_dir)


def test_resume_latest_on_a_run_whose_export_failed_only_exports(world, tmp_path, monkeypatch):
    calls = []
    real = ToySpec.save_lora

    def fail_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ToySpec, "save_lora", fail_once)
    with pytest.raises(ExportError):
        _train(world, _config(world, tmp_path))
    steps = []  # on_log runs after every logged step (log_every=1): none may run
    result = _train(world, _config(world, tmp_path), resume="latest", on_log=lambda step, row, model: steps.append(step))
    assert steps == [] and (tmp_path / "pytorch_lora_weights.safetensors").is_file() and len(result.history) == 4
    assert latest_checkpoint(tmp_path) is None  # checkpoint_every=0: kept only until the export landed
    again = _train(world, _config(world, tmp_path), resume="latest")
    assert again.model is None and len(again.history) == 4  # finished: nothing to do


# ------------------------------------------------------------------ fault injection: kill -9 at random points
def _complete_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _child(config_data: dict, world_paths: tuple[str, str], pause: str) -> None:
    """A training process that the test kills (forked: torch is already imported)."""
    import sys

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the child dies without closing it
    if pause:
        os.environ["SDPO_TEST_SAVE_PAUSE"] = pause
    base, cache = world_paths
    train(TrainConfig.from_dict(config_data), spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache),
          resume="latest", progress=False)
    os._exit(0)


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(world, tmp_path):
    steps = 8
    # With a moving average too: its file is written inside the same save window the kills aim at.
    whole = _train(world, _config(world, tmp_path / "whole", max_steps=steps, checkpoint_every=1,
                                  checkpoints_total_limit=2, ema_decay=0.9))
    out = tmp_path / "killed"
    config = _config(world, out, max_steps=steps, checkpoint_every=1, checkpoints_total_limit=2,
                     ema_decay=0.9).to_dict()
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    kills = 0
    # Each save pauses 0.2 s between its files and its state file, so kills land inside saves as well as
    # between them: twice while a save is under way, twice at a random moment after a random logged step.
    for kind in ["save", "time", "save", "time"]:
        child = context.Process(target=_child, args=(config, (str(world[0]), str(world[1])), "0.2"))
        child.start()
        target = _complete_rows(out) + rng.randint(0, 2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and child.is_alive():
            if kind == "save" and any((p / "trainable.safetensors").exists() and not (p / "trainer_state.json").exists()
                                      for p in out.glob("checkpoint-*")):
                break
            if kind == "time" and _complete_rows(out) > target:
                time.sleep(rng.uniform(0.0, 0.25))
                break
            time.sleep(0.005)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
    assert kills >= 3
    finisher = context.Process(target=_child, args=(config, (str(world[0]), str(world[1])), ""))
    finisher.start()
    finisher.join(60)
    assert finisher.exitcode == 0
    assert _losses(out) == _losses(whole.output_dir)  # bit-identical on the CPU
    for name in ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"):
        ours = load_file(str(out / name))
        theirs = load_file(str(whole.output_dir / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name


# ------------------------------------------------------------------ item 10 and the CLI: one line, before the model
def _cli_config(world, tmp_path, out: Path, **overrides) -> Path:
    import yaml

    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(_config(world, out, **overrides).to_dict()))
    return path


@pytest.fixture
def no_model(monkeypatch):
    import sdpo.models.registry

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before a check that needs none")

    monkeypatch.setattr(sdpo.models.registry, "load_spec", refuse)


def test_mistakes_that_need_no_model_are_one_line_before_it_loads(world, tmp_path, capsys, no_model):
    from sdpo.cli import main

    missing = _cli_config(world, tmp_path, tmp_path / "a", cache_dir=str(tmp_path / "no-cache"))
    assert main(["--quiet", "train", str(missing)]) == 2
    used = tmp_path / "b"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    assert main(["--quiet", "train", str(_cli_config(world, tmp_path, used))]) == 2
    with RunLock(tmp_path / "a"):
        assert main(["--quiet", "train", str(_cli_config(world, tmp_path, tmp_path / "a"))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdpo: error:")]
    assert len(errors) == 3
    assert "no-cache" in errors[0] and "already holds a run" in errors[1] and "pid" in errors[2]


def test_sdpo_export_rewrites_the_weights_of_a_run(world, tmp_path, capsys):
    from sdpo.cli import main

    run = tmp_path / "run"
    _train(world, _config(world, run, checkpoint_every=2))
    (run / "pytorch_lora_weights.safetensors").unlink()
    assert main(["--quiet", "export", str(run)]) == 0
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert main(["--quiet", "export", str(tmp_path / "nothing")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_a_full_fine_tune_checkpoints_every_weight_and_resumes_exactly(world, tmp_path):
    import shutil

    whole = _train(world, _config(world, tmp_path / "whole", lora_rank=0, learning_rate=1e-4, checkpoint_every=2))
    weights = load_file(str(tmp_path / "whole" / "checkpoint-2" / "trainable.safetensors"))
    assert len(weights) == len([p for p in whole.model.parameters()])  # every weight trains
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", cut / "checkpoint-2")
    rows = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    _train(world, _config(world, cut, lora_rank=0, learning_rate=1e-4, checkpoint_every=2), resume="latest")
    assert _losses(cut) == _losses(tmp_path / "whole")


def test_a_run_with_ema_resumes_to_the_same_average_and_sdpo_export_writes_it(world, tmp_path):
    """The moving average is state like the optimizer's: a run cut at checkpoint-2 and resumed ends with the
    same average as one that never stopped, and `sdpo export` rewrites ema/ from the checkpoint."""
    import shutil

    from sdpo.cli import main

    whole = tmp_path / "whole"
    _train(world, _config(world, whole, ema_decay=0.9, checkpoint_every=2))
    state = json.loads((whole / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["ema_updates"] == 2 and (whole / "checkpoint-2" / "ema.safetensors").is_file()
    cut = tmp_path / "cut"
    shutil.copytree(whole / "checkpoint-2", cut / "checkpoint-2")
    rows = (whole / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    _train(world, _config(world, cut, ema_decay=0.9, checkpoint_every=2), resume="latest")
    assert _losses(cut) == _losses(whole)
    for name in ("ema/pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors",
                 "checkpoint-4/ema.safetensors"):
        ours, theirs = load_file(str(cut / name)), load_file(str(whole / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    # Resumed without its average (ema_decay changed) is refused; a checkpoint that lost it is named.
    with pytest.raises(ConfigMismatchError, match="ema_decay"):
        _train(world, _config(world, cut, ema_decay=0.0, checkpoint_every=2, max_steps=6), resume="latest")
    (cut / "checkpoint-4" / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no moving average"):
        _train(world, _config(world, cut, ema_decay=0.9, checkpoint_every=2, max_steps=6), resume="latest")

    exported = load_file(str(whole / "ema" / "pytorch_lora_weights.safetensors"))
    shutil.rmtree(whole / "ema")
    assert main(["--quiet", "export", str(whole)]) == 0
    again = load_file(str(whole / "ema" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(again[k], exported[k]) for k in exported)


NAN_ON_RANK_1 = r"""
import math, os, sys
import sdpo.train.optimize as optimize
real, calls = optimize.preference_step, [0]
def poisoned(*args, **kwargs):
    result = real(*args, **kwargs)
    if os.environ["RANK"] == "1" and calls[0] == 1:  # only this process sees a NaN, at step 2
        result.output.loss = result.output.loss * math.nan
    calls[0] += 1
    return result
optimize.preference_step = poisoned
from sdpo.cli import main
sys.exit(main(["--quiet", "train", sys.argv[1]]))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="gloo CPU launch checked on POSIX")
def test_every_process_skips_a_step_that_one_process_found_non_finite(world, tmp_path):
    from torchrun import two_processes

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    out = tmp_path / "run"
    config = _cli_config(world, tmp_path, out, max_steps=3, train_batch_size=2)
    two_processes([str(script), str(config)], port=29613)
    bad = [json.loads(line) for line in (out / "bad_steps.jsonl").read_text().splitlines()]
    assert [(b["step"], len(b["pairs"])) for b in bad] == [(2, 4)]  # both processes' pairs, logged once
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["bad_steps"] for row in rows] == [0, 1, 1] and "loss" not in rows[1]
    assert "Infinity" not in (out / "metrics.jsonl").read_text() and "NaN" not in (out / "metrics.jsonl").read_text()
