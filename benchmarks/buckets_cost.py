"""What aspect-ratio buckets cost: training-step time and memory, bucketed cache against one resolution.

A tiny random SD pipeline (``sdpo.models.tiny``, LoRA rank 4) and one set of pairs whose images come in
three shapes (square, landscape 1:2, portrait 2:1) are precomputed twice: once at the model's one
resolution (``--size`` square, every image centre-cropped to it; today's default) and once with
``--buckets`` (default: the square and a landscape and a portrait bucket of about the same pixel count).
Then:

1. Step time: the trainer's own optimizer step (``sdpo.train.trainer._optimizer_step``) alternates
   between the two caches step by step on one run (each with its own batch order, the bucketed one
   grouping by bucket), so drift in machine load hits both alike; median of ``--steps`` each after
   ``--warmup``, and their ratio.
2. Peak memory of a step: on a GPU the allocator's peak above what is held before the step; on the CPU
   the peak of the resident set (sampled every 0.5 ms) above what the loaded run holds, in a fresh
   process per cache (freed heap is not always returned to the system, so measuring one after the
   other would hide the second's peak).
3. Precompute time of each cache (the bucketed one also reads every chosen image's size).

    python benchmarks/buckets_cost.py                      # CPU, tiny SD 64x64, markdown
    python benchmarks/buckets_cost.py --device cuda --size 256 --buckets 256x256 192x336 336x192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARMS = ("one resolution", "buckets")


def _pairs(folder: Path, count: int, size: int) -> Path:
    """``count`` pairs, a third each square, landscape (1:2) and portrait (2:1), about ``size`` on the short side."""
    from PIL import Image

    from sdpo.data import PreferencePair, write_pairs_jsonl

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(size, size), (size, 2 * size), (2 * size, size)]
    pairs = []
    for index in range(count):
        height, width = shapes[index % 3]
        names = {}
        for role in ("chosen", "rejected"):
            names[role] = f"{index}-{role}.png"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / names[role])
        pairs.append(PreferencePair(prompt=f"prompt {index}", **names))
    return write_pairs_jsonl(pairs, folder / "pairs.jsonl")


def prepare(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The model and both caches under ``root``; seconds each precompute took."""
    from sdpo.data import precompute, read_pairs
    from sdpo.models import tiny
    from sdpo.models.base import MediaFormat
    from sdpo.models.registry import load_spec

    model = tiny.build_tiny_sd(root / "model")
    pairs = read_pairs(_pairs(root / "media", args.pairs, args.size))
    encoder = load_spec("sd", model, media_format=MediaFormat(height=args.size, width=args.size))
    seconds = {}
    for arm, buckets in zip(ARMS, (None, args.buckets), strict=True):
        start = time.perf_counter()
        precompute(pairs, encoder, root / arm.replace(" ", "-"), progress=False, num_workers=0, buckets=buckets)
        seconds[arm] = time.perf_counter() - start
    return {"model": str(model), "precompute_s": seconds}


def build_run(root: Path, args: argparse.Namespace) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """One run, set up as ``sdpo.train.trainer.train`` does, and each cache's (dataset, batch order)."""
    from sdpo.data import CachedPairs
    from sdpo.models.base import MediaFormat
    from sdpo.models.registry import load_spec
    from sdpo.train.config import TrainConfig
    from sdpo.train.setup import _accelerator, _build_run, _Resume
    from sdpo.train.trainer import _batch_order

    model = root / "model"
    data = {arm: CachedPairs(root / arm.replace(" ", "-")) for arm in ARMS}
    config = TrainConfig(family="sd", pretrained=str(model), cache_dir=str(root / "buckets"),
                         output_dir=str(root / "run"), lora_rank=4, max_steps=10**6, train_batch_size=args.batch,
                         report_to="none", mixed_precision="no")
    accelerator = _accelerator(config, root / "run")
    spec = load_spec("sd", model, load_vae=False, load_text_encoder=False,
                     media_format=MediaFormat(height=args.size, width=args.size))
    run = _build_run(config, spec, data["buckets"], accelerator, root / "run", _Resume())
    return run, {arm: (dataset, _batch_order(dataset, config, accelerator)) for arm, dataset in data.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(root: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    from sdpo.train.trainer import _optimizer_step

    run, orders = build_run(root, args)
    device = run.accelerator.device
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for step in range(args.warmup + args.steps):
        for arm in (ARMS if step % 2 == 0 else ARMS[::-1]):  # alternate who goes first
            run.dataset, run.order = orders[arm]
            _sync(device)
            start = time.perf_counter()
            _optimizer_step(run, step)
            _sync(device)
            if step >= args.warmup:
                times[arm].append(time.perf_counter() - start)
    return times


def peak_mb(root: Path, args: argparse.Namespace, arm: str) -> float:
    """Peak memory ``--warmup + --steps`` steps on ``arm``'s cache add above what the run holds, in MiB."""
    from sdpo.bench.speed import _resident_bytes, _ResidentPeak
    from sdpo.train.trainer import _optimizer_step

    run, orders = build_run(root, args)
    run.dataset, run.order = orders[arm]
    device = run.accelerator.device
    steps = args.warmup + args.steps
    if device.type == "cuda":
        _sync(device)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for step in range(steps):
            _optimizer_step(run, step)
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20
    import contextlib
    import ctypes
    import gc

    _optimizer_step(run, 0)  # the optimizer's state and the autograd buffers exist from the first step on
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    held = _resident_bytes()
    sampler = _ResidentPeak()
    sampler.start()
    for step in range(1, steps):
        _optimizer_step(run, step)
    return (sampler.stop() - held) / 2**20


def _peak_in_fresh_process(root: Path, argv: list[str], arm: str) -> float:
    command = [sys.executable, __file__, *argv, "--_root", str(root), "--_memory-of", arm]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory of {arm} failed: {done.stderr.strip().splitlines()[-3:]}")
    return float(done.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64, help="the model's square resolution (latents are size/2)")
    parser.add_argument("--buckets", nargs="+", default=["64x64", "48x84", "84x48"], metavar="HEIGHTxWIDTH")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--json", default=None)
    parser.add_argument("--_root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_memory-of", default=None, choices=ARMS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    if args._memory_of is not None:  # the fresh process of one memory measurement
        print(peak_mb(Path(args._root), args, args._memory_of))
        return None
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prepared = prepare(root, args)
        times = time_steps(root, args)
        memory = {arm: _peak_in_fresh_process(root, argv, arm) for arm in ARMS}
    median = {arm: statistics.median(values) for arm, values in times.items()}
    one, bucketed = ARMS
    result = {"device": args.device, "size": args.size, "buckets": args.buckets, "pairs": args.pairs,
              "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "median_s": median,
              "step_ratio": median[bucketed] / median[one], "peak_mb": memory,
              "memory_ratio": memory[bucketed] / memory[one] if memory[one] > 0 else None,
              "precompute_s": prepared["precompute_s"],
              "precompute_ratio": prepared["precompute_s"][bucketed] / prepared["precompute_s"][one]}
    print(f"## Buckets, tiny SD {args.size}x{args.size} vs buckets {' '.join(args.buckets)}, {args.pairs} pairs "
          f"(a third each square, 1:2, 2:1), batch {args.batch}, {args.device}; median of {args.steps} "
          f"alternating steps after {args.warmup} warm-up\n")
    print("| cache | ms / step | step peak MiB | precompute s |\n|---|---|---|---|")
    for arm in ARMS:
        print(f"| {arm} | {median[arm] * 1e3:.1f} | {memory[arm]:.1f} | {prepared['precompute_s'][arm]:.2f} |")
    memory_ratio = "n/a" if result["memory_ratio"] is None else f"{result['memory_ratio']:.2f}x"
    print(f"\nbuckets / one resolution: step time {result['step_ratio']:.3f}x, step peak memory {memory_ratio}, "
          f"precompute {result['precompute_ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
