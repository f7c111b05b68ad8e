"""The cost of a training option against the defaults: step time and memory of the trainer's own step.

Two runs of ``sdpo.train`` are set up side by side, ``defaults`` and ``option``, each through the
trainer's public set-up (``sdpo.train.setup.prepare_run``) on its own copy of one denoiser, and their
optimizer steps (``sdpo.train.optimize.optimizer_step``) are interleaved one by one, so clock drift and
other load hit both alike. The medians after the warm-up and their ratio are printed, with the trained
parameter count and what they, their AdamW moments and any EMA copy hold. The option is either

- ``--set KEY=VALUE ...``: TrainConfig fields (values in YAML) of the ``option`` run. Both train a
  denoiser built from a published config with random weights (``benchmarks.architectures``; ``--tiny``:
  its tiny config) on the same random pairs. When the option samples latents (``latent_sampling``),
  its pairs carry posterior stds, as a cache precomputed with stds does; the defaults' pairs do not.
- ``--buckets HxW ...``: the data. A tiny random SD pipeline (``sdpo.models.tiny``) and pairs whose
  images come in three shapes (square, 1:2, 2:1) are precomputed twice: at the model's one resolution
  (``--size`` square, centre-cropped; the defaults) and with these buckets (the option, its batches
  grouped by bucket). Each precompute's time is reported too.

Memory: on a GPU the allocator's peak during the steps above what is held before them; ``--cpu-peak``:
the CPU resident set's peak above what the loaded run holds, each run in a fresh process (freed heap
is not always returned to the system, so one run measured after the other would hide its peak).

    python -m benchmarks.option_cost --tiny --device cpu --set ema_decay=0.999       # tiny SD 1.5 UNet, LoRA
    python -m benchmarks.option_cost --tiny --lora-rank 0 --set ema_decay=0.999      # full fine-tuning
    python -m benchmarks.option_cost --tiny --set "lora_target_modules=[to_q,to_k,to_v,to_out.0]"
    python -m benchmarks.option_cost --tiny --device cpu --threads 1 --lora-rank 4 --batch-size 4 --warmup 6 \\
        --set latent_sampling=sample flip=independent
    python -m benchmarks.option_cost --device cpu --threads 1 --lora-rank 4 --batch-size 4 --warmup 6 --cpu-peak \\
        --buckets 64x64 48x84 84x48
    python -m benchmarks.option_cost --arch sd15 --mixed-precision bf16 --set ema_decay=0.999 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import architectures  # noqa: E402
from sdpo.bench.speed import ResidentPeak, resident_bytes  # noqa: E402
from sdpo.data.batch import Pair  # noqa: E402
from sdpo.objectives import MethodConfig  # noqa: E402
from sdpo.train.config import TrainConfig  # noqa: E402
from sdpo.train.optimize import optimizer_step  # noqa: E402
from sdpo.train.run import ResumePoint, TrainingRun  # noqa: E402
from sdpo.train.setup import make_accelerator, prepare_run  # noqa: E402

ARMS = ("defaults", "option")


# ---------------------------------------------------------------------- the two runs
def random_pairs(arch: architectures.Arch, tiny: bool, count: int, with_std: bool) -> list[Pair]:
    """``count`` random pairs as the cache hands them to the trainer (no batch dimension, on the CPU)."""
    pairs = []
    for index in range(count):
        batch = architectures.make_batch(arch, tiny, torch.device("cpu"), torch.float32, seed=index)
        chosen, rejected = batch.chosen[0], batch.rejected[0]
        stds = dict(chosen_std=0.1 * chosen.abs(), rejected_std=0.1 * rejected.abs()) if with_std else {}
        pairs.append(Pair(chosen, rejected, {k: v[0] for k, v in batch.conditions.items()}, **stds))
    return pairs


def _shaped_pairs(folder: Path, count: int, size: int) -> Path:
    """``count`` pairs, a third each square, landscape (1:2) and portrait (2:1), ``size`` on the short side."""
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


def prepare_caches(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """``--buckets``: the tiny model and both caches under ``root``; seconds each precompute took."""
    from sdpo.data import precompute, read_pairs
    from sdpo.models import tiny
    from sdpo.models.base import MediaFormat
    from sdpo.models.registry import load_spec

    model = tiny.build_tiny_sd(root / "model")
    pairs = read_pairs(_shaped_pairs(root / "media", args.pairs, args.size))
    encoder = load_spec("sd", model, media_format=MediaFormat(height=args.size, width=args.size))
    seconds = {}
    for arm, buckets in zip(ARMS, (None, args.buckets), strict=True):
        start = time.perf_counter()
        precompute(pairs, encoder, root / f"cache-{arm}", progress=False, num_workers=0, buckets=buckets)
        seconds[arm] = time.perf_counter() - start
    return seconds


def build_arm(root: Path, args: argparse.Namespace, arm: str) -> TrainingRun:
    """One run, set up as ``sdpo.train.trainer.train`` sets it up, ready for ``optimizer_step``."""
    options = args.options if arm == "option" else {}
    folder = root / f"run-{arm}"
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(output_dir=str(folder), method=MethodConfig.preset("sdpo", beta=1000.0), lora_rank=args.lora_rank,
                  learning_rate=1e-5, max_steps=args.steps + args.warmup + 1, train_batch_size=args.batch_size,
                  mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                  report_to="none")
    if args.buckets:
        from sdpo.data import CachedPairs
        from sdpo.models.base import MediaFormat
        from sdpo.models.registry import load_spec

        cache = root / f"cache-{arm}"
        config = TrainConfig(family="sd", pretrained=str(root / "model"), cache_dir=str(cache), **common)
        spec = load_spec("sd", root / "model", load_vae=False, load_text_encoder=False,
                         media_format=MediaFormat(height=args.size, width=args.size))
        dataset: Any = CachedPairs(cache)
    else:
        arch = architectures.ARCHS[args.arch]
        config = TrainConfig(family=arch.family, **common, **options)
        torch.manual_seed(0)  # the same random denoiser for both runs
        spec = architectures.make_spec(arch, architectures.build_denoiser(arch, args.tiny, "cpu", torch.float32))
        with_std = options.get("latent_sampling", "mean") != "mean"
        dataset = random_pairs(arch, args.tiny, max(8, 2 * args.batch_size), with_std)
    return prepare_run(config, spec, dataset, make_accelerator(config, folder), folder, ResumePoint())


# ---------------------------------------------------------------------- measuring
def interleaved_steps(runs: dict[str, TrainingRun], args: argparse.Namespace) -> tuple[dict, dict]:
    """Seconds per timed step of each run, steps alternating who goes first; GPU peaks above held memory."""
    device = runs["option"].accelerator.device
    times: dict[str, list[float]] = {arm: [] for arm in runs}
    peaks: dict[str, int] = {arm: 0 for arm in runs}
    for step in range(args.warmup + args.steps):
        for arm in (ARMS if step % 2 == 0 else ARMS[::-1]):
            architectures.sync(device)
            if device.type == "cuda":
                held = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            clock = time.perf_counter()
            optimizer_step(runs[arm], step)
            architectures.sync(device)
            if step >= args.warmup:
                times[arm].append(time.perf_counter() - clock)
            if device.type == "cuda":
                peaks[arm] = max(peaks[arm], torch.cuda.max_memory_allocated(device) - held)
    return times, peaks


def cpu_peak_mib(run: TrainingRun, steps: int) -> float:
    """The resident set's peak over ``steps`` steps above what the run holds after its first, in MiB."""
    optimizer_step(run, 0)  # the optimizer's state and the autograd buffers exist from the first step on
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    held = resident_bytes()
    sampler = ResidentPeak()
    sampler.start()
    for step in range(1, steps):
        optimizer_step(run, step)
    return (sampler.stop() - held) / 2**20


def _cpu_peak_in_fresh_process(root: Path, argv: list[str], arm: str) -> float:
    command = [sys.executable, "-m", "benchmarks.option_cost", *argv, "--_root", str(root), "--_arm", arm]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"memory of {arm} failed: {done.stderr.strip().splitlines()[-3:]}")
    return float(done.stdout.strip().splitlines()[-1])


def state_mib(run: TrainingRun) -> float:
    """MiB held by the trained parameters, their AdamW moments and any EMA copy."""
    tensors = list(run.params) + [t for group in run.optimizer.state.values() for t in group.values()
                                  if torch.is_tensor(t)]
    if run.ema is not None:
        tensors += list(run.ema.shadow_params)
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def measure(root: Path, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    precompute_s = prepare_caches(root, args) if args.buckets else None
    runs = {arm: build_arm(root, args, arm) for arm in ARMS}
    device = runs["option"].accelerator.device
    times, peaks = interleaved_steps(runs, args)
    trained = {arm: sum(p.numel() for p in run.params) for arm, run in runs.items()}
    state = {arm: state_mib(run) for arm, run in runs.items()}
    del runs
    if device.type == "cuda":
        step_peak = {arm: peak / 2**20 for arm, peak in peaks.items()}
    elif args.cpu_peak:
        step_peak = {arm: _cpu_peak_in_fresh_process(root, argv, arm) for arm in ARMS}
    else:
        step_peak = None
    median = {arm: statistics.median(values) for arm, values in times.items()}
    return {"mode": "buckets" if args.buckets else "options", "arch": "sd-tiny" if args.buckets else args.arch,
            "tiny": args.tiny or bool(args.buckets), "device": str(device), "lora_rank": args.lora_rank,
            "mixed_precision": args.mixed_precision, "batch_size": args.batch_size, "options": args.options,
            "buckets": args.buckets, "trained_parameters": trained, "trained_state_mib": state,
            "step_peak_mib": step_peak, "precompute_s": precompute_s, "steps": args.steps, "warmup": args.warmup,
            "median_s": median, "ratio": median["option"] / median["defaults"], "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    option = parser.add_mutually_exclusive_group(required=True)
    option.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                        help="TrainConfig fields of the 'option' run (values are YAML)")
    option.add_argument("--buckets", nargs="+", default=None, metavar="HEIGHTxWIDTH",
                        help="the option is a bucketed cache of a tiny SD pipeline (defaults: one resolution)")
    parser.add_argument("--arch", default="sd15", choices=sorted(architectures.ARCHS), help="with --set")
    parser.add_argument("--tiny", action="store_true", help="the architecture's tiny config (with --set)")
    parser.add_argument("--size", type=int, default=64, help="--buckets: the model's square resolution")
    parser.add_argument("--pairs", type=int, default=24, help="--buckets: pairs in each cache")
    parser.add_argument("--device", default=None, help="cpu to force the CPU (default: accelerate's choice)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--lora-rank", type=int, default=16, help="0: full fine-tuning")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu-peak", action="store_true", help="measure the CPU peak memory (fresh processes)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--_root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_arm", default=None, choices=ARMS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _summary(result: dict[str, Any], args: argparse.Namespace) -> str:
    trained, state, median = result["trained_parameters"], result["trained_state_mib"], result["median_s"]
    what = f"buckets {' '.join(args.buckets)}" if args.buckets else " ".join(args.settings)
    lines = [f"{result['arch']}{' (tiny)' if result['tiny'] else ''} on {result['device']}, "
             f"{'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'}, batch {args.batch_size}: "
             f"median step {median['defaults'] * 1e3:.2f} ms with the defaults ({trained['defaults']:,} trained "
             f"parameters, {state['defaults']:.2f} MiB with AdamW state), {median['option'] * 1e3:.2f} ms with "
             f"{what} ({trained['option']:,}, {state['option']:.2f} MiB): {result['ratio']:.3f}x, "
             f"{args.steps} steps each after {args.warmup} warm-up"]
    if result["step_peak_mib"]:
        peak = result["step_peak_mib"]
        lines.append(f"step peak above held memory: {peak['defaults']:.1f} -> {peak['option']:.1f} MiB")
    if result["precompute_s"]:
        seconds = result["precompute_s"]
        lines.append(f"precompute: {seconds['defaults']:.2f} s one resolution, {seconds['option']:.2f} s buckets")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    import yaml

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.options = {key: yaml.safe_load(value) for key, _, value in (s.partition("=") for s in args.settings)}
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._arm is not None:  # the fresh process of one CPU memory measurement
        print(cpu_peak_mib(build_arm(Path(args._root), args, args._arm), args.warmup + args.steps))
        return None
    with tempfile.TemporaryDirectory(prefix="sdpo-option-cost-") as root:
        result = measure(Path(root), args, argv)
    print(_summary(result, args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
