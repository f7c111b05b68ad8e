"""What writing viewable clips costs `sdpo generate` in the video world: the same candidates (same
prompts, seeds and batches as the demo's generate stage) written three ways, beside sampling them and
writing nothing, rounds interleaved after a warm-up round: the best time of each arm, and the median
of the rounds' own ratios to writing nothing:

* ``none``: the sampler alone on the same batches and noise (no files: the denominator);
* ``frames``: PNG frame folders only (``--frame-folders --no-mp4``: the demo's and the benches' way);
* ``mp4``: one H.264 MP4 per clip, encoded in process (the default);
* ``mp4+frames``: both (``--frame-folders``).

    python -m benchmarks.video_media_cost                  # 40 prompts x 4 candidates, the demo's 25 steps
    python -m benchmarks.video_media_cost --per-digit 32   # the demo's 1,280 candidates
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

ARMS = {"frames": {"frame_folders": True, "mp4": False},
        "mp4": {"frame_folders": False, "mp4": True},
        "mp4+frames": {"frame_folders": True, "mp4": True}}


def measure(per_digit: int, per_prompt: int, steps: int, repeats: int, batch_size: int) -> dict[str, Any]:
    import torch

    from sdpo.models.registry import load_spec
    from sdpo.seeding import derive_seed
    from sdpo.stages.generate import SamplerSettings, generate, plan_batches, sample_with_seeds
    from sdpo.toy.world import get_world

    world = get_world("video")
    spec = load_spec(world.family, world.pretrain(progress=False))
    prompts = world.prompts(per_digit)
    sampler = SamplerSettings(steps, world.guidance_scale)

    def sample_only() -> None:
        for items in plan_batches(prompts, per_prompt, batch_size):
            seeds = [derive_seed(0, p, k) for p, k in items]
            latents = torch.cat([spec.initial_latents(1, seed) for seed in seeds])
            sample_with_seeds(spec, [prompts[p] for p, _ in items], latents, seeds, sampler)

    times: dict[str, list[float]] = {arm: [] for arm in ("none", *ARMS)}
    for repeat in range(repeats + 1):  # round 0 warms up
        clock = time.perf_counter()
        sample_only()
        if repeat:
            times["none"].append(time.perf_counter() - clock)
        for arm, media in ARMS.items():
            with tempfile.TemporaryDirectory() as folder:
                clock = time.perf_counter()
                generate(spec, prompts, Path(folder) / "out", per_prompt=per_prompt, seed=0, sampler=sampler,
                         batch_size=batch_size, progress=False, **media)
                if repeat:
                    times[arm].append(time.perf_counter() - clock)
    best = {arm: min(values) for arm, values in times.items()}
    # The median of each round's own ratio: rounds run the arms back to back, so a shared machine's
    # drift in speed cancels.
    paired = {arm: statistics.median(a / n for a, n in zip(times[arm], times["none"], strict=True)) for arm in times}
    return {"candidates": len(prompts) * per_prompt, "steps": steps, "seconds": best, "ratio_vs_none": paired}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-digit", type=int, default=4, help="prompts per digit (10 digits)")
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (the demo's default)")
    parser.add_argument("--batch-size", type=int, default=512, help="the demo's generate batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args.per_digit, args.per_prompt, args.steps, args.repeats, args.batch_size)
    for arm, seconds in result["seconds"].items():
        print(f"{arm:>11}: {result['candidates']} candidates in {seconds:.2f} s, "
              f"{result['ratio_vs_none'][arm]:.3f}x writing nothing", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
