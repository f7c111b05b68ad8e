"""The stages through the CLI as a user types them, on every family's tiny pipeline:
generate -> score -> pairs -> precompute -> train -> evaluate; plus multi-process and resumed generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sdpo.cli import main
from sdpo.models import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# family: (builder, size flags, reward options)
FAMILIES = {
    "sd": (tiny.build_tiny_sd, ["--height", "16", "--width", "16"], []),
    "sdxl": (tiny.build_tiny_sdxl, ["--height", "16", "--width", "16"], []),
    "cogvideox": (tiny.build_tiny_cogvideox, ["--height", "32", "--width", "32", "--frames", "9"],
                  ["--reward-option", "media=video"]),
    "wan": (tiny.build_tiny_wan, ["--height", "32", "--width", "32", "--frames", "5"],
            ["--reward-option", "media=video"]),
}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage-models")
    return {family: build(root / family) for family, (build, _, _) in FAMILIES.items()}


@pytest.fixture(scope="session")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\na blue dog on a hill\n")
    return path


def _generate_args(family: str, model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["--quiet", "generate", "--family", family, "--pretrained", str(model), "--prompts", str(prompts),
            "--per-prompt", "2", "--steps", "2", "--seed", "3", "--batch-size", "3", "--out", str(out),
            *FAMILIES[family][1], *extra]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_whole_loop_through_the_cli(family: str, models: dict[str, Path], prompts: Path, tmp_path: Path) -> None:
    model, (_, size, reward_options) = models[family], FAMILIES[family]
    gen = tmp_path / "gen"
    assert main(_generate_args(family, model, prompts, gen)) == 0
    records = [json.loads(line) for line in (gen / "candidates.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["candidate_index"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all((gen / r["path"]).is_file() and r["model"] == str(model) for r in records)
    assert len({r["seed"] for r in records}) == 4

    assert main(["--quiet", "score", str(gen), "--reward", "brightness", *reward_options]) == 0
    scored = [json.loads(line) for line in (gen / "candidates.jsonl").read_text().splitlines()]
    assert all(r["total"] == r["scores"]["brightness"] for r in scored)
    assert main(["--quiet", "pairs", str(gen), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    pair = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    assert pair["gap"] == pytest.approx(pair["chosen_score"] - pair["rejected_score"]) and pair["gap"] > 0

    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["--quiet", "precompute", "--family", family, "--pretrained", str(model), "--pairs",
                 str(tmp_path / "pairs.jsonl"), "--out", str(cache), *size]) == 0
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "family": family, "pretrained": str(model), "cache_dir": str(cache), "output_dir": str(run),
        "method": {"name": "sdpo", "beta": 100.0}, "lora_rank": 4, "max_steps": 2, "train_batch_size": 2,
        "learning_rate": 0.01, "log_every": 1, "report_to": "none"}))
    assert main(["--quiet", "train", str(config)]) == 0

    ev = tmp_path / "eval"
    assert main(["--quiet", "evaluate", "--family", family, "--pretrained", str(model), "--prompts", str(prompts),
                 "--steps", "2", "--run", f"tuned={run}", "--reward", "brightness", *reward_options,
                 *size, "--out", str(ev)]) == 0
    results = json.loads((ev / "results.json").read_text())
    assert results["models"] == ["base", "tuned"]
    assert set(results["versus_base"]["brightness"]["tuned"]) >= {"gain", "win_rate", "n"}
    assert "tuned vs base" in (ev / "report.md").read_text()

    from sdpo.stages.evaluate import load_eval_samples

    eval_prompts, noise, samples = load_eval_samples(ev)
    assert eval_prompts == ["a red cat", "a blue dog on a hill"] and noise.shape[0] == 2
    assert not torch.equal(samples["base"], samples["tuned"])  # the LoRA was applied


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_and_a_resumed_run_write_the_same_files(
    models: dict[str, Path], prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = tmp_path / "one"
    assert main(_generate_args("sd", models["sd"], prompts, one)) == 0

    # killed after its first batch, then run again: the same files, nothing written twice or half
    resumed = tmp_path / "resumed"
    monkeypatch.setenv("SDPO_GENERATE_FAIL_AFTER", "1")
    with pytest.raises(RuntimeError, match="test hook"):
        main(_generate_args("sd", models["sd"], prompts, resumed))
    assert not (resumed / "candidates.jsonl").exists()
    assert len(list((resumed / "batches").glob("batch-*"))) == 1
    monkeypatch.delenv("SDPO_GENERATE_FAIL_AFTER")
    assert main(_generate_args("sd", models["sd"], prompts, resumed)) == 0
    assert _files(resumed) == _files(one)

    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    code = ("import sys; from sdpo.cli import main; sys.exit(main(sys.argv[1:]))")
    script = tmp_path / "run_cli.py"
    script.write_text(code)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), *_generate_args("sd", models["sd"], prompts, two)],
                   check=True, env=env, capture_output=True, timeout=300)
    assert _files(two) == _files(one)


def test_score_refuses_a_reward_of_the_other_media_kind(models: dict[str, Path], prompts: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gen = tmp_path / "gen"
    assert main(_generate_args("sd", models["sd"], prompts, gen)) == 0
    assert main(["--quiet", "score", str(gen), "--reward", "brightness", "--reward-option", "media=video"]) == 2
    assert "scores videos, but" in capsys.readouterr().err
    assert main(["--quiet", "pairs", str(gen)]) == 2  # not scored yet: one line, exit 2


def test_killed_scoring_resumes_and_pairs_count_what_they_skip(models: dict[str, Path], prompts: Path,
                                                               tmp_path: Path) -> None:
    import shutil

    from sdpo.rewards.registry import as_reward
    from sdpo.stages.pairs import build_pairs
    from sdpo.stages.score import score

    gen = tmp_path / "gen"
    assert main(_generate_args("sd", models["sd"], prompts, gen)) == 0
    copy = tmp_path / "copy"
    shutil.copytree(gen, copy)
    mean = as_reward(lambda media, _: media.flatten(1).mean(1), name="mean", media="image")
    calls = []

    def dies_second_time(media: torch.Tensor, texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed in the middle of the second batch
        return mean.score(media, texts)

    with pytest.raises(KeyboardInterrupt):
        score(copy, [as_reward(dies_second_time, name="mean", media="image")], batch_size=2, progress=False)
    partly = [json.loads(line) for line in (copy / "candidates.jsonl").read_text().splitlines()]
    assert sum("mean" in r["scores"] for r in partly) == 2
    assert score(copy, [mean], batch_size=2, progress=False).scored == {"mean": 2}
    score(gen, [mean], batch_size=2, progress=False)
    assert (copy / "candidates.jsonl").read_bytes() == (gen / "candidates.jsonl").read_bytes()

    summary = build_pairs(gen, "margin", margin=0.0, out=tmp_path / "all.jsonl")
    assert summary.pairs == 2 and summary.prompts == 2  # 2 candidates per prompt: one pair each
    with pytest.raises(ValueError, match="no pairs"):
        build_pairs(gen, "best-worst", margin=10.0, out=tmp_path / "none.jsonl")
    assert not (tmp_path / "none.jsonl").exists()


def test_a_rerun_with_other_settings_is_refused(models: dict[str, Path], prompts: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    gen = tmp_path / "gen"
    assert main(_generate_args("sd", models["sd"], prompts, gen)) == 0
    assert main([*_generate_args("sd", models["sd"], prompts, gen), "--seed", "4"]) == 2
    assert "other settings (seed" in capsys.readouterr().err


def test_pairs_can_point_at_lossless_frame_folders(tmp_path: Path) -> None:
    from sdpo.stages.pairs import build_pairs
    from sdpo.stages.records import write_records

    records = [{"prompt": "a", "prompt_index": 0, "candidate_index": k, "path": f"media/p00000-c{k:03d}.mp4",
                "frames": f"media/p00000-c{k:03d}", "total": float(k)} for k in range(3)]
    write_records(tmp_path, records)
    build_pairs(tmp_path, frames=True, out=tmp_path / "frames.jsonl")
    pair = json.loads((tmp_path / "frames.jsonl").read_text())
    assert pair["chosen"].endswith("media/p00000-c002") and pair["rejected"].endswith("media/p00000-c000")
    build_pairs(tmp_path, out=tmp_path / "mp4.jsonl")
    assert json.loads((tmp_path / "mp4.jsonl").read_text())["chosen"].endswith("p00000-c002.mp4")
    write_records(tmp_path, [{**r, "frames": None} for r in records])
    with pytest.raises(ValueError, match="frame_folders=True"):
        build_pairs(tmp_path, frames=True, out=tmp_path / "none.jsonl")


@pytest.mark.parametrize("channels", [1, 3])
def test_frame_folders_hold_the_exact_8bit_frames(channels: int, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from sdpo.stages.generate import write_media

    clip = torch.linspace(-1, 1, 3 * channels * 4 * 6).reshape(3, channels, 4, 6)
    write_media(clip, tmp_path / "clip.mp4", tmp_path / "frames")
    frames = sorted((tmp_path / "frames").glob("*.png"))
    assert len(frames) == 3 and (tmp_path / "clip.mp4").stat().st_size > 0
    expected = ((clip + 1) * 127.5).round().to(torch.uint8)
    for frame, want in zip(frames, expected, strict=True):
        got = torch.from_numpy(np.array(Image.open(frame)))
        got = got.unsqueeze(0) if got.ndim == 2 else got.permute(2, 0, 1)
        assert torch.equal(got, want)
