"""Every mistake a stage can see without its model is one line before the model loads (issue 19).

Typed as a user types them, through ``sdpo.cli.main``; the model loader is made to fail if reached, so
a check that came after loading would show up as a failure here, not as minutes lost on a video model.
Each case asserts the exit status, the one line, and that no file was written or changed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import sdpo.models.registry
from sdpo.cli import main


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before a check that needs none")

    monkeypatch.setattr(sdpo.models.registry, "load_spec", refuse)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdpo: error: "), lines
    return lines[0]


def _lora(folder: Path, prefix: str, rank: int, header_rank: int | None = None, family: str | None = None) -> Path:
    """A LoRA run folder as training writes it: weights (header with the adapter config) and train_config.json."""
    folder.mkdir(parents=True)
    tensors = {f"{prefix}.block.to_q.lora_A.weight": torch.zeros(rank, 8),
               f"{prefix}.block.to_q.lora_B.weight": torch.zeros(8, rank)}
    metadata = {"unet_lora_adapter_metadata": json.dumps({"r": header_rank or rank, "target_modules": ["to_q"]})}
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"), metadata=metadata)
    if family:
        (folder / "train_config.json").write_text(json.dumps({"family": family, "lora_rank": rank}))
    return folder


@pytest.fixture
def user(tmp_path: Path) -> Path:
    """A user's folder: a prompts file, an empty LoRA folder, a file where a folder belongs, LoRAs that do not fit."""
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    (tmp_path / "latin1.txt").write_bytes("a cat\ncaf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "one.txt").write_text("a cat\n")
    (tmp_path / "empty-lora").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    _lora(tmp_path / "wan-lora", "transformer", 4, family="wan")
    _lora(tmp_path / "transformer-lora", "transformer", 4)
    _lora(tmp_path / "torn-lora", "unet", 8, header_rank=4, family="sd")
    return tmp_path


GENERATE = ["--quiet", "generate", "--family", "sd", "--pretrained", "models/sd", "--prompts", "prompts.txt",
            "--height", "16", "--width", "16"]


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0", "--out", "gen"], "--steps must be at least 1, got 0"),
    (["--batch-size", "0", "--out", "gen"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-1", "--out", "gen"], "--batch-size must be at least 1, got -1"),
    (["--per-prompt", "0", "--out", "gen"], "--per-prompt must be at least 1, got 0"),
    (["--guidance", "nan", "--out", "gen"], "--guidance must be a finite number, got nan"),
    (["--height", "17", "--out", "gen"], "--height 17: the sd model needs a multiple of 8 (e.g. 16 or 24)"),
    (["--out", "a-file"], "--out a-file is a file, not a folder: name a folder"),
    (["--out", "a-file/gen"], "--out a-file/gen: a-file is a file, not a folder"),
    (["--lora", "missing", "--out", "gen"], "--lora missing: no such folder"),
    (["--lora", "empty-lora", "--out", "gen"], "--lora empty-lora: no LoRA weights (*.safetensors) in it"),
    (["--lora", "wan-lora", "--out", "gen"], "--lora wan-lora is a LoRA of the wan family, not sd"),
    (["--lora", "transformer-lora", "--out", "gen"], "its weights are for a transformer, but the sd model's denoiser is a unet"),
    (["--lora", "torn-lora", "--out", "gen"], "its adapter config says rank 4 but its weights have rank 8"),
    (["--prompts", "latin1.txt", "--out", "gen"], "latin1.txt:2: not UTF-8 text (byte 0xe9)"),
])
def test_generate_refuses_before_the_model_loads(extra, message, user, no_model, capsys, monkeypatch) -> None:
    monkeypatch.chdir(user)
    before = _snapshot(user)
    assert main([*GENERATE, *extra]) == 2
    assert message in _one_error(capsys)
    assert _snapshot(user) == before


def test_a_full_disk_under_out_is_refused_before_the_model_loads(user, no_model, capsys, monkeypatch) -> None:
    monkeypatch.chdir(user)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    assert main([*GENERATE, "--out", "gen"]) == 2
    assert "--out gen: the disk holding . is full (4096 bytes free)" in _one_error(capsys)
    assert not (user / "gen").exists()


EVALUATE = ["--quiet", "evaluate", "--family", "sd", "--pretrained", "models/sd", "--prompts", "prompts.txt",
            "--height", "16", "--width", "16", "--reward", "brightness", "--out", "eval"]


@pytest.mark.parametrize("extra, message", [
    (["--run", "base=empty-lora"], "--run base=...: the name 'base' is taken by the evaluation itself"),
    (["--run", "noise=empty-lora"], "the name 'noise' is taken"),
    (["--run", "a/b=empty-lora"], "--run a/b=...: a run name is part of file names"),
    (["--run", "tuned=missing"], "--run tuned=missing: no such folder"),
    (["--run", "tuned=empty-lora"], "no LoRA weights (*.safetensors) in it"),
    (["--run", "tuned=wan-lora"], "--run tuned=wan-lora is a LoRA of the wan family, not sd"),
    (["--run", "tuned=torn-lora", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["--run", "tuned=torn-lora", "--per-prompt", "0"], "--per-prompt must be at least 1, got 0"),
    (["--run", "tuned=torn-lora", "--width", "12"], "--width 12: the sd model needs a multiple of 8 (e.g. 8 or 16)"),
])
def test_evaluate_refuses_before_the_model_loads(extra, message, user, no_model, capsys, monkeypatch) -> None:
    monkeypatch.chdir(user)
    before = _snapshot(user)
    assert main([*EVALUATE, *extra]) == 2
    assert message in _one_error(capsys)
    assert _snapshot(user) == before


def test_evaluate_of_one_sample_is_refused_before_the_model_loads(user, no_model, capsys, monkeypatch) -> None:
    monkeypatch.chdir(user)
    _lora(user / "sd-lora", "unet", 4, family="sd")
    args = [*EVALUATE, "--run", "tuned=sd-lora"]
    args[args.index("prompts.txt")] = "one.txt"
    assert main(args) == 2
    assert "needs at least two samples for its intervals: 1 prompt(s) x --per-prompt 1" in _one_error(capsys)


def test_a_lora_that_does_not_fit_the_loaded_model_is_one_line(tmp_path, capsys) -> None:
    """What only the model can tell (the LoRA's widths): one line naming the LoRA, not a peft traceback."""
    from sdpo.models import tiny

    model = tiny.build_tiny_sd(tmp_path / "sd")
    lora = tmp_path / "lora"
    lora.mkdir()
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{name}.lora_A.weight": torch.zeros(4, 35), f"{name}.lora_B.weight": torch.zeros(32, 4)},
              str(lora / "pytorch_lora_weights.safetensors"))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    assert main(["--quiet", "generate", "--family", "sd", "--pretrained", str(model), "--prompts",
                 str(tmp_path / "prompts.txt"), "--steps", "1", "--height", "16", "--width", "16",
                 "--lora", str(lora), "--out", str(tmp_path / "gen")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # diffusers logs its own lines before
    assert line.startswith(f"sdpo: error: the LoRA {lora} does not fit the sd model {model}") and "size mismatch" in line
    assert not (tmp_path / "gen" / "candidates.jsonl").exists()


# ------------------------------------------------------------------ score and pairs: the candidates file
@pytest.fixture
def scored(world, tmp_path: Path) -> Path:
    """A copy of the session world's scored candidates folder (40 candidates), safe to edit."""
    folder = tmp_path / "candidates"
    shutil.copytree(Path(world[1]).parent / "candidates", folder)
    (folder / "pairs.jsonl").unlink(missing_ok=True)
    return folder


def _edit_line(folder: Path, number: int, **changes: object) -> None:
    path = folder / "candidates.jsonl"
    lines = path.read_text().splitlines()
    lines[number - 1] = json.dumps({**json.loads(lines[number - 1]), **changes})
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("args, message", [
    (["--weight", "nan"], "--weight must be a finite number, got nan"),
    (["--weight", "inf"], "--weight must be a finite number, got inf"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
])
def test_score_refuses_bad_numbers(scored, args, message, capsys) -> None:
    before = _snapshot(scored)
    assert main(["--quiet", "score", str(scored), "--reward", "digits", *args]) == 2
    assert message in _one_error(capsys)
    assert _snapshot(scored) == before


@pytest.mark.parametrize("edit, message", [
    ({"total": float("nan")}, "candidates.jsonl:3: invalid JSON (NaN is not a JSON value)"),
    ({"total": "high"}, "candidates.jsonl:3: 'total' must be a finite number (or absent), got 'high'"),
    ({"scores": {"digits": True}}, "candidates.jsonl:3: score 'digits' must be a finite number, got True"),
    ({"path": "/etc/hostname"}, "candidates.jsonl:3: path '/etc/hostname' is outside"),
    ({"path": "../../secret.png"}, "candidates.jsonl:3: path '../../secret.png' is outside"),
    ({"pixels": "../batches/batch-000000.safetensors"}, "candidates.jsonl:3: pixels "),
    ({"prompt_index": "0"}, "candidates.jsonl:3: 'prompt_index' must be an integer, got '0'"),
])
def test_pairs_name_the_file_and_line_of_a_bad_candidate(scored, edit, message, capsys) -> None:
    _edit_line(scored, 3, **edit)
    before = _snapshot(scored)
    assert main(["--quiet", "pairs", str(scored)]) == 2
    assert message in _one_error(capsys)
    assert _snapshot(scored) == before and not (scored / "pairs.jsonl").exists()


def test_a_truncated_or_empty_candidates_file_is_one_line(scored, capsys) -> None:
    path = scored / "candidates.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # cut inside the last line, as a full disk or a kill would
    assert main(["--quiet", "pairs", str(scored)]) == 2
    assert f"{path}:40: invalid JSON (" in _one_error(capsys)
    path.write_text("")
    assert main(["--quiet", "score", str(scored), "--reward", "digits"]) == 2
    assert f"{path} is empty" in _one_error(capsys)


def test_pairs_refuse_a_nan_margin_and_a_folder_as_out(scored, capsys) -> None:
    before = _snapshot(scored)
    assert main(["--quiet", "pairs", str(scored), "--margin", "nan"]) == 2
    assert "--margin must be a finite number, got nan" in _one_error(capsys)
    assert main(["--quiet", "pairs", str(scored), "--out", str(scored / "media")]) == 2
    assert f"--out {scored / 'media'} is a folder: name the file to write" in _one_error(capsys)
    assert _snapshot(scored) == before


def test_media_outside_the_folder_is_read_when_the_user_names_the_root(scored, tmp_path, capsys) -> None:
    shutil.move(scored / "media" / "p00000-c000.png", tmp_path / "moved.png")
    _edit_line(scored, 1, path="../moved.png")
    assert main(["--quiet", "pairs", str(scored)]) == 2
    assert "path '../moved.png' is outside" in _one_error(capsys)
    assert main(["--quiet", "pairs", str(scored), "--media-root", str(tmp_path)]) == 0
    assert any(json.loads(line).get("rejected", "").endswith("moved.png") or
               json.loads(line).get("chosen", "").endswith("moved.png")
               for line in (scored / "pairs.jsonl").read_text().splitlines())


# ------------------------------------------------------------------ the online config, strictly typed
@pytest.mark.parametrize("field, value, message", [
    ("warm_start", "false", "online.yaml: warm_start must be true or false, got 'false'"),
    ("keep_pairs", 0, "online.yaml: keep_pairs must be true or false, got 0"),
    ("guidance_scale", "high", "online.yaml: guidance_scale must be a number, got 'high'"),
    ("guidance_scale", float("nan"), "online.yaml: guidance_scale must be a finite number, got nan"),
    ("steps", 2.5, "online.yaml: steps must be an integer, got 2.5"),
    ("reward", 3, "online.yaml: reward must be a string, got 3"),
    ("train_config", ["a"], "online.yaml: train_config must be a string or null, got ['a']"),
])
def test_online_config_types_are_strict(field, value, message, user, no_model, capsys, monkeypatch) -> None:
    monkeypatch.chdir(user)
    config = {"family": "toy", "pretrained": "models/toy", "prompts": "prompts.txt", "eval_prompts": "prompts.txt",
              "reward": "digits", "out": "online", field: value}
    (user / "online.yaml").write_text(yaml.safe_dump(config))
    before = _snapshot(user)
    assert main(["--quiet", "online", "online.yaml"]) == 2
    assert message in _one_error(capsys)
    assert _snapshot(user) == before
