"""Every exported model folder carries a Hub model card (README.md) written through huggingface_hub,
and `sdpo evaluate` adds its figures to the cards sdpo wrote (never to a folder from elsewhere)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from sdpo.cli import main
from sdpo.train.model_card import command_line, record_evaluation


def _train(world, tmp_path: Path, monkeypatch, **overrides) -> Path:
    base, cache = world
    run = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(base), "cache_dir": str(cache), "output_dir": str(run), "max_steps": 2,
        "train_batch_size": 2, "lora_rank": 2, "learning_rate": "1e-3", "report_to": "none",
        "method": {"name": "sdpo"}, **overrides}))
    argv = ["sdpo", "--quiet", "train", str(config)]
    monkeypatch.setattr(sys, "argv", argv)  # what the console script sees when a user types it
    assert main(argv[1:]) == 0
    return run


def test_a_trained_lora_carries_a_hub_card_with_the_method_data_and_command(world, tmp_path, monkeypatch):
    run = _train(world, tmp_path, monkeypatch)
    card = ModelCard.load(run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "text-to-image"
    assert {"diffusers", "sdpo", "lora", "text-to-image"} <= set(data["tags"])
    assert "base_model" not in data  # a local folder is no hub id: named in the text instead
    facts = data["sdpo"]
    assert facts["weights"] == "LoRA (rank 2)" and facts["method"]["name"] == "sdpo"
    assert facts["pairs"] == json.loads((Path(world[1]) / "manifest.json").read_text())["num_pairs"]
    assert facts["training"]["max_steps"] == 2 and facts["training"]["learning_rate"] == 1e-3
    assert facts["command"] == f"sdpo --quiet train {tmp_path / 'train.yaml'}"
    assert f"sdpo --quiet train {tmp_path / 'train.yaml'}" in card.text
    assert f"{facts['pairs']} preference pairs" in card.text and "`sdpo`:" in card.text


def test_evaluate_adds_its_figures_to_the_card_and_export_keeps_the_command(world, tmp_path, monkeypatch):
    run = _train(world, tmp_path, monkeypatch, checkpoint_every=2)  # kept: `sdpo export` reads it
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 7\n")
    out = tmp_path / "eval"
    assert main(["--quiet", "evaluate", "--family", "toy", "--pretrained", str(world[0]), "--prompts", str(prompts),
                 "--run", f"tuned={run}", "--reward", "digits", "--steps", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    figures = results["versus_base"]["digits"]["tuned"]
    card = ModelCard.load(run / "README.md")
    assert card.data.to_dict()["sdpo"]["evaluations"][str(out)]["digits"]["win_rate"] == figures["win_rate"]
    assert "## Evaluation" in card.text and f"{figures['win_rate']['value']:.3f}" in card.text

    # `sdpo export` writes the same weights again: the card keeps the training command, and drops the
    # evaluation (it was of the weights being replaced)
    trained_by = card.data.to_dict()["sdpo"]["command"]
    monkeypatch.setattr(sys, "argv", ["sdpo", "export", str(run), "--allow-older"])
    assert main(["--quiet", "export", str(run), "--allow-older"]) == 0
    again = ModelCard.load(run / "README.md").data.to_dict()["sdpo"]
    assert again["command"] == trained_by and again["evaluations"] == {}


def test_a_folder_without_an_sdpo_card_is_left_alone(tmp_path):
    (tmp_path / "README.md").write_text("# somebody's LoRA\n")
    assert record_evaluation(tmp_path, "eval", {"digits": {}}) is False
    assert (tmp_path / "README.md").read_text() == "# somebody's LoRA\n"
    assert record_evaluation(tmp_path / "empty", "eval", {}) is False and not (tmp_path / "empty").exists()


def test_command_line_is_what_the_user_typed_or_none():
    assert command_line(["/usr/bin/sdpo", "train", "a b.yaml"]) == "sdpo train 'a b.yaml'"
    assert command_line(["/x/site-packages/sdpo/cli.py", "train", "c.yaml"]) == "python -m sdpo.cli train c.yaml"
    assert command_line(["my_script.py", "--lr", "1"]) is None
