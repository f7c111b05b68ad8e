"""Compare Diffusion-DPO, DPO-C&M and SDPO on the embedded digits world over several seeds.

Each seed is a full `sdpo demo --method all` run (its own pairs, training draws and evaluation
noise). Per method the table gives the mean over seeds of the reward gain and the win rate over the
base model, with a 95% interval across seeds (t distribution), and the feature distance to real
digits (the quality guard). Usage:

    python benchmarks/methods.py --seeds 3 --steps 400 --out benchmarks/results/methods
    python benchmarks/methods.py --seeds 2 --steps 300 --learning-rate 3e-3 --out /tmp/lr3e-3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from sdpo.demo import DemoConfig, run_demo
from sdpo.objectives import METHODS

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def across_seeds(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T_975.get(n - 1, 1.96) * sd / math.sqrt(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--learning-rate", type=float, default=DemoConfig.learning_rate)
    parser.add_argument("--out", default="benchmarks/results/methods")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        folder = run_demo(DemoConfig(methods=tuple(args.methods), steps=args.steps, beta=args.beta, seed=seed,
                                     learning_rate=args.learning_rate, out=str(out / f"seed-{seed}"),
                                     progress=False))
        runs.append(json.loads((folder / "results.json").read_text())["results"])
        print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)

    rows = []
    for method in args.methods:
        gains = [run[method]["gain"]["value"] for run in runs]
        wins = [run[method]["win_rate"]["value"] for run in runs]
        fids = [run[method]["fid_like"] for run in runs]
        rows.append({"method": method, "gain": across_seeds(gains), "win_rate": across_seeds(wins),
                     "fid_like": across_seeds(fids), "per_seed_win_rate": wins, "per_seed_gain": gains})
    base_fid = across_seeds([run["base"]["fid_like"] for run in runs])
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"{args.seeds} seeds x {args.steps} steps, learning rate {args.learning_rate:g}; "
        f"{time.perf_counter() - start:.0f} s in all.",
        "",
        "| method | reward gain vs base (mean ± 95% CI over seeds) | win rate vs base | feature distance (base "
        f"{base_fid[0]:.2f}) | win rate per seed |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['gain'][0]:+.3f} ± {row['gain'][1]:.3f} | {row['win_rate'][0]:.3f} ± "
            f"{row['win_rate'][1]:.3f} | {row['fid_like'][0]:.2f} ± {row['fid_like'][1]:.2f} | "
            + ", ".join(f"{w:.3f}" for w in row["per_seed_win_rate"]) + " |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
