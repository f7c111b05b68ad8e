"""benchmarks.gpu_step in --tiny mode on the CPU: every architecture builds, adapts and steps."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def gpu_step():
    # One thread: the tiny models are all per-op overhead, and a second thread only adds barrier waits.
    from benchmarks import gpu_step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield gpu_step
    finally:
        torch.set_num_threads(threads)


TINY_CPU = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--weight-repeats", "2"]


def test_tiny_run_covers_every_model(gpu_step, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = gpu_step.main([*TINY_CPU, "--json", str(out)])  # bf16 base, float32 LoRA, as on the GPU
    models = list(gpu_step.ARCHS)
    assert [row["model"] for row in rows] == [m for m in models for _ in ("diffusion-dpo", "sdpo")]
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0
        assert row["params"] > 0
        assert 0 < row["lora_params"] < row["params"]
        assert math.isfinite(row["loss"])
        assert row["weights_ms"] >= 0 and row["peak_gb"] is None  # no CUDA memory on the CPU
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows
    table = capsys.readouterr().out
    assert all(f"| {m} | sdpo |" in table for m in models)


def test_float32_without_checkpointing(gpu_step):
    rows = gpu_step.main([*TINY_CPU, "--models", "cogvideox-5b,wan2.1-1.3b", "--method", "dpo-cm",
                          "--dtype", "fp32", "--no-checkpointing"])
    assert [(row["model"], row["method"]) for row in rows] == [("cogvideox-5b", "dpo-cm"), ("wan2.1-1.3b", "dpo-cm")]
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["loss"]) and row["median_s"] > 0
        assert 0 < row["lora_params"] < row["params"]


def test_full_size_configs_match_published_sizes(gpu_step):
    rows = gpu_step.count_only(list(gpu_step.ARCHS.values()), tiny=False, rank=64, with_lora=False)
    billions = {row["model"]: row["params"] / 1e9 for row in rows}
    published = {"sd15": 0.86, "sdxl": 2.57, "cogvideox-2b": 1.69, "cogvideox-5b": 5.57, "wan2.1-1.3b": 1.42}
    for model, size in published.items():
        assert billions[model] == pytest.approx(size, rel=0.02), model


def test_bad_arguments_are_rejected(gpu_step):
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--models", "sd3"])
    with pytest.raises(SystemExit):
        gpu_step.parse_args(["--method", "ppo"])


def test_out_of_memory_is_reported_not_raised(gpu_step, monkeypatch):
    real = gpu_step.bench_model

    def bench_model(arch, args, methods):
        if arch.name == "sdxl":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(arch, args, methods)

    monkeypatch.setattr(gpu_step, "bench_model", bench_model)
    rows = gpu_step.main([*TINY_CPU, "--models", "sdxl,wan2.1-1.3b", "--method", "sdpo"])
    assert [(row["model"], row["status"]) for row in rows] == [("sdxl", "OOM"), ("wan2.1-1.3b", "ok")]
    assert "| sdxl | sdpo | OOM |" in gpu_step.markdown_table(rows)


def test_head_to_head_ranks_real_digits_above_noise(tmp_path):
    from safetensors.torch import save_file

    from benchmarks import head_to_head as module
    from sdpo.toy.digits.data import load_split, prompts_for

    images, labels = load_split("held_out")
    images, labels = images[:40], labels[:40]
    prompts = prompts_for(labels)
    folders = []
    for seed in range(2):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        save_file({"real": images.contiguous(), "noise_model": noise, "noise": noise.clone()},
                  str(folder / "eval_samples.safetensors"), metadata={"prompts": json.dumps(prompts)})
        folders.append(folder)
    table = module.head_to_head(folders)
    assert "2 run(s), 80 paired samples" in table
    row = next(line for line in table.splitlines() if line.startswith("| noise_model vs real"))
    assert float(row.split("|")[2].split()[0]) < 0.1  # noise loses to real digits on the reward


def test_counted_step_names_the_attention_kernel_and_compiled_blocks_still_step(gpu_step):
    """The counted eager step, then regional compilation (the eager backend: dynamo's tracing without
    inductor's code generation, seconds on a CPU); without checkpointing the count is the model FLOPs."""
    rows = gpu_step.main([*TINY_CPU, "--models", "wan2.1-1.3b", "--method", "diffusion-dpo", "--no-checkpointing",
                          "--compile", "--compile-backend", "eager"])
    row = rows[0]
    assert row["status"] == "ok" and row["compiled"] and row["attention"] == ["flash (CPU)"]
    assert row["counted_tflop"] == row["model_tflop"] > 0
    assert row["tflops"] == pytest.approx(row["counted_tflop"] / row["median_s"]) and row["mfu"] is None


def test_gpu_session_script_parses_and_keeps_to_its_budget(tmp_path):
    """bash -n, then a run whose budget leaves no part its minimum: every part is skipped, in seconds.
    (DRY_RUN=1 runs every part's Python on tiny models on a CPU: about a minute, by hand.)"""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "DRY_RUN": "1", "BUDGET": "0", "PYTHON": sys.executable,
           "PARTS": "steps nockpt compile generate"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=False,
                          cwd=script.parents[1], timeout=60)
    summary = (tmp_path / "summary.md").read_text()
    assert done.returncode == 0, done.stderr
    assert all(f"{part}: skipped" in summary for part in ("steps", "nockpt", "compile", "generate")), summary
