"""Each folder knows what it is, and settings decide reuse: the mistaken second commands of issue 19,
typed as a user types them, with the exit status, the message and every file's hash before and after."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from sdpo.cli import main
from sdpo.folders import MARKER, folder_kind


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path: equal dicts mean nothing was lost or changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdpo: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]


def _generate_args(base: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["--quiet", "generate", "--family", "toy", "--pretrained", str(base), "--prompts", str(prompts),
            "--per-prompt", "2", "--steps", "2", "--seed", "3", "--out", str(out), *extra]


def _train_config(made: dict[str, Path], out: Path, **extra) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(made["base"]), "cache_dir": str(made["cache"]), "output_dir": str(out),
        "method": {"name": "sdpo", "beta": 500.0}, "lora_rank": 4, "learning_rate": 0.01, "max_steps": 2,
        "train_batch_size": 4, "report_to": "none", **extra}))
    return path


@pytest.fixture(scope="module")
def made(world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A scored generate folder with its pairs and a trained run (checkpoints at steps 1 and 2), made once;
    each test copies what it changes."""
    base, cache = world
    root = tmp_path_factory.mktemp("folders")
    prompts = root / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 7\n")
    gen = root / "gen"
    assert main(_generate_args(base, prompts, gen)) == 0
    assert main(["--quiet", "score", str(gen), "--reward", "digits"]) == 0
    assert main(["--quiet", "pairs", str(gen)]) == 0
    made = {"base": base, "cache": cache, "prompts": prompts, "gen": gen, "run": root / "run"}
    assert main(["--quiet", "train", str(_train_config(made, made["run"], checkpoint_every=1))]) == 0
    return made


def _copy(made: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(made[name], tmp_path / name))


def test_folders_are_recognised_by_their_marker_or_their_files(made, tmp_path):
    gen = _copy(made, "gen", tmp_path)
    assert json.loads((gen / MARKER).read_text())["kind"] == "generate"
    assert json.loads((gen / MARKER).read_text())["settings"]["seed"] == 3
    (gen / MARKER).unlink()  # a folder from before markers
    assert folder_kind(gen) == "generate"
    assert (folder_kind(made["cache"]), folder_kind(made["run"]), folder_kind(tmp_path / "none")) == (
        "cache", "run", None)


@pytest.mark.parametrize("victim", ["gen", "run"])
def test_precompute_overwrite_never_deletes_a_generate_folder_or_a_run(made, tmp_path, capsys, victim):
    folder = _copy(made, victim, tmp_path)
    if victim == "gen":
        (folder / MARKER).unlink()  # recognised by its own files too
    before = _hashes(folder)
    assert main(["--quiet", "precompute", "--family", "toy", "--pretrained", str(made["base"]), "--pairs",
                 str(made["gen"] / "pairs.jsonl"), "--out", str(folder), "--overwrite"]) == 2
    error = _error(capsys)
    kind = {"gen": "a generate folder", "run": "a run folder"}[victim]
    assert f"holds {kind}" in error and "replaces only a cache folder, so nothing was deleted" in error
    assert _hashes(folder) == before


def test_train_overwrite_refuses_a_folder_that_is_not_a_run(made, tmp_path, capsys):
    gen = _copy(made, "gen", tmp_path)
    before = _hashes(gen)
    assert main(["--quiet", "train", str(_train_config(made, gen)), "--overwrite"]) == 2
    assert "holds a generate folder" in _error(capsys)
    after = _hashes(gen)
    assert {name: after[name] for name in before} == before  # every file as it was
    assert not any(name.startswith(("checkpoint-", "metrics", "pytorch_lora")) for name in after)


@pytest.mark.parametrize("owned", ["candidates.jsonl", "generate.json"])
def test_pairs_never_write_over_a_file_another_stage_owns(made, tmp_path, capsys, owned):
    gen = _copy(made, "gen", tmp_path)
    before = _hashes(gen)
    assert main(["--quiet", "pairs", str(gen), "--out", str(gen / owned)]) == 2
    assert f"{gen / owned} belongs to the generate folder" in _error(capsys)
    assert _hashes(gen) == before


def test_a_generate_rerun_with_other_settings_is_refused_before_the_model_loads(made, tmp_path, capsys):
    gen = _copy(made, "gen", tmp_path)
    before = _hashes(gen)
    missing = tmp_path / "no-model"  # refused on the settings: the model is never looked for
    assert main(_generate_args(missing, made["prompts"], gen, "--seed", "4")) == 2
    assert "other settings (seed: was 3, now 4)" in _error(capsys)
    longer = tmp_path / "longer.txt"
    longer.write_text(made["prompts"].read_text() + "a handwritten digit 1\n")
    assert main(_generate_args(missing, longer, gen)) == 2
    assert "other settings (prompts: was 2 entries, now 3 entries)" in _error(capsys)
    assert main(_generate_args(missing, made["prompts"], gen, "--steps", "3")) == 2
    assert "(sampler.num_inference_steps: was 2, now 3)" in _error(capsys)
    assert main(_generate_args(made["base"], made["prompts"], made["cache"])) == 2
    error = _error(capsys)
    assert "holds a cache folder (manifest.json, shard-00000.safetensors)" in error and "not a generate" in error
    assert _hashes(gen) == before
    assert main(_generate_args(made["base"], made["prompts"], gen)) == 0  # the same job: continues (done)
    assert _hashes(gen) == before  # the scored candidates are kept


def test_a_failed_first_generate_never_blocks_the_corrected_command(made, tmp_path, monkeypatch):
    from sdpo.toy.spec import ToySpec

    def fails(*args, **kwargs):
        raise RuntimeError("sampling failed")

    gen = tmp_path / "gen"
    with monkeypatch.context() as patch:
        patch.setattr(ToySpec, "sample", fails)
        with pytest.raises(RuntimeError, match="sampling failed"):
            main(_generate_args(made["base"], made["prompts"], gen))
    assert not (gen / "generate.json").exists() and not (gen / MARKER).exists()
    assert main(_generate_args(made["base"], made["prompts"], gen, "--seed", "5")) == 0  # other settings: fine
    assert json.loads((gen / "generate.json").read_text())["seed"] == 5


def test_a_changed_reward_option_is_refused_or_rescored(made, tmp_path, capsys):
    gen = _copy(made, "gen", tmp_path)
    before, old = _hashes(gen), _records(gen)
    change = ["--reward-option", "digits.style_weight=0"]
    assert main(["--quiet", "score", str(gen), "--reward", "digits", *change]) == 2
    error = _error(capsys)
    assert "scored by 'digits' with other options (digits.style_weight: was (not set), now 0)" in error
    assert "--rescore" in error and _hashes(gen) == before
    assert main(["--quiet", "score", str(gen), "--reward", "digits", *change, "--rescore"]) == 0
    assert "digits (4 new)" in capsys.readouterr().out
    new = _records(gen)
    assert [r["scores"]["digits"] for r in new] != [r["scores"]["digits"] for r in old]
    assert all(r["total"] == r["scores"]["digits"] for r in new)
    assert json.loads((gen / MARKER).read_text())["scored_with"] == {"digits": {"style_weight": 0}}
    assert main(["--quiet", "score", str(gen), "--reward", "digits", *change]) == 0  # the same options: kept
    assert "digits (0 new)" in capsys.readouterr().out


def _evaluate_args(made: dict[str, Path], out: Path, *runs: str, extra: tuple[str, ...] = ()) -> list[str]:
    flags = [item for run in runs for item in ("--run", run)]
    return ["--quiet", "evaluate", "--family", "toy", "--pretrained", str(made["base"]), "--prompts",
            str(made["prompts"]), "--steps", "2", "--reward", "digits", *flags, "--out", str(out), *extra]


def test_evaluate_refuses_duplicate_runs_and_replaces_another_evaluation_only_whole(made, tmp_path, capsys):
    other = _copy(made, "run", tmp_path)
    assert main(_evaluate_args({**made, "base": tmp_path / "no-model"}, tmp_path / "eval", f"a={made['run']}",
                               f"a={other}")) == 2
    assert "two --run are named 'a'" in _error(capsys) and not (tmp_path / "eval").exists()

    ev = tmp_path / "eval"
    assert main(_evaluate_args(made, ev, f"a={made['run']}")) == 0
    before = _hashes(ev)
    assert main(_evaluate_args(made, ev, f"b={made['run']}")) == 2
    assert f"other settings (runs.a: was \"{made['run']}\", now (not set))" in _error(capsys)
    assert _hashes(ev) == before
    assert main(_evaluate_args(made, ev, f"b={made['run']}", extra=("--overwrite",))) == 0
    assert (ev / "grid-b.png").is_file() and not (ev / "grid-a.png").exists()  # no old grid beside new results
    assert json.loads((ev / "results.json").read_text())["models"] == ["base", "b"]

    gen = _copy(made, "gen", tmp_path)
    before = _hashes(gen)
    assert main(_evaluate_args(made, gen, f"a={made['run']}", extra=("--overwrite",))) == 2
    assert "holds a generate folder" in _error(capsys) and _hashes(gen) == before


def test_export_refuses_to_write_an_older_checkpoint_over_the_final_weights(made, tmp_path, capsys):
    run = _copy(made, "run", tmp_path)
    (run / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2, "form')  # torn
    before = _hashes(run)
    assert main(["--quiet", "export", str(run)]) == 2
    error = _error(capsys)
    assert "checkpoint-2 has a torn trainer_state.json" in error and "older checkpoint-1" in error
    assert "--allow-older" in error and _hashes(run) == before
    assert main(["--quiet", "export", str(run), "--allow-older"]) == 0
    assert _hashes(run)["pytorch_lora_weights.safetensors"] != before["pytorch_lora_weights.safetensors"]


def test_demo_out_replaces_only_an_earlier_demo(made, tmp_path, capsys):
    gen = _copy(made, "gen", tmp_path)
    before = _hashes(gen)
    assert main(["--quiet", "demo", "--out", str(gen), "--steps", "1"]) == 2
    assert "holds a generate folder" in _error(capsys) and _hashes(gen) == before


def _online_config(made: dict[str, Path], out: Path, reward: str) -> Path:
    path = out.parent / f"online-{reward}.yaml"
    path.write_text(yaml.safe_dump({
        "family": "toy", "pretrained": str(made["base"]), "prompts": str(made["prompts"]),
        "eval_prompts": str(made["prompts"]), "reward": reward, "out": str(out), "rounds": 1, "per_prompt": 2,
        "steps": 1, "num_inference_steps": 2, "evaluate_rounds": False,
        "train": {"train_batch_size": 2, "lora_rank": 2, "learning_rate": 1e-3, "report_to": "none"}}))
    return path


def test_online_in_a_finished_folder_with_another_reward_is_refused_or_restarted(made, tmp_path, capsys):
    out = tmp_path / "online"
    assert main(["--quiet", "online", str(_online_config(made, out, "digits"))]) == 0
    before = _hashes(out)
    other = _online_config(made, out, "brightness")
    assert main(["--quiet", "online", str(other)]) == 2
    error = _error(capsys)
    assert 'other settings (reward: was "digits", now "brightness")' in error and "--restart" in error
    assert _hashes(out) == before
    assert main(["--quiet", "online", str(other), "--restart"]) == 0
    after = _hashes(out)
    media = [name for name in before if name.startswith("round-00/candidates/media/")]
    assert media and all(after[name] == before[name] for name in media)  # the generation is kept
    records = _records(out / "round-00" / "candidates")
    assert all(r["total"] == r["scores"]["brightness"] for r in records)
    totals = {r["total"] for r in records}
    pairs = [json.loads(line) for line in (out / "round-00" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all({p["chosen_score"], p["rejected_score"]} <= totals for p in pairs)
