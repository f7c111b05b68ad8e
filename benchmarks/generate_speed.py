"""Candidates per second through `sdpo.stages.generate.generate` against the family's diffusers pipeline
called directly on the same inputs (same prompts, same initial noise, same batches): the ratio is
what the stage adds (noise drawing, PNG/MP4 and exact-pixel files, the candidates file).

    python -m benchmarks.generate_speed                       # tiny SD and Wan pipelines, CPU
    python -m benchmarks.generate_speed --family cogvideox --pretrained DIR --height 480 --width 720 \\
        --frames 49 --steps 50 --dtype bf16 --per-prompt 1 --prompts 2 --batch-size 1   # a GPU
    (a full-size CogVideoX-2B folder with random weights: python -m benchmarks.full_pipeline DIR)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sdpo.models.base import MediaFormat
from sdpo.models.registry import load_spec
from sdpo.seeding import derive_seed
from sdpo.stages.generate import SamplerSettings, generate, plan_batches


def direct(spec, prompts: list[str], per_prompt: int, batch_size: int, seed: int, sampler: SamplerSettings) -> None:
    """The pipeline alone on generate's batches and noise."""
    pipe = spec.pipeline()
    for batch in plan_batches(prompts, per_prompt, batch_size):
        seeds = [derive_seed(seed, p, k) for p, k in batch]
        latents = torch.cat([spec.initial_latents(1, s) for s in seeds])
        with torch.no_grad():
            pipe(prompt=[prompts[p] for p, _ in batch], latents=spec.pipeline_latents(latents, spec.denoiser),
                 num_inference_steps=sampler.num_inference_steps, guidance_scale=sampler.guidance_scale,
                 generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt",
                 **spec.sample_kwargs())
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(spec, prompts: list[str], args: argparse.Namespace) -> dict[str, float]:
    timed = SamplerSettings(args.steps, args.guidance)
    count = len(prompts) * args.per_prompt
    times = {"direct": [], "generate": []}
    for repeat in range(args.repeats + 1):  # the first round warms up, with --warmup-steps sampler steps
        sampler = timed if repeat or not args.warmup_steps else SamplerSettings(args.warmup_steps, args.guidance)
        clock = time.perf_counter()
        direct(spec, prompts, args.per_prompt, args.batch_size, 0, sampler)
        direct_s = time.perf_counter() - clock
        with tempfile.TemporaryDirectory() as folder:
            clock = time.perf_counter()
            generate(spec, prompts, Path(folder) / "out", per_prompt=args.per_prompt, seed=0, sampler=sampler,
                     batch_size=args.batch_size, progress=False)
            generate_s = time.perf_counter() - clock
        if repeat:
            times["direct"].append(direct_s)
            times["generate"].append(generate_s)
    best = {key: min(values) for key, values in times.items()}
    # Each round times both arms back to back: the median of the rounds' own ratios cancels the drift of
    # a shared machine's speed that a ratio of two bests taken in different rounds keeps.
    paired = statistics.median(g / d for g, d in zip(times["generate"], times["direct"], strict=True))
    return {"candidates": count, "direct_per_s": count / best["direct"], "generate_per_s": count / best["generate"],
            "ratio": paired, "ratio_of_bests": best["generate"] / best["direct"]}


def tiny_cases(root: Path) -> list[tuple[str, Path, MediaFormat]]:
    from sdpo.models import tiny

    return [("sd", tiny.build_tiny_sd(root / "sd"), MediaFormat(height=16, width=16)),
            ("wan", tiny.build_tiny_wan(root / "wan"), MediaFormat(height=32, width=32, frames=5))]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=None)
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="sampler steps of the untimed warm-up round (default: --steps)")
    parser.add_argument("--json", default=None, help="append each result here as a JSON line")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = [f"prompt number {i}, a small red cube on a table" for i in range(args.prompts)]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as root:
        if args.family:
            fmt = MediaFormat(height=args.height, width=args.width, frames=args.frames) if args.height else None
            cases = [(args.family, Path(args.pretrained), fmt)]
        else:
            cases = tiny_cases(Path(root))
        results: list[dict[str, Any]] = []
        for family, folder, fmt in cases:
            spec = load_spec(family, folder, media_format=fmt, torch_dtype=dtype)
            for value in vars(spec).values():
                if isinstance(value, torch.nn.Module):
                    value.to(device)
            result = measure(spec, prompts, args)
            print(f"{family} {spec.media_format} on {device}: {result['candidates']} candidates, "
                  f"direct {result['direct_per_s']:.2f}/s, generate {result['generate_per_s']:.2f}/s, "
                  f"ratio {result['ratio']:.3f} (median of rounds; of the bests {result['ratio_of_bests']:.3f})", flush=True)
            results.append({"family": family, "media": str(spec.media_format), "device": device,
                            "steps": args.steps, **result})
            if args.json:
                with open(args.json, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(results[-1]) + "\n")
    return results


if __name__ == "__main__":
    main()
