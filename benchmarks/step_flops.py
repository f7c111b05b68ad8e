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
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.architectures import ARCHS, add_lora, build_denoiser, make_batch, make_spec  # noqa: E402

H200_STEP_S = {"sd15": 0.358, "sdxl": 1.256, "cogvideox-2b": 3.754, "cogvideox-5b": 9.929, "wan2.1-1.3b": 7.231}
"""Median seconds of a LoRA Diffusion-DPO step on one H200, gradient checkpointing on (gpu-step-h200.md)."""
H200_PEAK_TFLOPS = 989.0
"""NVIDIA's dense (no sparsity) bf16 tensor-core peak of the H200 SXM, as of the H100 SXM."""


def step_flops(name: str, checkpointing: bool, rank: int = 64) -> int:
    """FLOPs of one preference step (one pair) of ``name`` at its paper size, counted on the meta device."""
    from sdpo.method_presets import method_preset
    from sdpo.train.step import adapters_disabled, draw_for_pairs, preference_step

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
    draws = draw_for_pairs(torch.arange(1), 0, 0, tuple(batch.chosen.shape[1:]), spec.schedule.num_timesteps,
                           with_weight_noise=False)
    counter = FlopCounterMode(display=False)
    with counter:
        result = preference_step(spec, model, batch, draws, method_preset("diffusion-dpo"),
                                 lambda: adapters_disabled(model))
        result.output.loss.backward()
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ARCHS), help="comma-separated names from ARCHS")
    args = parser.parse_args(argv)
    rows = []
    print("| model | model TFLOP / step | hardware TFLOP / step (checkpointing) | H200 s / step | "
          "model TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model_flops, hardware_flops = step_flops(name, False), step_flops(name, True)
        seconds = H200_STEP_S.get(name)
        achieved = model_flops / seconds / 1e12 if seconds else None
        rows.append({"model": name, "model_tflop": model_flops / 1e12, "hardware_tflop": hardware_flops / 1e12,
                     "h200_s": seconds or float("nan"), "tflops": achieved or float("nan"),
                     "mfu": achieved / H200_PEAK_TFLOPS if achieved else float("nan")})
        row = rows[-1]
        print(f"| {name} | {row['model_tflop']:.1f} | {row['hardware_tflop']:.1f} | {row['h200_s']:.3f} | "
              f"{row['tflops']:.0f} | {row['mfu']:.0%} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
