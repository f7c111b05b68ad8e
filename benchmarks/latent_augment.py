"""What latent sampling and flips cost: training-step time and cache bytes.

Three parts:

1. Measured step time: the trainer's own optimizer step (``sdpo.train.trainer._optimizer_step``) on a
   tiny random SD pipeline (``sdpo.models.tiny``, LoRA rank 4) and a cache with stds, alternating
   ``latent_sampling=sample, flip=independent`` and ``latent_sampling=mean, flip=none`` step by step
   (so drift in machine load hits both alike), median of ``--steps`` each after ``--warmup``.
2. Measured augmentation alone (``augment_batch``: the CPU eps and coin draws, the move to the device
   and the add / flip) at the real models' latent shapes, median over ``--repeats`` calls; this is the
   whole added work per micro-step, whatever the denoiser costs.
3. Cache bytes: the tiny SD cache with and without stds (measured), and bytes per pair at the real
   shapes (counted: latents float32, text states bf16 as a GPU precompute writes them).

    python benchmarks/latent_augment.py              # all three, markdown
    python benchmarks/latent_augment.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Per-pair tensors of a cache at the real models' usual sizes: name -> (shape, bytes per element).
REAL = {
    "SD 1.5 512x512": {"latents": ((4, 64, 64), 4), "encoder_hidden_states": ((77, 768), 2)},
    "SDXL 1024x1024": {"latents": ((4, 128, 128), 4), "encoder_hidden_states": ((77, 2048), 2),
                       "text_embeds": ((1280,), 2), "time_ids": ((6,), 4)},
    "CogVideoX-5b 49x480x720": {"latents": ((13, 16, 60, 90), 4), "encoder_hidden_states": ((226, 4096), 2)},
    "Wan2.1 81x480x832": {"latents": ((16, 21, 60, 104), 4), "encoder_hidden_states": ((512, 4096), 2)},
}
BATCH = {"SD 1.5 512x512": 4, "SDXL 1024x1024": 4, "CogVideoX-5b 49x480x720": 1, "Wan2.1 81x480x832": 1}


def _pairs(folder: Path, count: int, size: int) -> Path:
    from PIL import Image

    from sdpo.data import PreferencePair, write_pairs_jsonl

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(count):
        names = {}
        for role in ("chosen", "rejected"):
            names[role] = f"{index}-{role}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / names[role])
        pairs.append(PreferencePair(prompt=f"prompt {index}", **names))
    return write_pairs_jsonl(pairs, folder / "pairs.jsonl")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("shard-*.safetensors"))


def tiny_sd(root: Path, size: int, steps: int, warmup: int, batch: int, device: str) -> dict[str, Any]:
    """Median step seconds of both settings, and the tiny cache's bytes with and without stds."""
    from sdpo.data import CachedPairs, precompute, read_pairs
    from sdpo.models import tiny
    from sdpo.models.base import MediaFormat
    from sdpo.models.registry import load_spec
    from sdpo.train.config import TrainConfig
    from sdpo.train.setup import _accelerator, _build_run, _Resume
    from sdpo.train.trainer import GlobalBatchOrder, _optimizer_step

    model = tiny.build_tiny_sd(root / "model")
    fmt = MediaFormat(height=size, width=size)
    pairs = read_pairs(_pairs(root / "media", 4 * batch, size))
    encoder = load_spec("sd", model, media_format=fmt)
    with_std = precompute(pairs, encoder, root / "cache", progress=False, num_workers=0)
    mean_only = precompute(pairs, encoder, root / "cache-mean", progress=False, num_workers=0, latent_std=False)
    config = TrainConfig(family="sd", pretrained=str(model), cache_dir=str(with_std), output_dir=str(root / "run"),
                         lora_rank=4, max_steps=10**6, train_batch_size=batch, report_to="none",
                         mixed_precision="no", latent_sampling="sample", flip="independent")
    accelerator = _accelerator(config, root / "run")
    dataset = CachedPairs(with_std)
    spec = load_spec("sd", model, load_vae=False, load_text_encoder=False, media_format=fmt)
    run = _build_run(config, spec, dataset, accelerator, root / "run", _Resume())
    run.order = GlobalBatchOrder(len(dataset), batch, 1, 0, config.seed)
    times: dict[str, list[float]] = {"sample+independent": [], "mean+none": []}
    for step in range(warmup + 2 * steps):
        label = "sample+independent" if step % 2 == 0 else "mean+none"
        run.sample_latents = label.startswith("sample")
        run.config.flip = "independent" if run.sample_latents else "none"
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _optimizer_step(run, step)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times[label].append(time.perf_counter() - start)
    latent = tuple(dataset[0].chosen.shape)
    return {"latent": latent, "median": {k: statistics.median(v) for k, v in times.items()},
            "bytes": {"with std": _folder_bytes(with_std), "mean only": _folder_bytes(mean_only)},
            "pairs": len(dataset)}


def augment_alone(device: str, repeats: int) -> dict[str, float]:
    """Median seconds of ``augment_batch`` (sample + independent flips) per micro-batch at the real shapes."""
    from sdpo.data.batch import PairBatch
    from sdpo.train.augment import augment_batch

    result = {}
    for name, tensors in REAL.items():
        shape, batch = tensors["latents"][0], BATCH[name]
        chosen = torch.randn(batch, *shape, device=device)
        pair = PairBatch(chosen, chosen.clone(), {}, chosen_std=chosen.abs(), rejected_std=chosen.abs())
        rows = torch.arange(batch)
        times = []
        for step in range(repeats + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = augment_batch(pair, rows, step, 0, sample=True, flip="independent")
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - start)
            del out
        result[name] = statistics.median(times)
    return result


def counted_bytes() -> list[tuple[str, int, int]]:
    """(model, bytes per pair without stds, with stds) at the real shapes."""
    rows = []
    for name, tensors in REAL.items():
        def size(entry: tuple[tuple[int, ...], int]) -> int:
            return math.prod(entry[0]) * entry[1]

        latents = 2 * size(tensors["latents"])
        conditions = sum(size(v) for k, v in tensors.items() if k != "latents")
        rows.append((name, latents + conditions, 2 * latents + conditions))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64, help="tiny SD pixel size (latents are size/2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.device == "cpu":
        import os

        os.environ["ACCELERATE_USE_CPU"] = "1"
    with tempfile.TemporaryDirectory() as root:
        measured = tiny_sd(Path(root), args.size, args.steps, args.warmup, args.batch, args.device)
    sample, mean = measured["median"]["sample+independent"], measured["median"]["mean+none"]
    print(f"## Step time, tiny SD {args.size}x{args.size} (latents {measured['latent']}), batch {args.batch}, "
          f"{args.device}, median of {args.steps} alternating steps after {args.warmup} warm-up\n")
    print("| setting | ms / step |\n|---|---|")
    print(f"| latent_sampling=mean, flip=none | {mean * 1e3:.1f} |")
    print(f"| latent_sampling=sample, flip=independent | {sample * 1e3:.1f} ({(sample / mean - 1) * 100:+.1f}%) |\n")
    print(f"## augment_batch alone ({args.device}, median of {args.repeats})\n")
    print("| model | latents per member | batch | ms per micro-batch |\n|---|---|---|---|")
    for name, seconds in augment_alone(args.device, args.repeats).items():
        print(f"| {name} | {REAL[name]['latents'][0]} | {BATCH[name]} | {seconds * 1e3:.2f} |")
    with_std, mean_only = measured["bytes"]["with std"], measured["bytes"]["mean only"]
    print(f"\n## Cache bytes\n\ntiny SD, {measured['pairs']} pairs: {mean_only:,} B mean only, {with_std:,} B with "
          f"stds ({(with_std / mean_only - 1) * 100:+.0f}%)\n")
    print("| model | bytes / pair, mean only | with stds | growth |\n|---|---|---|---|")
    for name, without, with_ in counted_bytes():
        print(f"| {name} | {without / 2**10:,.0f} KiB | {with_ / 2**10:,.0f} KiB | {(with_ / without - 1) * 100:+.0f}% |")


if __name__ == "__main__":
    main()
