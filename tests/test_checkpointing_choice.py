"""`gradient_checkpointing: auto`: the setting, and the probe's three outcomes with CUDA's memory counters
faked on the CPU (the probe step itself really runs, on the toy world's model)."""

import json

import pytest
import torch
import yaml

from sdpo.cli import main
from sdpo.data import CachedPairs
from sdpo.errors import InputError
from sdpo.toy import ToySpec
from sdpo.train import checkpointing_choice
from sdpo.train.config import TrainConfig
from sdpo.train.trainer import train

GIB = 2**30
PROBE_PEAK = 1 * GIB
"""What the faked allocator reports as the probe step's peak above the memory held before it."""


def _config(out, **overrides) -> TrainConfig:
    settings = dict(family="toy", output_dir=str(out), method={"name": "sdpo", "beta": 500.0}, lora_rank=4,
                    learning_rate=1e-2, max_steps=2, train_batch_size=4, log_every=1, report_to="none", seed=1)
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.parametrize(("written", "value"), [("auto", "auto"), ("yes", True), ("false", False), (True, True)])
def test_the_setting_is_true_false_or_auto(written, value):
    assert TrainConfig(gradient_checkpointing=written).gradient_checkpointing == value


@pytest.mark.parametrize("written", ["sometimes", 1, "AUTO"])
def test_anything_else_is_one_line_naming_the_field(written):
    with pytest.raises(InputError, match="^gradient_checkpointing must be") as caught:
        TrainConfig(gradient_checkpointing=written)
    assert "\n" not in str(caught.value)


@pytest.fixture
def faked_cuda(monkeypatch):
    """The probe's counters read from a fake CUDA allocator: ``free`` bytes free, PROBE_PEAK of peak."""
    free = {"bytes": 0}
    monkeypatch.setattr(checkpointing_choice, "accelerator_memory", checkpointing_choice.CudaMemory)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args: PROBE_PEAK)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (free["bytes"], 80 * GIB))
    return free


def _run(world, out, setting):
    base, cache = world
    return train(_config(out, gradient_checkpointing=setting), spec=ToySpec.from_pretrained(base),
                 dataset=CachedPairs(cache), progress=False)


def test_auto_turns_checkpointing_off_when_the_step_fits_and_trains_as_false_does(world, tmp_path, faked_cuda, capfd):
    faked_cuda["bytes"] = 8 * GIB
    auto = _run(world, tmp_path / "auto", "auto")
    assert "gradient_checkpointing auto: off (a step without it needs 1.00 GiB of 8.00 GiB free" in capfd.readouterr().err
    assert not auto.model.is_gradient_checkpointing
    # The probe step changed nothing: no update, no gradient left behind, the random streams restored.
    plain = _run(world, tmp_path / "plain", False)
    assert [row["loss"] for row in auto.history] == [row["loss"] for row in plain.history]


def test_auto_turns_checkpointing_on_when_the_step_does_not_fit_with_the_margin(world, tmp_path, faked_cuda, capfd):
    faked_cuda["bytes"] = int(PROBE_PEAK / (1 - checkpointing_choice.AUTO_MARGIN))  # the optimizer state tips it
    result = _run(world, tmp_path / "run", "auto")
    assert "gradient_checkpointing auto: on (a step without it needs 1.00 GiB" in capfd.readouterr().err
    assert result.model.is_gradient_checkpointing


def test_a_probe_that_runs_out_of_memory_turns_checkpointing_on(world, tmp_path, faked_cuda, monkeypatch, capfd):
    faked_cuda["bytes"] = 64 * GIB

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(checkpointing_choice, "cache_micro_step", out_of_memory)
    result = _run(world, tmp_path / "run", "auto")
    assert "gradient_checkpointing auto: on (a step without it ran out of memory)" in capfd.readouterr().err
    assert result.model.is_gradient_checkpointing and len(result.history) == 2


def test_auto_through_the_cli_is_off_on_a_cpu(world, tmp_path, capfd):
    base, cache = world
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"family": "toy", "pretrained": str(base), "cache_dir": str(cache),
                                      "output_dir": str(tmp_path / "run"), "max_steps": 1, "train_batch_size": 4,
                                      "lora_rank": 4, "report_to": "none", "gradient_checkpointing": True}))
    assert main(["--quiet", "train", str(config), "--set", "gradient_checkpointing=auto"]) == 0
    assert "gradient_checkpointing auto: off (no memory probe on cpu)" in capfd.readouterr().err
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["gradient_checkpointing"] == "auto"


@pytest.mark.parametrize(("kind", "processes", "on"), [("FSDP", 1, True), ("DEEPSPEED", 1, True),
                                                        ("MULTI_GPU", 2, True), ("NO", 1, False)])
def test_auto_is_on_without_a_probe_where_one_cannot_run(kind, processes, on, capfd):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes,
                                  is_main_process=True)
    assert checkpointing_choice.checkpoint_before_prepare(TrainConfig(gradient_checkpointing="auto"), accelerator) is on
    assert ("no memory probe runs" in capfd.readouterr().err) is on
    assert checkpointing_choice.checkpoint_before_prepare(TrainConfig(gradient_checkpointing=False), accelerator) is False


def test_a_bucketed_cache_is_probed_with_a_batch_of_its_largest_bucket():
    from types import SimpleNamespace

    from sdpo.train.order import GlobalBatchOrder

    buckets = torch.tensor([0] * 8 + [1] * 4 + [2] * 8)  # 2 batches of 64x64, 1 of 96x96, 2 of 48x84
    order = GlobalBatchOrder(20, 4, 1, 0, seed=3, buckets=buckets)
    run = SimpleNamespace(order=order, dataset=SimpleNamespace(buckets=[(64, 64), (96, 96), (48, 84)]))
    step = checkpointing_choice.largest_micro_step(run)
    assert set(buckets[order.indices(step)[0]].tolist()) == {1}
    assert checkpointing_choice.largest_micro_step(SimpleNamespace(order=GlobalBatchOrder(20, 4, 1, 0, seed=3),
                                                                   dataset=SimpleNamespace())) == 0
