"""FLOPs of one LoRA Diffusion-DPO step per published architecture at the paper's sizes, and the MFU they imply.

Each denoiser is built from its published config on the meta device (shapes only: no memory, no
values), given rank-64 LoRA adapters as ``benchmarks.gpu_step`` does, and one step runs through
``sdpo.train.step.preference_step`` under torch's ``FlopCounterMode``: policy forward on both members,
the reference forward (adapters off, no grad), and backward through the policy, counted as they run.
Model FLOPs are without gradient checkpointing; hardware FLOPs with it (the recomputed forward).

With the step times measured on an H200 (docs/results/gpu-step-h200.md, with gradient checkpointing)
and the H200's dense bf16 peak, achieved model TFLOP/s and MFU follow.

    python -m benchmarks.step_flops
    python -m benchmarks.step_flops --models cogvideox-5b
    python -m benchmarks.step_flops --json benchmarks/results/step-flops.json   # read by gpu_step --model-flops
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.architectures import ARCHS, add_lora, build_denoiser, make_batch, make_spec  # noqa: E402
from sdpo.bench.flops import mfu, peak_tflops, preference_step_flops, tflops  # noqa: E402

H200_STEP_S = {"sd15": 0.358, "sdxl": 1.256, "cogvideox-2b": 3.754, "cogvideox-5b": 9.929, "wan2.1-1.3b": 7.231}
"""Median seconds of a LoRA Diffusion-DPO step on one H200, gradient checkpointing on (gpu-step-h200.md)."""
H200_PEAK_TFLOPS = peak_tflops("NVIDIA H200")
"""NVIDIA's dense (no sparsity) bf16 tensor-core peak of the H200 SXM (sdpo.bench.flops)."""


def step_flops(name: str, checkpointing: bool, rank: int = 64) -> int:
    """FLOPs of one preference step (one pair) of ``name`` at its paper size, counted on the meta device."""
    from sdpo.method_presets import method_preset

    arch = ARCHS[name]
    meta = torch.device("meta")
    model = build_denoiser(arch, False, meta, torch.float32)  # FLOPs do not depend on the dtype
    spec = make_spec(arch, model)
    with meta:
        add_lora(spec, model, rank)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    batch = make_batch(arch, False, torch.device("cpu"), torch.float32, 0).to(meta)
    return preference_step_flops(spec, model, batch, method_preset("diffusion-dpo"))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ARCHS), help="comma-separated names from ARCHS")
    parser.add_argument("--json", default=None, help="write the rows here (benchmarks.gpu_step --model-flops reads it)")
    args = parser.parse_args(argv)
    rows = []
    print("| model | model TFLOP / step | hardware TFLOP / step (checkpointing) | H200 s / step | "
          "model TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model_flops, hardware_flops = step_flops(name, False), step_flops(name, True)
        seconds = H200_STEP_S.get(name)
        achieved = tflops(model_flops, seconds) if seconds else None
        utilisation = mfu(model_flops, seconds, H200_PEAK_TFLOPS) if seconds else None
        rows.append({"model": name, "model_tflop": model_flops / 1e12, "hardware_tflop": hardware_flops / 1e12,
                     "h200_s": seconds or float("nan"), "tflops": achieved or float("nan"),
                     "mfu": utilisation if utilisation is not None else float("nan")})
        row = rows[-1]
        print(f"| {name} | {row['model_tflop']:.1f} | {row['hardware_tflop']:.1f} | {row['h200_s']:.3f} | "
              f"{row['tflops']:.0f} | {row['mfu']:.0%} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rank": 64, "method": "diffusion-dpo", "pairs": 1, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
