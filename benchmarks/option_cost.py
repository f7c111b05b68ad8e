"""Step-time and memory cost of a training option: the trainer's own optimizer step, with and without it.

Two runs of ``sdpo.train`` are set up side by side on the same random pairs, one with the defaults and
one with the ``--set`` options (TrainConfig fields, values in YAML), each on its own copy of a denoiser
built from a published config with random weights (``benchmarks/gpu_step.py``'s architectures;
``--tiny``: their tiny configs). Their steps are interleaved one by one, so clock drift and other load
hit both alike; the medians after the warm-up and their ratio are printed, with the trained parameter
count and what they and their AdamW state hold (and, on a GPU, the allocator's peak during the steps).

    python benchmarks/option_cost.py --tiny --device cpu --set ema_decay=0.999      # tiny SD 1.5 UNet, LoRA
    python benchmarks/option_cost.py --tiny --lora-rank 0 --set ema_decay=0.999     # full fine-tuning
    python benchmarks/option_cost.py --tiny --set "lora_target_modules=[to_q,to_k,to_v,to_out.0]"
    python benchmarks/option_cost.py --arch sd15 --mixed-precision bf16 --set ema_decay=0.999 --json out.json   # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_step  # noqa: E402
import torch  # noqa: E402


def pairs_for(arch: gpu_step.Arch, tiny: bool, count: int) -> list[Any]:
    """``count`` random pairs as the cache hands them to the trainer (no batch dimension, on the CPU)."""
    from sdpo.data.batch import Pair

    pairs = []
    for index in range(count):
        batch = gpu_step.make_batch(arch, tiny, torch.device("cpu"), torch.float32, seed=index)
        pairs.append(Pair(batch.chosen[0], batch.rejected[0], {k: v[0] for k, v in batch.conditions.items()}))
    return pairs


def build(arch: gpu_step.Arch, args: argparse.Namespace, options: dict[str, Any], folder: Path,
          dataset: list[Any]) -> Any:
    """One run, set up exactly as ``sdpo.train.trainer.train`` does, ready for ``_optimizer_step``."""
    from sdpo.objectives import MethodConfig
    from sdpo.train.config import TrainConfig
    from sdpo.train.setup import _accelerator, _build_run, _resume_point
    from sdpo.train.trainer import GlobalBatchOrder

    config = TrainConfig(family=arch.family, output_dir=str(folder), method=MethodConfig.preset("sdpo", beta=1000.0),
                         lora_rank=args.lora_rank, learning_rate=1e-5, max_steps=args.steps + args.warmup,
                         train_batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                         gradient_checkpointing=args.gradient_checkpointing, report_to="none", **options)
    torch.manual_seed(0)  # the same random denoiser for both runs
    spec = gpu_step.make_spec(arch, gpu_step.build_denoiser(arch, args.tiny, "cpu", torch.float32))
    folder.mkdir(parents=True, exist_ok=True)
    accelerator = _accelerator(config, folder)
    start = _resume_point(folder, None, config, True, True)
    run = _build_run(config, spec, dataset, accelerator, folder, start)
    run.order = GlobalBatchOrder(len(dataset), config.train_batch_size, 1, 0, config.seed)
    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from sdpo.train.trainer import _optimizer_step

    arch = gpu_step.ARCHS[args.arch]
    dataset = pairs_for(arch, args.tiny, max(8, 2 * args.batch_size))
    with tempfile.TemporaryDirectory() as root:
        runs = {"off": build(arch, args, {}, Path(root) / "off", dataset),
                "on": build(arch, args, args.options, Path(root) / "on", dataset)}
        device = runs["on"].accelerator.device
        times: dict[str, list[float]] = {"off": [], "on": []}
        peaks: dict[str, int] = {"off": 0, "on": 0}
        for step in range(args.warmup + args.steps):
            for name in (("off", "on") if step % 2 == 0 else ("on", "off")):  # alternate who goes first
                gpu_step._sync(device)
                if device.type == "cuda":
                    held = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                clock = time.perf_counter()
                _optimizer_step(runs[name], step)
                gpu_step._sync(device)
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - clock)
                if device.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - held)
        trained = {name: sum(p.numel() for p in run.params) for name, run in runs.items()}
        state = {name: _state_bytes(run) for name, run in runs.items()}
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"arch": args.arch, "tiny": args.tiny, "device": str(device), "lora_rank": args.lora_rank,
            "mixed_precision": args.mixed_precision, "batch_size": args.batch_size, "options": args.options,
            "trained_parameters": trained, "trained_state_mib": state,
            "step_peak_mib": {k: v / 2**20 for k, v in peaks.items()} if device.type == "cuda" else None, "steps": args.steps, "warmup": args.warmup,
            "median_s_off": off, "median_s_on": on, "ratio": on / off, "threads": torch.get_num_threads()}


def _state_bytes(run: Any) -> float:
    """MiB held by the trained parameters, their AdamW moments and any EMA copy."""
    tensors = list(run.params) + [t for group in run.optimizer.state.values() for t in group.values()
                                  if torch.is_tensor(t)]
    if run.ema is not None:
        tensors += list(run.ema.shadow_params)
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15", choices=sorted(gpu_step.ARCHS))
    parser.add_argument("--tiny", action="store_true", help="the architecture's tiny config")
    parser.add_argument("--device", default=None, help="cpu to force the CPU (default: accelerate's choice)")
    parser.add_argument("--lora-rank", type=int, default=16, help="0: full fine-tuning")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings", required=True,
                        help="TrainConfig fields of the 'on' run (values are YAML)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import yaml

    args = parse_args(argv)
    args.options = {key: yaml.safe_load(value) for key, _, value in (s.partition("=") for s in args.settings)}
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    result = measure(args)
    trained, state = result["trained_parameters"], result["trained_state_mib"]
    print(f"{result['arch']}{' (tiny)' if result['tiny'] else ''} on {result['device']}, "
          f"{'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'}, batch {args.batch_size}: "
          f"median step {result['median_s_off'] * 1e3:.2f} ms with the defaults ({trained['off']:,} trained "
          f"parameters, {state['off']:.2f} MiB with AdamW state), {result['median_s_on'] * 1e3:.2f} ms with "
          f"{' '.join(args.settings)} ({trained['on']:,}, {state['on']:.2f} MiB): {result['ratio']:.3f}x, "
          f"{args.steps} steps each after {args.warmup} warm-up")
    if result["step_peak_mib"]:
        print(f"step peak above held memory: {result['step_peak_mib']['off']:.1f} -> "
              f"{result['step_peak_mib']['on']:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
