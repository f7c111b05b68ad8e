"""DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 with two CPU processes over gloo, against two-process DDP.

Each engine is launched as a user launches it, ``accelerate launch --config_file
configs/accelerate/<engine>-cpu.yaml``, once, and trains every cell of its column in that one process
group (``tests/engine_driver.py``: starting the processes costs far more than a tiny run); the DDP baseline
is one ``torchrun`` launch shared by all engines. Cells (tiny SD and tiny Wan, 4 steps of 2 pairs per
process): LoRA, full fine-tuning (the frozen reference a copy, sharded like the policy under FSDP2), Wan
with gradient checkpointing (FSDP's activation checkpointing under FSDP2), a run stopped by SIGTERM and
resumed, and a run whose loss is NaN on process 1 at step 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
COLUMNS = {  # engine: (cells trained as is, the cell stopped and resumed, the cell poisoned)
    "ddp": (["sd-lora", "sd-full", "wan-lora-gc", "wan-full-gc"], None, "sd-lora"),
    "zero2": (["sd-lora", "wan-lora-gc"], "sd-lora", "sd-lora"),
    "zero3": (["sd-full"], "sd-full", "sd-lora"),
    "fsdp2": (["sd-full", "wan-lora-gc", "wan-full-gc"], "sd-full", "sd-lora"),
}
PORTS = {"ddp": 29641, "zero2": 29642, "zero3": 29643, "fsdp2": 29644}


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


def _plan(engine: str, configs: dict[str, Path], out: Path) -> list[dict]:
    trained, stopped, poisoned = COLUMNS[engine]

    def cell(name: str, folder: str, mode: str = "train") -> dict:
        family, words = CELLS[name]
        return {"config": str(configs[family]), "mode": mode, "set": [f"output_dir={out / folder}", *words]}

    plan = [cell(name, name) for name in trained]
    if stopped:
        plan += [cell(stopped, f"{stopped}-stopped", "stop"), cell(stopped, f"{stopped}-stopped", "resume")]
    if stopped and stopped not in trained:
        plan.append(cell(stopped, stopped))  # the uninterrupted run the resumed one must match
    plan.append(cell(poisoned, f"{poisoned}-poisoned", "poison"))
    return plan


def _launch(engine: str, plan: list[dict], folder: Path) -> float:
    plan_file = folder / f"plan-{engine}.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if engine == "ddp":  # accelerate's MULTI_CPU over gloo, as tests/test_train.py launches it
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / ENGINES[engine]), "--num_processes", "2"]
    command += ["--master_port" if engine == "ddp" else "--main_process_port", str(PORTS[engine]), str(DRIVER),
                str(plan_file)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    return time.perf_counter() - began


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every engine's column, trained once for the module: {engine: folder of its runs}."""
    root = tmp_path_factory.mktemp("engines")
    configs = _family_configs(root)
    folders = {}
    for engine in COLUMNS:
        folders[engine] = root / engine
        folders[engine].mkdir()
        seconds = _launch(engine, _plan(engine, configs, folders[engine]), folders[engine])
        print(f"{engine}: {seconds:.1f} s")
    return folders


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> torch.Tensor:
    return torch.tensor([row.get("loss", float("nan")) for row in _rows(run)], dtype=torch.float64)


# Both processes compute in float32 on the CPU. With two processes a gradient's all-reduce is one addition
# and halving is exact, so any order of reduction gives the same bits: ZeRO-2 matches DDP bit for bit.
# ZeRO-3 and FSDP2 gather each parameter before its layer and hold the gradients in flat partitions, and
# DeepSpeed clips with a norm summed in another order (a step whose norm is over max_grad_norm is scaled
# by a factor that differs in the last bits): float32 rounding of 1e-7 relative per step, which the
# following steps carry. The bound is the largest difference measured (ZETA) with a margin of 4.
TOLERANCE = {"zero2": 0.0, "zero3": 2e-5, "fsdp2": 2e-5}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_the_first_losses_equal_two_process_ddp(runs, engine):
    for cell in COLUMNS[engine][0]:
        ours, ddp = _losses(runs[engine] / cell), _losses(runs["ddp"] / cell)
        assert len(ours) == 4 and ours[-1] != ours[0]
        torch.testing.assert_close(ours, ddp, rtol=0, atol=TOLERANCE[engine], msg=f"{engine} {cell}")
        info = json.loads((runs[engine] / cell / "run_info.json").read_text())
        assert (info["distributed_type"], info["num_processes"]) == (
            "FSDP" if engine == "fsdp2" else "DEEPSPEED", 2)
