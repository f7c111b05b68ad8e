"""The embedded worlds through the same stage commands a real model uses, as a user types them:
generate -> score (the world's registered reward) -> pairs -> precompute -> train -> evaluate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_models import TINY_IMAGE, tiny_video

from sdpo.cli import main
from sdpo.toy.pretraining import pretrain_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# world: (family, base-model config, reward, prompts)
WORLDS = {
    "digits": ("toy", TINY_IMAGE, "digits", ["a handwritten digit 3", "a handwritten digit 7"]),
    "moving-cogvideox": ("toy-video", tiny_video("cogvideox"), "moving-digits",
                         ["a handwritten digit 3 moving right", "a handwritten digit 7 moving up"]),
    "moving-wan": ("toy-video", tiny_video("wan"), "moving-digits",
                   ["a handwritten digit 1 moving left", "a handwritten digit 8 moving down"]),
}


def _sdpo(*args: str) -> None:
    assert main(["--quiet", *args]) == 0, args


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_the_whole_loop_runs_on_an_embedded_world(world: str, tmp_path: Path) -> None:
    family, config, reward, prompt_list = WORLDS[world]
    base = str(pretrain_base(config, cache_root=tmp_path / "cache", progress=False))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(prompt_list) + "\n")
    gen, pairs, cache, run, report = (tmp_path / name for name in ("gen", "pairs.jsonl", "latents", "run", "eval"))

    _sdpo("generate", "--family", family, "--pretrained", base, "--prompts", str(prompts), "--per-prompt", "2",
          "--steps", "2", "--out", str(gen))
    _sdpo("score", str(gen), "--reward", reward)
    candidates = [json.loads(line) for line in (gen / "candidates.jsonl").read_text().splitlines()]
    assert len(candidates) == 4 and all(reward in c["scores"] for c in candidates)
    assert {c["prompt"] for c in candidates} == set(prompt_list)

    _sdpo("pairs", str(gen), "--out", str(pairs))
    made = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(made) == 2 and all(p["chosen_score"] > p["rejected_score"] for p in made)

    _sdpo("precompute", "--family", family, "--pretrained", base, "--pairs", str(pairs), "--out", str(cache))
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump({
        "family": family, "pretrained": base, "cache_dir": str(cache), "output_dir": str(run), "max_steps": 2,
        "train_batch_size": 2, "lora_rank": 2, "learning_rate": "1e-3", "report_to": "none",
    }))
    _sdpo("train", str(config_file))
    _sdpo("evaluate", "--family", family, "--pretrained", base, "--prompts", str(prompts), "--run", f"tuned={run}",
          "--reward", reward, "--steps", "2", "--out", str(report))

    # the same reward twice would overwrite its own results: refused in one line before sampling
    assert main(["--quiet", "evaluate", "--family", family, "--pretrained", base, "--prompts", str(prompts),
                 "--run", f"tuned={run}", "--reward", reward, "--reward", reward, "--steps", "2",
                 "--out", str(tmp_path / "twice")]) == 2
    assert not (tmp_path / "twice" / "results.json").exists()

    results = json.loads((report / "results.json").read_text())
    assert "tuned" in json.dumps(results) and (report / "report.md").read_text().count("tuned") >= 1
    with safe_open(str(report / "eval_samples.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        base_samples = handle.get_tensor("base")
    assert {"base", "tuned", "noise"} <= keys
    assert base_samples.shape[0] == len(prompt_list)
    assert base_samples.min() >= -1.0 and base_samples.max() <= 1.0


def test_reward_options_are_checked_and_can_be_scoped_to_one_reward(tmp_path: Path, capsys) -> None:
    assert main(["--quiet", "score", str(tmp_path), "--reward", "digits", "--reward-option", "bogus=1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "reward 'digits' has no option bogus" in error and "style_weight" in error

    assert main(["--quiet", "score", str(tmp_path), "--reward", "digits", "--reward-option", "brightness.media=video"]) == 2
    assert "names reward 'brightness', which is not among --reward digits" in capsys.readouterr().err

    # A scoped option reaches its reward only: the brightness reward would refuse a digits option.
    args = ["--quiet", "score", str(tmp_path), "--reward", "digits", "--reward", "brightness",
            "--reward-option", "digits.style_weight=0.5", "--reward-option", "brightness.media=image"]
    assert main(args) == 2  # the folder holds no candidates: the rewards themselves were built
    error = capsys.readouterr().err
    assert "has no option" not in error and "sdpo generate --out" in error


def test_score_totals_are_raw_weighted_sums_or_per_prompt_zscores(tmp_path: Path) -> None:
    family, config, _, prompt_list = WORLDS["digits"]
    base = str(pretrain_base(config, cache_root=tmp_path / "cache", progress=False))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(prompt_list) + "\n")
    gen = tmp_path / "gen"
    _sdpo("generate", "--family", family, "--pretrained", base, "--prompts", str(prompts), "--per-prompt", "3",
          "--steps", "2", "--out", str(gen))

    def records() -> list[dict]:
        return [json.loads(line) for line in (gen / "candidates.jsonl").read_text().splitlines()]

    _sdpo("score", str(gen), "--reward", "digits", "--reward", "brightness", "--weight", "2", "--weight", "0.5")
    for record in records():
        expected = 2 * record["scores"]["digits"] + 0.5 * record["scores"]["brightness"]
        assert record["total"] == pytest.approx(expected, rel=1e-12)

    _sdpo("score", str(gen), "--reward", "digits", "--reward", "brightness", "--weight", "2", "--weight", "0.5",
          "--normalize", "zscore")
    rows = records()
    for index in range(len(prompt_list)):
        group = [r for r in rows if r["prompt_index"] == index]
        expected = torch.zeros(len(group), dtype=torch.float64)
        for name, weight in (("digits", 2.0), ("brightness", 0.5)):
            values = torch.tensor([r["scores"][name] for r in group], dtype=torch.float64)
            expected += weight * (values - values.mean()) / values.std(unbiased=False)
        totals = torch.tensor([r["total"] for r in group], dtype=torch.float64)
        torch.testing.assert_close(totals, expected, rtol=1e-5, atol=1e-5)
        assert abs(totals.sum().item()) < 1e-4  # z-scores centre each prompt's candidates


def test_video_candidates_without_mp4s_keep_frame_folders_that_score_and_pair(tmp_path: Path, capsys) -> None:
    family, config, reward, prompt_list = WORLDS["moving-wan"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(prompt_list) + "\n")
    gen = tmp_path / "gen"
    # refused before any model loads (the base does not even exist yet)
    assert main(["--quiet", "generate", "--family", family, "--pretrained", str(tmp_path / "none"), "--prompts",
                 str(prompts), "--out", str(gen), "--no-mp4"]) == 2
    assert "--no-mp4 needs --frame-folders" in capsys.readouterr().err and not gen.exists()

    base = str(pretrain_base(config, cache_root=tmp_path / "cache", progress=False))
    _sdpo("generate", "--family", family, "--pretrained", base, "--prompts", str(prompts), "--per-prompt", "2",
          "--steps", "2", "--out", str(gen), "--frame-folders", "--no-mp4")
    assert not list(gen.rglob("*.mp4"))
    candidates = [json.loads(line) for line in (gen / "candidates.jsonl").read_text().splitlines()]
    assert all(c["path"] == c["frames"] and (gen / c["frames"]).is_dir() for c in candidates)
    _sdpo("score", str(gen), "--reward", reward)
    _sdpo("pairs", str(gen), "--out", str(tmp_path / "pairs.jsonl"))
    made = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(made) == 2 and all((tmp_path / p["chosen"]).is_dir() for p in made)  # the lossless frames
    # the same folder with MP4s is another setting: refused, nothing rewritten
    assert main(["--quiet", "generate", "--family", family, "--pretrained", base, "--prompts", str(prompts),
                 "--per-prompt", "2", "--steps", "2", "--out", str(gen), "--frame-folders"]) == 2
    assert "mp4" in capsys.readouterr().err
