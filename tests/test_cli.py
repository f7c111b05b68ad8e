"""The real-model path through the command line: precompute, train, validation samples, LoRA export.

Tiny random SD and Wan pipelines are saved to folders and used exactly as a real model folder would be.
"""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdpo.cli import main
from sdpo.data import PreferencePair, write_pairs_jsonl
from sdpo.models import tiny

CASES = {
    # family: (builder, pipeline class, media size flags, frames or None)
    "sd": (tiny.build_tiny_sd, "StableDiffusionPipeline", ["--height", "16", "--width", "16"], None),
    "wan": (tiny.build_tiny_wan, "WanPipeline", ["--height", "32", "--width", "32", "--frames", "5"], 5),
}


def _picture(rng, size):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _write_pairs(folder, frames, size, count=4):
    rng = np.random.default_rng(0)
    pairs = []
    for index in range(count):
        media = {}
        for role in ("chosen", "rejected"):
            if frames is None:
                path = folder / f"{index}-{role}.png"
                _picture(rng, size).save(path)
            else:  # a clip as a folder of frame images
                path = folder / f"{index}-{role}"
                path.mkdir()
                for frame in range(frames):
                    _picture(rng, size).save(path / f"{frame:03d}.png")
            media[role] = path.name
        pairs.append(PreferencePair(prompt=f"a test prompt number {index}", **media))
    return write_pairs_jsonl(pairs, folder / "pairs.jsonl")


@pytest.mark.parametrize("family", list(CASES))
def test_precompute_train_and_export_through_the_cli(family, tmp_path):
    build, pipeline_name, size_flags, frames = CASES[family]
    model = build(tmp_path / "model")
    media = tmp_path / "media"
    media.mkdir()
    pairs = _write_pairs(media, frames, int(size_flags[1]))
    cache = tmp_path / "cache"
    assert main(["--quiet", "precompute", "--family", family, "--pretrained", str(model), "--pairs", str(pairs),
                 "--out", str(cache), *size_flags]) == 0

    out = tmp_path / "run"
    config = {"family": family, "pretrained": str(model), "cache_dir": str(cache), "output_dir": str(out),
              "method": {"name": "sdpo", "beta": 100.0}, "lora_rank": 4, "max_steps": 2, "train_batch_size": 2,
              "log_every": 1, "report_to": "tensorboard", "validation_prompts": ["a validation prompt"],
              "validation_inference_steps": 2}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert main(["--quiet", "train", str(config_path), "--set", "learning_rate=0.01"]) == 0

    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard events are written"
    suffix = ".png" if frames is None else ".gif"
    assert (out / "validation" / "step-000002" / f"00{suffix}").is_file()

    import diffusers

    pipe = getattr(diffusers, pipeline_name).from_pretrained(str(model))
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    extra = {} if frames is None else {"num_frames": frames}
    result = pipe("a prompt", num_inference_steps=2, height=int(size_flags[1]), width=int(size_flags[3]),
                  output_type="pt", generator=torch.Generator().manual_seed(0), **extra)
    pixels = result.images if frames is None else result.frames
    assert torch.isfinite(torch.as_tensor(pixels)).all()


def test_training_on_a_cache_of_another_family_is_a_clear_error(tmp_path, capsys):
    model = tiny.build_tiny_sd(tmp_path / "model")
    media = tmp_path / "media"
    media.mkdir()
    pairs = _write_pairs(media, None, 16)
    assert main(["--quiet", "precompute", "--family", "sd", "--pretrained", str(model), "--pairs", str(pairs),
                 "--out", str(tmp_path / "cache"), "--height", "16", "--width", "16"]) == 0
    wan = tiny.build_tiny_wan(tmp_path / "wan")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"family": "wan", "pretrained": str(wan), "cache_dir": str(tmp_path / "cache"),
                                      "output_dir": str(tmp_path / "run"), "report_to": "none"}))
    assert main(["--quiet", "train", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # loaders may print progress bars before it
    assert last.startswith("sdpo: error:") and "'sd'" in last


def test_missing_model_and_config_errors(tmp_path, capsys):
    assert main(["--quiet", "precompute", "--family", "sd", "--pretrained", str(tmp_path / "nope"),
                 "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "cache")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["--quiet", "train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1\n")
    assert main(["--quiet", "train", str(bad)]) == 2
    assert "unknown config key(s): learning_rat" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "evaluate", "precompute"])
@pytest.mark.parametrize("family, size, message", [
    ("sd", ["--frames", "49", "--height", "512", "--width", "512"],
     "--frames is for video models; the sd model makes images: drop --frames"),
    ("cogvideox", ["--height", "480", "--width", "720"],
     "the cogvideox model makes videos: give --frames with --height and --width (e.g. --frames 49)"),
])
def test_frames_must_match_the_family_before_anything_loads(command, family, size, message, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    where = {"generate": ["--prompts", "prompts.txt", "--out", "gen"],
             "evaluate": ["--prompts", "prompts.txt", "--out", "eval", "--run", "a=run", "--reward", "brightness"],
             "precompute": ["--pairs", "pairs.jsonl", "--out", str(tmp_path / "cache")]}[command]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        code = main(["--quiet", command, "--family", family, "--pretrained", "no/such-model", *where, *size])
    assert code == 2 and capsys.readouterr().err.strip() == f"sdpo: error: {message}"


def _cached_model(tmp_path, family, *precompute_flags):
    """A tiny ``family`` model folder and a two-pair cache made with ``precompute_flags`` (on the CPU)."""
    build, _, size_flags, frames = CASES[family]
    model = build(tmp_path / "model")
    media = tmp_path / "media"
    media.mkdir()
    pairs = _write_pairs(media, frames, int(size_flags[1]), count=2)
    cache = tmp_path / "cache"
    assert main(["--quiet", "precompute", "--family", family, "--pretrained", str(model), "--pairs", str(pairs),
                 "--out", str(cache), *size_flags, "--device", "cpu", *precompute_flags]) == 0
    return model, cache


def _train(tmp_path, family, model, cache, **fields):
    """``sdpo train`` for one step of rank-2 LoRA (unless ``fields`` say otherwise); the run folder."""
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"family": family, "pretrained": str(model), "cache_dir": str(cache),
                                      "output_dir": str(out), "lora_rank": 2, "max_steps": 1, "log_every": 1,
                                      "train_batch_size": 2, "report_to": "none", **fields}))
    assert main(["--quiet", "train", str(config)]) == 0
    return out


def test_a_bf16_cache_trains_in_fp32(tmp_path):
    """Precompute on a GPU stores bf16 text states; a full-precision run must still read them."""
    import json

    model, cache = _cached_model(tmp_path, "sd", "--dtype", "bf16", "--vae-tiling")
    tensors = json.loads((cache / "manifest.json").read_text())["tensors"]
    assert tensors["latents_chosen"]["dtype"] == "float32"
    assert tensors["cond.encoder_hidden_states"]["dtype"] == "bfloat16"
    out = _train(tmp_path, "sd", model, cache)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_validation_samples_under_bf16_mixed_precision(tmp_path):
    """accelerate's bf16 wrapper returns float32 latents; SD's pipeline feeds them to a bf16 VAE."""
    model, cache = _cached_model(tmp_path, "sd")
    out = _train(tmp_path, "sd", model, cache, mixed_precision="bf16", validation_prompts=["a prompt"],
                 validation_inference_steps=2)
    assert (out / "validation" / "step-000001" / "00.png").is_file()


def test_full_fine_tuning_starts_at_ln2_under_bf16(tmp_path):
    """Before the first update the policy is the reference, so the loss must be ln 2 exactly.

    A reference copy kept in bf16 beside float32 trained weights computes differently (Wan keeps some
    modules in float32 only in the copy) and, multiplied by beta, biased the first loss to ~0.64.
    """
    import json
    import math

    model, cache = _cached_model(tmp_path, "wan")
    out = _train(tmp_path, "wan", model, cache, lora_rank=0, mixed_precision="bf16",
                 method={"name": "sdpo", "beta": 500.0})
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert json.loads((out / "run_info.json").read_text())["mixed_precision"] == "bf16"


def test_a_stopped_training_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import sdpo.train.trainer as trainer
    from sdpo.cli import STOPPED_EXIT_CODE

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"family": "sd", "output_dir": str(tmp_path / "run"), "report_to": "none"}))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: trainer.TrainResult(
        output_dir=tmp_path / "run", stopped_at=7, stop_signal="SIGUSR1"))
    assert main(["--quiet", "train", str(config)]) == STOPPED_EXIT_CODE
    err = capsys.readouterr().err
    assert "stopped by SIGUSR1 after step 7" in err and "--resume latest" in err
