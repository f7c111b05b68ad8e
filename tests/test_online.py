"""`sdpo online CONFIG` on the embedded image world at tiny size: rounds, layout, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from tiny_models import TINY_IMAGE

import sdpo.stages.online as online
from sdpo.cli import main
from sdpo.data import CachedPairs
from sdpo.toy.pretraining import pretrain_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")



def _config(tmp: Path, base: str, out: Path) -> Path:
    (tmp / "prompts.txt").write_text("a handwritten digit 3\na handwritten digit 7\n")
    (tmp / "eval.txt").write_text("a handwritten digit 1\n")
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": base, "prompts": str(tmp / "prompts.txt"), "eval_prompts": str(tmp / "eval.txt"),
        "reward": "digits", "out": str(out), "rounds": 2, "per_prompt": 2, "steps": 2, "num_inference_steps": 2,
        "eval_per_prompt": 2, "train": {"train_batch_size": 2, "lora_rank": 2, "learning_rate": 1e-3,
                                        "report_to": "none"}}))
    return path


def _lora(run: Path) -> dict:
    return load_file(str(next(run.glob("*.safetensors"))))


def test_online_rounds_run_and_resume_after_a_kill(tmp_path: Path, monkeypatch) -> None:
    base = str(pretrain_base(TINY_IMAGE, cache_root=tmp_path / "cache", progress=False))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["--quiet", "online", str(_config(tmp_path, base, straight))]) == 0
    for r in (0, 1):
        folder = straight / f"round-{r:02d}"
        assert (folder / "pairs.jsonl").is_file() and (folder / "evaluation" / "results.json").is_file()
    records = [json.loads(line) for line in (straight / "round-01" / "candidates" / "candidates.jsonl").open()]
    assert len(records) == 4 and {c["lora"] for c in records} == {str(straight / "round-00" / "run")}
    # keep_pairs (the default): round 1 trains on its own 2 pairs and round 0's 2
    assert [len(CachedPairs(straight / f"round-{r:02d}" / "cache")) for r in (0, 1)] == [2, 4]
    # warm_start (the default): round 1's adapter starts from round 0's
    starts = [json.loads((straight / f"round-{r:02d}" / "run" / "train_config.json").read_text())["init_lora"]
              for r in (0, 1)]
    assert starts == [None, str(straight / "round-00" / "run")]

    real = online.evaluate_round
    calls = []

    def die_in_round_1(config, folder, *args):
        calls.append(folder.name)
        if folder.name == "round-01":
            raise KeyboardInterrupt("killed after round 1's training")
        real(config, folder, *args)

    monkeypatch.setattr(online, "evaluate_round", die_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        online.run_online(online.OnlineConfig.from_file(_config(tmp_path, base, killed)))
    assert not (killed / "round-01" / "evaluation").exists()
    monkeypatch.setattr(online, "evaluate_round", real)
    assert main(["--quiet", "online", str(_config(tmp_path, base, killed))]) == 0
    for name in ("round-00/run", "round-01/run"):
        a, b = _lora(straight / name), _lora(killed / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (killed / "round-01" / "evaluation" / "results.json").is_file()


def test_online_config_errors_are_one_line(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, "unused", tmp_path / "x")
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "reference": "previous"}))
    assert main(["--quiet", "online", str(path)]) == 2
    path.write_text(yaml.safe_dump({**data, "bogus": 1}))
    assert main(["--quiet", "online", str(path)]) == 2
    assert "bogus" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**data, "train": {**data["train"], "lora_rank": 0}}))
    assert main(["--quiet", "online", str(path)]) == 2
    assert "warm_start needs LoRA training" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**data, "train": {**data["train"], "method": {"name": "kto"}}}))
    assert main(["--quiet", "online", str(path)]) == 2
    assert "trains on labelled samples, and online rounds build pairs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any stage ran


def test_the_readme_online_config_resolves_to_its_training_run(tmp_path: Path, monkeypatch) -> None:
    """The online guide's online.yaml (docs/guides/online.md), as a user copies it: it parses, and its train_config + train overrides
    give the TrainConfig each round trains with."""
    readme = (Path(__file__).parents[1] / "docs" / "guides" / "online.md").read_text()
    block = readme.split("# online.yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sd15-lora.yaml").write_text(
        (Path(__file__).parents[1] / "configs" / "sd15-lora.yaml").read_text())
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "heldout.txt").write_text("a dog\n")
    (tmp_path / "online.yaml").write_text(block.split("\n", 1)[1])
    monkeypatch.chdir(tmp_path)
    config = online.OnlineConfig.from_file("online.yaml")
    assert (config.family, config.reward, config.rounds, config.steps) == ("sd", "pickscore", 3, 500)
    train_config = online._train_config(config, tmp_path / "cache", tmp_path / "run")
    assert train_config.method.name == "sdpo" and train_config.learning_rate == 1e-5
    assert train_config.max_steps == 500 and train_config.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
