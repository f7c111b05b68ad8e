"""`sdpo demo` end to end at minimal size, and its bad-input behaviour through the CLI."""

import json

import pytest
from safetensors import safe_open
from tiny_models import TINY_DIGITS, TINY_VIDEO

from sdpo.cli import main
from sdpo.demo import DemoConfig, run_demo
from sdpo.folders import write_marker


def _tiny(out, cache_root, **overrides):
    settings = dict(methods=("all",), steps=3, pairs_per_digit=2, eval_per_digit=2, batch_size=4,
                    num_inference_steps=4, out=str(out), cache_root=str(cache_root), toy_overrides=TINY_DIGITS,
                    progress=False)
    settings.update(overrides)
    return DemoConfig(**settings)


def test_demo_end_to_end_writes_the_report(tmp_path):
    out = run_demo(_tiny(tmp_path / "demo", tmp_path / "models"))
    report = (out / "report.md").read_text()
    for method in ("diffusion-dpo", "dpo-cm", "sdpo"):
        assert f"| {method} |" in report
        assert (out / f"samples_{method}.png").is_file()
        assert (out / method / "pytorch_lora_weights.safetensors").is_file()
    for figure in ("training_curves.png", "weight_profile.png", "samples_base.png"):
        assert (out / figure).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["sdpo"]["n"] == 20 and 0 <= results["sdpo"]["win_rate"]["value"] <= 1
    with safe_open(str(out / "eval_samples.safetensors"), "pt") as handle:
        assert handle.get_tensor("base").shape == (20, 1, 8, 8)
        assert handle.get_tensor("sdpo").shape == (20, 1, 8, 8)
        assert len(json.loads(handle.metadata()["prompts"])) == 20
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    # The benchmark scripts read this folder format: a method variant retrained on its pairs, and
    # the methods compared head to head on its samples.
    variant = _benchmark("variant").run_variant(out, "sdpo", {"normalize": True}, 2)
    assert "sdpo + normalize=True, 2 steps" in variant
    assert all(f"| {name} |" in variant for name in ("base", "diffusion-dpo", "dpo-cm", "sdpo"))
    table = _benchmark("head_to_head").head_to_head([out])
    assert "| diffusion-dpo vs sdpo |" in table and "20 paired samples" in table


def _benchmark(name):
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def test_video_demo_end_to_end(tmp_path):
    out = run_demo(_tiny(tmp_path / "video", tmp_path / "models", world="video", methods=("sdpo",),
                         toy_overrides=TINY_VIDEO))
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"base", "sdpo"} and results["sdpo"]["n"] == 20
    assert (out / "samples_sdpo.png").is_file() and (out / "sdpo" / "pytorch_lora_weights.safetensors").is_file()
    assert "video digits world" in (out / "report.md").read_text()


def test_failed_demo_leaves_nothing_behind(tmp_path, monkeypatch):
    import sdpo.train.trainer as trainer

    def explode(*args, **kwargs):
        raise RuntimeError("simulated crash during training")

    monkeypatch.setattr(trainer, "train", explode)
    previous = tmp_path / "demo"
    previous.mkdir()
    (previous / "report.md").write_text("an earlier report")
    write_marker(previous, "demo", {})  # an earlier demo's folder: the only kind demo --out may replace
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_demo(_tiny(previous, tmp_path / "models"))
    assert (previous / "report.md").read_text() == "an earlier report"  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "models"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "0"], "steps must be a positive integer"),
        (["demo", "--beta", "-1"], "beta must be a positive finite number"),
    ],
)
def test_cli_bad_values_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdpo: error:") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_cli_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--method", "ppo"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'ppo'" in capsys.readouterr().err


def test_cli_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--quiet", "demo", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "output folder is not writable" in err and err.count("\n") == 1


def test_corrupt_base_model_cache_is_a_clear_error(tmp_path):
    from sdpo.toy.digits.model import ToyModelConfig
    from sdpo.toy.pretraining import pretrain_base

    folder = pretrain_base(ToyModelConfig(**TINY_DIGITS), cache_root=tmp_path / "models", progress=False)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt") as error:
        run_demo(_tiny(tmp_path / "demo", tmp_path / "models"))
    assert "delete it" in str(error.value)
    assert not (tmp_path / "demo").exists()
