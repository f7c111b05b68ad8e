"""`sdpo bench methods`, `sdpo bench speed` and `sdpo analyze weights` through the CLI, and the seed statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import TINY_DIGITS_FLAGS

from sdpo.cli import main
from sdpo.stats import paired_test, seed_interval, t_quantile, t_two_sided_p

pytestmark = pytest.mark.beside  # `make test` runs these in its second pytest process


# ------------------------------------------------------------------ statistics (closed forms)
@pytest.mark.parametrize("t", [0.0, 0.5, 1.0, 3.0, -7.5])
def test_the_t_test_p_value_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-10)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), abs=1e-10)


def test_t_quantiles_match_the_tables():
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, abs=1e-5)


def test_the_t_distribution_agrees_with_scipy():
    """sdpo.stats computes Student's t itself (see its docstring); scipy, installed with scikit-learn,
    is the reference it must agree with to within floating-point noise."""
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 30, 200):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-12)
        for t in (0.0, 0.3, 1.7, 4.2, -12.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9, abs=1e-15)


def test_seed_intervals_and_the_paired_test():
    interval = seed_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, sd sqrt(2.5)
    assert interval.mean == 3.0
    assert interval.half_width == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), abs=1e-6)
    test = paired_test([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])  # differences 1, 2, 3: t = 2 / (1 / sqrt 3), df 2
    t = 2 * math.sqrt(3)
    assert test.difference.mean == pytest.approx(2.0)
    assert test.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-10)
    assert math.isnan(paired_test([1.0], [0.0]).p_value)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1.0, 2.0], [1.0])


# ------------------------------------------------------------------ sdpo bench methods
@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "methods"
    argv = ["--quiet", "bench", "methods", "--quick", "--out", str(out), "--set", f"cache_root={root / 'models'}",
            "--toy", *TINY_DIGITS_FLAGS]
    assert main(argv) == 0
    return argv, out


def test_bench_methods_quick_writes_every_arm_condition_and_figure(quick_bench, capsys):
    _, out = quick_bench
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert set(results["summary"]) == {"on-policy", "off-policy-far"}
    arms = config["arms"]
    assert "diffusion-dpo@200" in arms and "dpo+sft@2000" in arms and "diffusion-sdpo@2000" in arms
    for condition, rows in results["summary"].items():
        assert set(arms) <= set(rows), condition
        dpo = rows["diffusion-dpo@2000"]
        for reward in ("digits", "digits@held_out"):
            gain = dpo[reward]["gain"]
            assert gain["n"] == 2 and gain["low"] <= gain["mean"] <= gain["high"]
        assert 0.0 <= rows["sdpo@2000"]["masked_share"]["mean"] <= 1.0
        assert rows["dpo-cm@200"]["digits"]["versus_diffusion_dpo"]["against"] == "diffusion-dpo@200"
        assert rows["dpo+sft@2000"]["digits"]["versus_diffusion_dpo"]["against"] == "diffusion-dpo@2000"
        # MaPO's own beta grid is compared position by position; KTO's is the DPO grid.
        assert rows["mapo@0.01"]["digits"]["versus_diffusion_dpo"]["against"] == "diffusion-dpo@200"
        assert rows["kto@2000"]["digits"]["versus_diffusion_dpo"]["against"] == "diffusion-dpo@2000"
    # The cells' evaluation samples are exported for outside scorers.
    assert (out / "cells" / "on-policy" / "seed-1" / "evaluation" / "eval_samples.safetensors").is_file()
    for name in ("table.md", "reward_vs_beta.png", "reward_over_steps.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| diffusion-sdpo@2000 |" in table and "**long training**" in table


def test_bench_methods_resumes_a_finished_sweep_and_refuses_other_settings(quick_bench, capsys):
    argv, out = quick_bench
    before = (out / "cells" / "on-policy" / "seed-0" / "cell.json").stat().st_mtime_ns
    wall = json.loads((out / "results.json").read_text())["wall_s"]
    assert main(argv) == 0  # every cell is on disk: only the report is rewritten
    assert (out / "cells" / "on-policy" / "seed-0" / "cell.json").stat().st_mtime_ns == before
    # the resumed report states the cells' own time, not the near-zero time of this run
    cells = [json.loads(p.read_text())["wall_s"] for p in (out / "cells").glob("*/seed-*/cell.json")]
    cells += [json.loads(p.read_text())["wall_s"] for p in (out / "long").glob("seed-*/long.json")]
    assert json.loads((out / "results.json").read_text())["wall_s"] == pytest.approx(sum(cells)) == pytest.approx(wall)
    assert sum(cells) > 1.0
    capsys.readouterr()
    assert main([*argv, "--seeds", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("sdpo: error:") and "other settings" in error and "seeds" in error
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--set", "betas=[200,2000]", "default_beta=500"], "default_beta 500 must be one of the betas"),
    (["--set", "variants=[sdpo:nonsense=1]"], "nonsense"),
    (["--set", "colour=blue"], "--set colour: not a bench setting"),
    (["--world", "image", "--set", "conditions=[sideways]"], "unknown condition 'sideways'"),
    (["--methods", "kto", "mapo"], "methods must include diffusion-dpo"),
    (["--methods", "diffusion-dpo", "mapo", "--set", "mapo_betas=[0.1]"], "one value per beta"),
])
def test_bench_methods_rejects_bad_settings_in_one_line(tmp_path, capsys, args, message):
    assert main(["bench", "methods", "--quick", "--out", str(tmp_path / "x"), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ sdpo bench online
def test_bench_online_quick_compares_offline_and_online_at_the_same_budget(tmp_path, capsys):
    out = tmp_path / "online"
    argv = ["--quiet", "bench", "online", "--quick", "--out", str(out), "--set", f"cache_root={tmp_path / 'models'}",
            "--set", "grpo={train_steps: 2, window_start: 1}", "--set", "grpo_learning_rate=0.01",
            "--toy", *TINY_DIGITS_FLAGS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| online:sdpo |" in printed and "| offline:diffusion-dpo |" in printed and "| online:grpo |" in printed
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"offline:diffusion-dpo", "offline:sdpo", "online:diffusion-dpo", "online:sdpo",
                            "online:grpo", "base"}
    row = summary["online:sdpo"]["digits"]
    assert row["gain"]["n"] == 2 and 0.0 <= row["win_rate"]["mean"] <= 1.0
    assert row["versus_baseline"]["difference"]["mean"] == pytest.approx(
        row["gain"]["mean"] - summary["offline:diffusion-dpo"]["digits"]["gain"]["mean"])
    assert (out / "online_vs_offline.png").stat().st_size > 0
    # The same budget: offline trains R x N steps in one run; online N a round, continuing the previous LoRA.
    seed = out / "seed-0"
    offline_steps = [json.loads(line)["step"] for line in (seed / "offline/runs/sdpo/metrics.jsonl").open()]
    assert offline_steps[-1] == 2 * 3
    online = seed / "online" / "sdpo"
    assert json.loads((online / "round-01/run/train_config.json").read_text())["init_lora"] == str(online / "round-00/run")
    def lines(path):
        return path.read_text().splitlines()

    assert len(lines(seed / "offline/pairs-00.jsonl")) * 2 == sum(
        len(lines(online / f"round-{r:02d}/pairs.jsonl")) for r in (0, 1))
    # round 0 of the online arm and group 0 of the offline data are the same base samples
    first = [json.loads(line)["scores"] for line in (seed / "offline/candidates-00/candidates.jsonl").open()]
    again = [json.loads(line)["scores"] for line in (online / "round-00/candidates/candidates.jsonl").open()]
    assert first == again
    for r in (0, 1):  # GRPO: the same scored candidates (reward calls) and optimizer steps per round as DPO
        grpo, dpo = seed / "online" / "grpo" / f"round-{r:02d}", online / f"round-{r:02d}"
        assert len(lines(grpo / "candidates/candidates.jsonl")) == len(lines(dpo / "candidates/candidates.jsonl"))
        assert [json.loads(row)["step"] for row in lines(grpo / "run/metrics.jsonl")][-1] == 3
        assert any((grpo / "candidates/trajectories").iterdir())
    assert json.loads((seed / "online/grpo/round-01/run/train_config.json").read_text())["learning_rate"] == 0.01
    assert (out / "reward_curves.png").stat().st_size > 0
    by_round = results["candidate_reward_by_round"]
    assert set(by_round) == {"offline", "online:diffusion-dpo", "online:sdpo", "online:grpo"}
    assert by_round["offline"][0]["mean"] == pytest.approx(by_round["online:sdpo"][0]["mean"])
    assert len(by_round["online:sdpo"]) == 2 and "Mean reward of the candidates" in printed
    # a rerun resumes: nothing is retrained, the table is the same
    stamp = (seed / "seed.json").stat().st_mtime_ns
    assert main(argv) == 0 and (seed / "seed.json").stat().st_mtime_ns == stamp
    assert main([*argv[:-len(TINY_DIGITS_FLAGS) - 1], "--toy", *TINY_DIGITS_FLAGS, "--rounds", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------ sdpo bench speed
def test_bench_speed_times_sft_and_every_method_and_writes_ratios(tmp_path, capsys):
    out = tmp_path / "speed"
    assert main(["--quiet", "bench", "speed", "--models", "sd-tiny", "--steps", "2", "--warmup", "1", "--batch-size", "1",
                 "--threads", "1", "--no-memory", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sd-tiny |" in printed
    results = json.loads((out / "speed.json").read_text())
    row = results["rows"][0]
    medians = row["median_s"]
    assert set(medians) == {"sft", "sft-pairs", "diffusion-dpo", "dpo-cm", "sdpo", "kto", "mapo"}
    assert all(v > 0 for v in medians.values())
    assert row["ratios"]["mapo/diffusion-dpo"] == pytest.approx(medians["mapo"] / medians["diffusion-dpo"])
    assert row["ratios"]["sdpo/diffusion-dpo"] == pytest.approx(medians["sdpo"] / medians["diffusion-dpo"])
    # A preference step runs twice the samples plus a reference pass: it cannot be cheaper than SFT,
    # even on the same 2B samples.
    assert row["ratios"]["diffusion-dpo/sft"] > row["ratios"]["diffusion-dpo/sft-pairs"] > 1.0
    assert set(row["meets_targets"]) == {"sdpo/diffusion-dpo", "diffusion-dpo/sft-pairs", "mapo/diffusion-dpo"}
    # One step's FLOPs per arm, counted as it runs: both members are twice the winners' work exactly
    # (every layer is per sample), and a preference step adds the reference's forward on top.
    flops = row["flops"]
    assert set(flops) == set(medians) and flops["sft-pairs"] == 2 * flops["sft"] > 0
    assert flops["diffusion-dpo"] > flops["sft-pairs"] and flops["sdpo"] == flops["diffusion-dpo"]
    for arm in medians:
        assert row["tflops"][arm] == pytest.approx(flops[arm] / medians[arm] / 1e12)
        assert row["mfu"][arm] is None  # a CPU has no peak in the table
    assert results["peak_tflops"] is None
    assert f"| sd-tiny | sdpo | {flops['sdpo'] / 1e9:.3f} | {row['tflops']['sdpo']:.4f} | - |" in printed


def test_throughput_is_flops_over_the_median_and_mfu_against_the_peak():
    from sdpo.bench.speed import throughput, throughput_table

    figures = throughput({"sft": 2_000_000_000_000, "sdpo": 6_000_000_000_000}, {"sft": 0.5, "sdpo": 1.0}, 8.0)
    assert figures == {"tflops": {"sft": 4.0, "sdpo": 6.0}, "mfu": {"sft": 0.5, "sdpo": 0.75}}
    table = throughput_table({"peak_tflops": 8.0, "rows": [
        {"model": "m", "flops": {"sft": 2_000_000_000_000, "sdpo": 6_000_000_000_000}, **figures}]})
    assert "| m | sft | 2000.000 | 4.0000 | 50.0% |" in table and "peak of 8 TFLOP/s" in table


def test_step_memory_is_measured_in_a_fresh_process(tmp_path):
    from sdpo.bench.speed import SpeedConfig, peak_in_fresh_process

    config = SpeedConfig(models=("sd-tiny",), batch_size=1, warmup=1, threads=1)
    assert peak_in_fresh_process("sd-tiny", "diffusion-dpo", config, tmp_path) > 0.0


# ------------------------------------------------------------------ sdpo analyze weights
def test_analyze_weights_profiles_a_cache_and_fresh_samples_before_and_after(world, tmp_path, capsys):
    from sdpo.analysis.weights import weight_profile
    from sdpo.data import CachedPairs, collate_pairs
    from sdpo.toy import ToySpec
    from sdpo.train.config import TrainConfig
    from sdpo.train.trainer import train

    base, cache = world
    run = tmp_path / "run"
    train(TrainConfig(family="toy", cache_dir=str(cache), output_dir=str(run), max_steps=3, learning_rate=1e-2,
                      method={"name": "diffusion-dpo", "beta": 500}, report_to="none"),
          spec=ToySpec.from_pretrained(base), dataset=CachedPairs(cache), progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 7\n")
    out = tmp_path / "weights"
    assert main(["--quiet", "analyze", "weights", "--family", "toy", "--pretrained", str(base), "--cache", str(cache),
                 "--prompts", str(prompts), "--lora", str(run), "--k", "10", "50", "--grid", "6", "--steps", "4",
                 "--guidance", "1.25", "--out", str(out)]) == 0
    assert "weights:" in capsys.readouterr().out
    profiles = json.loads((out / "results.json").read_text())["profiles"]
    assert len(profiles) == 2 * 2 * 3  # (base, tuned) x K in (10, 50) x (chosen, rejected, fresh)
    for profile in profiles.values():
        assert all(0.0 <= m <= 1.0 for m in profile["mean"]) and all(s >= 0.0 for s in profile["std"])
    # The command's cache profile is the library's weight_profile of the base model on those pairs.
    spec = ToySpec.from_pretrained(base)
    dataset = CachedPairs(cache)
    grid = torch.tensor(profiles["base, cache chosen, K=50"]["t"])
    direct = weight_profile(spec, spec.denoiser, collate_pairs([dataset[i] for i in range(len(dataset))]), grid, 50)
    assert profiles["base, cache chosen, K=50"]["mean"] == pytest.approx(direct.chosen.tolist(), abs=1e-5)
    assert profiles["base, cache rejected, K=50"]["mean"] == pytest.approx(direct.rejected.tolist(), abs=1e-5)
    assert profiles["tuned, cache chosen, K=50"]["mean"] != profiles["base, cache chosen, K=50"]["mean"]
    assert profiles["base, cache chosen, K=10"]["mean"] != profiles["base, cache chosen, K=50"]["mean"]
    assert "| t |" in (out / "table.md").read_text() and (out / "weight_profiles.png").stat().st_size > 0


def test_analyze_weights_needs_a_cache_or_prompts(world, tmp_path, capsys):
    base, _ = world
    assert main(["analyze", "weights", "--family", "toy", "--pretrained", str(base), "--out", str(tmp_path)]) == 2
    assert "needs a cache of pairs (--cache) or prompts" in capsys.readouterr().err


def test_the_readme_video_sweep_command_builds_the_config_it_describes():
    """The video-world results page's command, as typed: every flag and --set value parses into the sweep it
    claims (run at full size it takes minutes, so only the config is built here)."""
    import re
    import shlex
    from pathlib import Path

    from sdpo.bench.cli import bench_config
    from sdpo.bench.methods import BenchConfig
    from sdpo.cli import build_parser

    readme = (Path(__file__).parents[1] / "docs" / "results" / "video-world.md").read_text()
    typed = re.search(r"`(sdpo bench methods --world video.*?long_steps=0)`", readme, re.S).group(1)
    words = shlex.split(typed.replace("\n", " "))[1:]
    args = build_parser().parse_args(["--quiet", *words])
    config = bench_config(args, BenchConfig, ("world", "seeds", "steps", "out", "methods"), "bench")
    assert (config.world, config.seeds, config.long_steps) == ("video", 3, 0)
    assert config.conditions == ("on-policy", "off-policy-far") and config.betas == (2000,)
    assert [arm.label for arm in config.arms()] == ["diffusion-dpo@2000", "dpo-cm@2000", "sdpo@2000", "dpo+sft@2000"]
