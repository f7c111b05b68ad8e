"""DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 with two CPU processes over gloo, against two-process DDP.

Each engine runs under exactly the environment that ``accelerate launch --config_file
configs/accelerate/<engine>-cpu.yaml --num_processes 2`` gives its processes (computed here by
accelerate's own launcher code; on one machine that launcher is torchrun plus that environment). One
torchrun launch of two processes trains every cell of every engine, and the DDP baseline, one after
another in one gloo process group (``tests/engine_driver.py``): starting the processes costs far more
than a tiny run. Cells (tiny SD and tiny Wan, 4 steps of 2 pairs per process): LoRA, full fine-tuning
(under FSDP2 the frozen reference sharded like the policy), Wan with gradient checkpointing (FSDP's
activation checkpointing under FSDP2), a run stopped by SIGTERM and resumed, and a run whose loss is NaN
on process 1 at step 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytestmark = [pytest.mark.engines,
              pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launches checked on linux")]

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("engine_driver.py")
ENGINES = {"zero2": "deepspeed-zero2-cpu.yaml", "zero3": "deepspeed-zero3-cpu.yaml", "fsdp2": "fsdp2-cpu.yaml"}
FULL = ["lora_rank=0", "learning_rate=1e-4"]
GC = ["gradient_checkpointing=true"]
CELLS = {  # name: (family, --set words)
    "sd-lora": ("sd", []),
    "sd-full": ("sd", FULL),
    "wan-lora-gc": ("wan", GC),
    "wan-full-gc": ("wan", FULL + GC),
}
COLUMNS = {  # engine: (cells trained as is, the cell stopped and resumed, the cells poisoned)
    "ddp": (["sd-lora", "sd-full", "wan-lora-gc", "wan-full-gc"], None, ["sd-lora", "wan-full-gc"]),
    "zero2": (["sd-lora", "wan-lora-gc"], "sd-lora", ["sd-lora"]),
    "zero3": (["sd-full", "wan-full-gc"], "wan-full-gc", ["wan-full-gc"]),
    "fsdp2": (["sd-full", "wan-lora-gc", "wan-full-gc"], "wan-full-gc", ["wan-full-gc"]),
}
"""What each engine runs. A ZeRO-3 step costs many small gathers over gloo (the tiny SD's UNet has 208 weight
tensors, 0.8 M weights; the tiny Wan 69, 20 k), so the stopped and the poisoned runs of ZeRO-3 and FSDP2 are Wan's."""


def _pairs(folder: Path, frames: int | None, size: int, count: int = 8) -> Path:
    from sdpo.data import PreferencePair, write_pairs_jsonl

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    pairs = []
    for index in range(count):
        media = {}
        for role in ("chosen", "rejected"):
            pictures = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                        for _ in range(frames or 1)]
            if frames is None:
                pictures[0].save(folder / f"{index}-{role}.png")
                media[role] = f"{index}-{role}.png"
            else:  # a clip as a folder of frames
                (folder / f"{index}-{role}").mkdir()
                for number, picture in enumerate(pictures):
                    picture.save(folder / f"{index}-{role}" / f"{number:03d}.png")
                media[role] = f"{index}-{role}"
        pairs.append(PreferencePair(prompt=f"a test prompt number {index}", **media))
    return write_pairs_jsonl(pairs, folder / "pairs.jsonl")


def _family_configs(root: Path) -> dict[str, Path]:
    """A tiny SD and a tiny Wan, 8 cached pairs each, and a train config for each."""
    from sdpo.cli import main
    from sdpo.models import tiny

    configs = {}
    for family, build, size, frames in [("sd", tiny.build_tiny_sd, 16, None), ("wan", tiny.build_tiny_wan, 32, 5)]:
        model = build(root / family / "model")
        pairs = _pairs(root / family / "media", frames, size)
        flags = ["--height", str(size), "--width", str(size)] + ([] if frames is None else ["--frames", str(frames)])
        cache = root / family / "cache"
        assert main(["--quiet", "precompute", "--family", family, "--pretrained", str(model), "--pairs", str(pairs),
                     "--out", str(cache), *flags]) == 0
        configs[family] = root / f"{family}.yaml"
        configs[family].write_text(yaml.safe_dump({
            "family": family, "pretrained": str(model), "cache_dir": str(cache), "output_dir": str(root / "unused"),
            "method": {"name": "sdpo", "beta": 100.0}, "lora_rank": 4, "learning_rate": 0.01, "max_steps": 4,
            "train_batch_size": 2, "log_every": 1, "report_to": "none", "seed": 1}))
    return configs


def _launch_env(engine: str) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables ``accelerate launch --config_file ENGINE.yaml --num_processes 2``
    sets for its processes: accelerate's launcher runs, with its final torchrun start replaced by a copy
    of the environment it prepared."""
    if engine == "ddp":  # accelerate's MULTI_CPU over gloo, as tests/test_train.py launches it
        return {"ACCELERATE_USE_CPU": "1"}
    from accelerate.commands import launch

    seen, before = {}, dict(os.environ)
    arguments = ["--config_file", str(ROOT / "configs" / "accelerate" / ENGINES[engine]), "--num_processes", "2",
                 "train.py"]
    with mock.patch.object(launch, "_run_torchrun", lambda args: seen.update(os.environ)):
        launch.launch_command(launch.launch_command_parser().parse_args(arguments))
    assert seen, "accelerate launch did not reach torchrun"
    return {k: v for k, v in seen.items() if k.startswith(("ACCELERATE_", "FSDP_")) and before.get(k) != v}


def _plan(engine: str, configs: dict[str, Path], out: Path) -> list[dict]:
    trained, stopped, poisoned = COLUMNS[engine]
    env = _launch_env(engine)

    def cell(name: str, folder: str, mode: str = "train") -> dict:
        family, words = CELLS[name]
        return {"config": str(configs[family]), "mode": mode, "set": [f"output_dir={out / folder}", *words],
                "env": env}

    plan = [cell(name, name) for name in trained]
    if stopped:
        plan += [cell(stopped, f"{stopped}-stopped", "stop"), cell(stopped, f"{stopped}-stopped", "resume")]
    if stopped and stopped not in trained:
        plan.append(cell(stopped, stopped))  # the uninterrupted run the resumed one must match
    plan += [cell(name, f"{name}-poisoned", "poison") for name in poisoned]
    return plan


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every engine's column, trained once for the module in one launch: {engine: folder of its runs}."""
    root = tmp_path_factory.mktemp("engines")
    configs = _family_configs(root)
    plan = []
    for engine in COLUMNS:
        (root / engine).mkdir()
        plan += _plan(engine, configs, root / engine)
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
               str(DRIVER), str(root / "plan.json")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    print("".join(line + "\n" for line in done.stderr.splitlines() if line.startswith("cell ")))
    return {engine: root / engine for engine in COLUMNS}


def _named(label: str):
    """assert_close's message: ``label``, then torch's own account of the difference."""
    return lambda detail: f"{label}: {detail}"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> torch.Tensor:
    return torch.tensor([row.get("loss", float("nan")) for row in _rows(run)], dtype=torch.float64)


# Every process computes in float32 on the CPU. With two processes a gradient's all-reduce is one addition
# and the halving is exact, so any order of reduction gives the same bits: where no step is clipped (every
# norm under max_grad_norm = 1), ZeRO-2 matches DDP bit for bit. A clipped step is scaled by max_grad_norm
# over the global norm, which DeepSpeed sums in another order than torch's clip_grad_norm_, and ZeRO-3 /
# FSDP2 gather each parameter before its layer and reduce-scatter the gradients into flat shards: the
# last bits of a step then differ (float32, ~1e-7 relative), and later steps carry it. Measured over these
# cells (losses near 0.69, 4 steps): at most 3.6e-6 (ZeRO-2 Wan LoRA, whose steps are clipped), ZeRO-3
# 1.4e-6, FSDP2 2.4e-6 (2.1e-6 for SD full in another launch; an earlier ZeRO-3 SD LoRA NaN run 4.7e-6).
# The bound is about four times the largest.
TOLERANCE = 2e-5
# The weights pass through Adam, whose step m / sqrt(v) divides the gradient's last bits by its own size:
# an element whose gradient is near zero moves by a step of its own choosing, up to the learning rate
# (0.01 here, 4 steps). Measured: at most 6.1e-6 on an earlier 2-core machine, 5.2e-5 on a 2-core AMD EPYC
# (one element of 96 in ZeRO-2 Wan LoRA, 6e-4 relative; its clipped steps differ in the last bits, see
# above). The bound is twice the largest, 0.25% of the 0.04 an element can move in these 4 steps.
WEIGHT_TOLERANCE = 1e-4


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_first_losses_equal_two_process_ddp(runs, engine):
    for cell in COLUMNS[engine][0]:
        ours, ddp = _losses(runs[engine] / cell), _losses(runs["ddp"] / cell)
        assert len(ours) == 4 and ours[-1] != ours[0]
        torch.testing.assert_close(ours, ddp, rtol=0, atol=TOLERANCE, msg=_named(f"{engine} {cell}"))
        info = json.loads((runs[engine] / cell / "run_info.json").read_text())
        assert (info["distributed_type"], info["num_processes"]) == (
            "FSDP" if engine == "fsdp2" else "DEEPSPEED", 2)
    unclipped = _rows(runs["ddp"] / "sd-lora")
    assert all(row["grad_norm"] < 1.0 for row in unclipped)
    if engine == "zero2":
        assert torch.equal(_losses(runs["zero2"] / "sd-lora"), _losses(runs["ddp"] / "sd-lora"))


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_run_stopped_by_sigterm_resumes_with_the_uninterrupted_losses(runs, engine):
    """Bit for bit: the resumed run loads the engine's own checkpoint (optimizer shards included) and
    computes in the same order as the uninterrupted run of the same engine."""
    cell = COLUMNS[engine][1]
    stopped = runs[engine] / f"{cell}-stopped"
    assert (stopped / "checkpoint-2" / "trainer_state.json").is_file()  # what the stop wrote
    assert [row["step"] for row in _rows(stopped)] == [1, 2, 3, 4]
    assert torch.equal(_losses(stopped), _losses(runs[engine] / cell))
    torch.testing.assert_close(_losses(stopped), _losses(runs["ddp"] / cell), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_nan_on_one_process_leaves_the_weights_as_the_ddp_guard_does(runs, engine):
    """DDP: sdpo's guard withholds the update of a step whose loss is NaN on any process. Under DeepSpeed
    the update runs inside accelerate's backward (the engine's step), before the guard sees the loss:
    DeepSpeed itself skips a step whose global gradient norm is not finite (no update, no LR step), so the
    weights after it, and the losses of steps 3 and 4, are those of the guarded DDP run. FSDP2 steps
    through sdpo's guard as DDP does."""
    for cell in COLUMNS[engine][2]:
        ours, ddp = runs[engine] / f"{cell}-poisoned", runs["ddp"] / f"{cell}-poisoned"
        bad = [json.loads(line) for line in (ours / "bad_steps.jsonl").read_text().splitlines()]
        assert [(b["step"], b["reason"], len(b["pairs"])) for b in bad] == [(2, "non-finite loss", 4)]
        assert [row["bad_steps"] for row in _rows(ours)] == [0, 1, 1, 1] and "loss" not in _rows(ours)[1]
        unpoisoned = _losses(runs["ddp"] / cell)
        assert abs(float(_losses(ddp)[2] - unpoisoned[2])) > 1e-3  # the skipped step shows in the losses
        torch.testing.assert_close(_losses(ours)[[0, 2, 3]], _losses(ddp)[[0, 2, 3]], rtol=0, atol=TOLERANCE,
                                   msg=_named(f"{engine} {cell}"))


DENOISERS = {"sd": ("StableDiffusionPipeline", "UNet2DConditionModel", "unet"),
             "wan": ("WanPipeline", "WanTransformer3DModel", "transformer")}


def _export_file(cell: str) -> str:
    family, words = CELLS[cell]
    full = "lora_rank=0" in words
    return f"{DENOISERS[family][2]}/diffusion_pytorch_model.safetensors" if full else "pytorch_lora_weights.safetensors"


def _sample_from_export(run: Path, cell: str, base: str) -> torch.Tensor:
    """The family's pipeline on the base model with the run's export (the LoRA loaded, or the trained
    denoiser in place of the base one), sampling 2 steps."""
    import diffusers

    family, words = CELLS[cell]
    pipeline, denoiser, folder = DENOISERS[family]
    if "lora_rank=0" in words:
        trained = getattr(diffusers, denoiser).from_pretrained(str(run), subfolder=folder)
        pipe = getattr(diffusers, pipeline).from_pretrained(base, **{folder: trained})
    else:
        pipe = getattr(diffusers, pipeline).from_pretrained(base)
        pipe.load_lora_weights(str(run))
    pipe.set_progress_bar_config(disable=True)
    size, extra = (16, {}) if family == "sd" else (32, {"num_frames": 5})
    result = pipe("a prompt", num_inference_steps=2, height=size, width=size, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **extra)
    return torch.as_tensor(result.images if family == "sd" else result.frames)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_exported_weights_equal_ddps_and_sample_in_the_family_pipeline(runs, engine):
    """The export gathers the shards (ZeRO-3 / FSDP2 hold a part of each weight per process): every
    tensor is DDP's export of the same cell, to float32 rounding, and the family's pipeline samples
    with it."""
    from safetensors.torch import load_file

    for cell in COLUMNS[engine][0]:
        ours, ddp = (load_file(str(runs[e] / cell / _export_file(cell))) for e in (engine, "ddp"))
        assert ours.keys() == ddp.keys() and ours
        for key in ddp:
            torch.testing.assert_close(ours[key], ddp[key], rtol=0, atol=WEIGHT_TOLERANCE,
                                       msg=_named(f"{engine} {cell} {key}"))
        if (engine, cell) == ("zero2", "sd-lora"):  # no step clipped: the same bits as DDP's
            assert all(torch.equal(ours[key], ddp[key]) for key in ddp)
        base = yaml.safe_load((runs[engine].parent / f"{CELLS[cell][0]}.yaml").read_text())["pretrained"]
        pixels = _sample_from_export(runs[engine] / cell, cell, base)
        assert pixels.numel() > 0 and torch.isfinite(pixels).all()
