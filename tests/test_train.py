"""The training loop end to end on a tiny toy model: every method, resume, and two processes."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torchrun import two_processes

from sdpo.cli import main
from sdpo.data import CachedPairs
from sdpo.objectives import METHODS, OWN_LOSS_METHODS, MethodConfig
from sdpo.toy import ToySpec
from sdpo.train.config import TrainConfig
from sdpo.train.trainer import latest_checkpoint, train


def _config(out: Path, method: str = "sdpo", **overrides) -> TrainConfig:
    settings = dict(family="toy", output_dir=str(out), method=MethodConfig.preset(method, beta=500.0),
                    lora_rank=4, learning_rate=1e-2, max_steps=4, train_batch_size=4, log_every=1,
                    report_to="none", seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", [m for m in METHODS if m not in OWN_LOSS_METHODS])  # kto, mapo: test_train_kto_mapo
def test_every_method_trains_and_saves_a_loadable_lora(world, tmp_path, method):
    base, cache = world
    spec = ToySpec.from_pretrained(base)
    result = train(_config(tmp_path, method), spec=spec, dataset=CachedPairs(cache), progress=False)
    assert len(result.history) == 4
    first = result.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at 0: policy == reference
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in result.history)
    assert result.history[-1]["loss"] != first["loss"]
    assert any(key.startswith("w_by_t/") for key in first)
    assert all(row["weight_min"] <= row["weight_mean"] + 1e-12 for row in result.history)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    fresh = ToySpec.from_pretrained(base)
    from diffusers import StableDiffusionPipeline

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path))
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=alphas, unet=fresh.unet)
    x = torch.randn(2, 1, 8, 8)
    cond = fresh.encode_prompts(["a handwritten digit 1", "a handwritten digit 2"])
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ours = spec.predict(result.model, x, t, cond)
        loaded = fresh.predict(fresh.unet, x, t, cond)
    torch.testing.assert_close(ours, loaded, atol=1e-5, rtol=1e-4)


class _Crash(Exception):
    """Raised from on_log to kill a run mid-way, as a crash would (no stop signal, no final export)."""


def test_resume_continues_exactly(world, tmp_path):
    base, cache = world
    whole = tmp_path / "whole"
    train(_config(whole, checkpoint_every=2), spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache),
          progress=False)
    # An independent run of the same config that crashes after logging step 3: checkpoint-2, three rows.
    interrupted = tmp_path / "interrupted"

    def crash_after_step_3(step, row, model):
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train(_config(interrupted, checkpoint_every=2), spec=ToySpec.from_pretrained(base),
              dataset=CachedPairs(cache), progress=False, on_log=crash_after_step_3)
    assert latest_checkpoint(interrupted).name == "checkpoint-2"
    assert [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    resumed = train(_config(interrupted, checkpoint_every=2), spec=ToySpec.from_pretrained(base),
                    dataset=CachedPairs(cache), resume="latest", progress=False)
    assert [row["step"] for row in resumed.history] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(_losses(interrupted)), torch.tensor(_losses(whole)), rtol=1e-6, atol=1e-8)


def test_unwritable_output_is_a_clear_error(world, tmp_path):
    base, cache = world
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="output folder is not writable"):
        train(_config(blocker / "run"), spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache))


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch checked on linux")
def test_two_processes_match_one_process(world, tmp_path):
    base, cache = world
    runs = {}
    for processes, per_process in [(1, 4), (2, 2)]:
        out = tmp_path / f"p{processes}"
        config = _config(out, max_steps=3, train_batch_size=per_process).to_dict()
        config.update(pretrained=str(base), cache_dir=str(cache))
        path = tmp_path / f"p{processes}.yaml"
        path.write_text(yaml.safe_dump(config))
        if processes == 1:  # the reference, through the same command in this process
            assert main(["--quiet", "train", str(path)]) == 0
        else:
            two_processes(["-m", "sdpo.cli", "--quiet", "train", str(path)], port=29502)
        runs[processes] = _losses(out)
    torch.testing.assert_close(torch.tensor(runs[2]), torch.tensor(runs[1]), rtol=1e-4, atol=1e-6)
    assert runs[1][-1] != runs[1][0]


def test_a_run_where_every_member_is_masked_says_so(world, tmp_path):
    import dataclasses

    base, cache = world
    config = dataclasses.replace(_config(tmp_path, max_steps=2),
                                 method=MethodConfig.preset("dpo-cm", beta=500.0, mask_threshold=1e6))
    with pytest.warns(UserWarning, match="every pair member was masked"):
        result = train(config, spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache), progress=False)
    assert all(row["masked_fraction"] == 1.0 for row in result.history)


def test_a_stop_signal_checkpoints_and_resume_matches_an_uninterrupted_run(world, tmp_path):
    import signal

    base, cache = world
    whole = tmp_path / "whole"
    train(_config(whole), spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache), progress=False)

    def send_sigterm(step, logged, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster sends before pre-empting the job

    stopped = tmp_path / "stopped"
    previous = signal.getsignal(signal.SIGTERM)
    result = train(_config(stopped), spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache), progress=False,
                   on_log=send_sigterm)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is only there during training
    assert (result.stopped_at, result.stop_signal) == (2, "SIGTERM")
    assert latest_checkpoint(stopped).name == "checkpoint-2"
    assert not (stopped / "pytorch_lora_weights.safetensors").exists()  # no final export from a cut run

    resumed = train(_config(stopped), spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache),
                    resume="latest", progress=False)
    assert resumed.stopped_at is None and (stopped / "pytorch_lora_weights.safetensors").is_file()
    torch.testing.assert_close(torch.tensor(_losses(stopped)), torch.tensor(_losses(whole)), rtol=1e-6, atol=1e-8)


def test_validation_prompts_on_an_embedded_world_through_the_cli(world, tmp_path):
    """The embedded worlds have no diffusers pipeline: their validation samples come from their own sampler."""
    from sdpo.cli import main

    base, cache = world
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(base), "cache_dir": str(cache), "output_dir": str(tmp_path / "run"),
        "max_steps": 2, "train_batch_size": 4, "lora_rank": 4, "report_to": "none",
        "validation_prompts": ["a photo of the digit 3", "a photo of the digit 7"], "validation_inference_steps": 3,
    }))
    assert main(["--quiet", "train", str(config)]) == 0
    folder = tmp_path / "run" / "validation" / "step-000002"
    assert sorted(p.name for p in folder.iterdir()) == ["00.png", "01.png", "prompts.txt"]
    from PIL import Image

    assert Image.open(folder / "00.png").size == (8, 8)


def test_the_published_stabilizers_train_through_the_cli(world, tmp_path):
    """Diffusion-DPO with an SFT term and with Diffusion-SDPO's safeguard, switched on with --set as a user would."""
    from sdpo.cli import main

    base, cache = world
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(base), "cache_dir": str(cache), "output_dir": str(tmp_path / "run"),
        "max_steps": 3, "train_batch_size": 4, "lora_rank": 4, "report_to": "none", "log_every": 1,
        "learning_rate": 1e-2, "method": {"name": "sdpo", "beta": 500.0},
    }))
    assert main(["--quiet", "train", str(config), "--set", "method.name=diffusion-dpo", "method.safeguard=true",
                 "method.sft_weight=125"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(0.0 <= row["loser_scale"] <= 1.0 for row in rows)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())["method"]
    assert (saved["name"], saved["safeguard"], saved["sft_weight"]) == ("diffusion-dpo", True, 125.0)
    # At the start policy == reference, so the loss is log 2 plus the SFT term on the winners' errors.
    assert rows[0]["loss"] > math.log(2)


# ------------------------------------------------------------------ EMA of the trained weights
def _lora_by_module(state: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed by module and A/B, whatever the adapter is called."""
    return {k.replace(f".{adapter}.", "."): v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def test_ema_is_off_by_default_and_on_it_leaves_the_raw_training_alone(world, tmp_path):
    base, cache = world
    assert TrainConfig().ema_decay == 0.0
    runs = {}
    for name, decay in [("plain", 0.0), ("ema", 0.9)]:
        out = tmp_path / name
        runs[name] = train(_config(out, max_steps=3, checkpoint_every=2, ema_decay=decay),
                           spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache), progress=False)
    assert not (tmp_path / "plain" / "ema").exists()
    assert not (tmp_path / "plain" / "checkpoint-2" / "ema.safetensors").exists()
    assert "ema_updates" not in json.loads((tmp_path / "plain" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (tmp_path / "ema" / "checkpoint-2" / "ema.safetensors").is_file()
    assert _losses(tmp_path / "ema") == _losses(tmp_path / "plain")  # the average never feeds back
    from safetensors.torch import load_file

    raw = {name: load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors")) for name in runs}
    assert all(torch.equal(raw["ema"][k], raw["plain"][k]) for k in raw["plain"])


def test_the_exported_ema_equals_an_independent_average_of_the_trajectory(world, tmp_path):
    """3 steps, decay 0.9: EMAModel's schedule copies the weights at update 1, then decays by
    min(0.9, n / (9 + n)): 2/11 at update 2, 3/12 at update 3."""
    base, cache = world
    trajectory = []

    def record(step, logged, model):
        trajectory.append({n: p.detach().clone().double() for n, p in model.named_parameters() if p.requires_grad})

    result = train(_config(tmp_path, max_steps=3, ema_decay=0.9), spec=ToySpec.from_pretrained(base),
                   dataset=CachedPairs(cache), progress=False, on_log=record)
    assert len(trajectory) == 3
    expected = dict(trajectory[0])
    for n, weights in enumerate(trajectory[1:], start=2):
        decay = min(0.9, n / (9 + n))
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}

    fresh = ToySpec.from_pretrained(base)
    fresh.load_lora(tmp_path / "ema")  # the pipeline's lora_state_dict / load_lora_into_unet path
    loaded = _lora_by_module({n: p.detach() for n, p in fresh.unet.named_parameters()}, "default_0")
    ours = _lora_by_module(expected, "default")
    assert loaded.keys() == ours.keys() and len(ours) > 0
    for key, value in ours.items():
        torch.testing.assert_close(loaded[key].double(), value, rtol=0, atol=1e-7)
    raw = _lora_by_module({n: p.detach() for n, p in result.model.named_parameters()}, "default")
    assert any(not torch.allclose(loaded[k], raw[k]) for k in ours)  # the average is not the last weights


def test_ema_through_the_cli_loads_into_the_family_pipeline(world, tmp_path):
    """`--set ema_decay=0.9` writes OUTPUT/ema/ as the pipeline reads it: a LoRA, and for lora_rank=0 a unet/."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from sdpo.cli import main

    base, cache = world
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(base), "cache_dir": str(cache), "output_dir": str(tmp_path / "run"),
        "max_steps": 3, "train_batch_size": 4, "lora_rank": 4, "report_to": "none", "learning_rate": 1e-2,
        "method": {"name": "sdpo", "beta": 500.0},
    }))
    assert main(["--quiet", "train", str(config), "--set", "ema_decay=0.9"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "train_config.json").read_text())["ema_decay"] == 0.9
    fresh = ToySpec.from_pretrained(base)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(run / "ema"))
    StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=alphas, unet=fresh.unet)
    raw = load_file(str(run / "pytorch_lora_weights.safetensors"))
    averaged = load_file(str(run / "ema" / "pytorch_lora_weights.safetensors"))
    assert averaged.keys() == raw.keys() and any(not torch.equal(averaged[k], raw[k]) for k in raw)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0])
    cond = fresh.encode_prompts(["a handwritten digit 1", "a handwritten digit 2"])
    base_spec = ToySpec.from_pretrained(base)
    with torch.no_grad():
        assert not torch.allclose(fresh.predict(fresh.unet, x, t, cond), base_spec.predict(base_spec.unet, x, t, cond))

    full = tmp_path / "full"
    assert main(["--quiet", "train", str(config), "--set", "ema_decay=0.9", "lora_rank=0", "learning_rate=1e-4",
                 f"output_dir={full}"]) == 0
    averaged_unet = UNet2DConditionModel.from_pretrained(str(full / "ema"), subfolder="unet")
    raw_unet = UNet2DConditionModel.from_pretrained(str(full), subfolder="unet")
    ema_state, raw_state = averaged_unet.state_dict(), raw_unet.state_dict()
    assert ema_state.keys() == raw_state.keys()
    assert any(not torch.equal(ema_state[k], raw_state[k]) for k in raw_state)


# ------------------------------------------------------------------ per-pair weights from the score gap
def test_pair_weighting_by_gap_trains_through_the_cli(world, tmp_path, capsys):
    from sdpo.cli import main
    from sdpo.data import precompute, read_pairs

    base, cache = world
    gaps = CachedPairs(cache).gaps()
    assert gaps is not None and bool((gaps > 0).all())  # the conftest world's pairs come from `sdpo pairs`
    config = tmp_path / "train.yaml"
    settings = {"family": "toy", "pretrained": str(base), "cache_dir": str(cache), "output_dir": str(tmp_path / "run"),
                "max_steps": 2, "train_batch_size": 4, "lora_rank": 4, "report_to": "none", "log_every": 1,
                "learning_rate": 1e-2, "method": {"name": "sdpo", "beta": 500.0}}
    config.write_text(yaml.safe_dump(settings))
    assert main(["--quiet", "train", str(config), "--set", "pair_weighting=gap"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["loss"]) for row in rows)
    # Step 1: policy == reference, so every pair's term is log 2 and the loss is log 2 x the batch's mean weight.
    from sdpo.train.trainer import GlobalBatchOrder

    rows_1, _ = GlobalBatchOrder(len(gaps), 4, 1, 0, seed=0).indices(0)
    mean_weight = float((gaps[rows_1] / gaps.mean()).mean())
    assert rows[0]["pair_weight_mean"] == pytest.approx(mean_weight, rel=1e-6) and mean_weight != pytest.approx(1.0)
    assert rows[0]["loss"] == pytest.approx(math.log(2) * mean_weight, rel=1e-5)

    # A cache made from pairs without a gap: one line naming it, before any model loads.
    pairs = read_pairs(Path(cache).parent / "candidates" / "pairs.jsonl")  # what the conftest world precomputed
    for pair in pairs:
        pair.metadata.pop("gap", None)
    bare = precompute(pairs, ToySpec.from_pretrained(base), tmp_path / "bare-cache", progress=False)
    settings.update(cache_dir=str(bare), output_dir=str(tmp_path / "bare-run"))
    config.write_text(yaml.safe_dump(settings))
    capsys.readouterr()
    assert main(["--quiet", "train", str(config), "--set", "pair_weighting=gap"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("sdpo: error: pair_weighting=gap needs each pair's score gap") and str(bare) in error


def test_ema_under_sharded_weights_is_refused_in_one_line():
    from sdpo.train.ema import check_ema_supported

    check_ema_supported(TrainConfig(ema_decay=0.9), sharded=False)
    check_ema_supported(TrainConfig(), sharded=True)
    with pytest.raises(ValueError, match="ema_decay is not supported under FSDP or DeepSpeed") as caught:
        check_ema_supported(TrainConfig(ema_decay=0.9), sharded=True)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------ starting from a saved LoRA
def test_init_lora_starts_from_the_saved_adapter_through_the_cli(world, tmp_path, capsys):
    """A run with init_lora starts where the saved run ended: at a vanishing learning rate it saves the
    same adapter back, and its first loss is off ln 2 (policy != reference), unlike a fresh adapter's."""
    from safetensors.torch import load_file

    from sdpo.cli import main

    base, cache = world
    first = tmp_path / "first"
    train(_config(first, "diffusion-dpo", pretrained=str(base), cache_dir=str(cache)))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(base), "cache_dir": str(cache), "output_dir": str(tmp_path / "next"),
        "max_steps": 1, "train_batch_size": 4, "lora_rank": 4, "report_to": "none", "log_every": 1, "seed": 1,
        "learning_rate": 1e-12, "method": {"name": "diffusion-dpo", "beta": 500.0}}))
    assert main(["--quiet", "train", str(config), "--set", f"init_lora={first}"]) == 0
    saved, again = (load_file(str(run / "pytorch_lora_weights.safetensors")) for run in (first, tmp_path / "next"))
    assert saved.keys() == again.keys() and any(v.abs().max() > 0 for k, v in saved.items() if ".up." in k or "lora_B" in k)
    assert all(torch.allclose(saved[k], again[k], atol=1e-7) for k in saved)
    assert abs(_losses(tmp_path / "next")[0] - math.log(2)) > 1e-3
    assert main(["--quiet", "train", str(config), "--set", "output_dir=" + str(tmp_path / "fresh")]) == 0
    assert abs(_losses(tmp_path / "fresh")[0] - math.log(2)) < 1e-6

    capsys.readouterr()
    assert main(["--quiet", "train", str(config), "--set", f"init_lora={first}", "lora_rank=2",
                 "output_dir=" + str(tmp_path / "other-rank")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "another lora_rank" in err[0]
    assert main(["--quiet", "train", str(config), "--set", f"init_lora={tmp_path}",
                 "output_dir=" + str(tmp_path / "no-weights")]) == 2
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err
