"""Compare the methods with each other, not only with the base, from finished demo runs.

Every demo run folder (`sdpo demo --out DIR`) saves its evaluation
samples: every model sampled from the same noise and prompts. This script re-scores them with the
world's reward and compares each pair of methods sample by sample:
- the share of samples where A scores higher than B (ties count half), with a Wilson interval;
- the mean reward difference, with a normal interval.

Samples of several runs (seeds) are pooled. The intervals therefore cover the evaluation noise, not
the variation between training seeds; the per-run columns show that variation.

    python -m benchmarks.head_to_head RUN_FOLDER [RUN_FOLDER ...]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from sdpo.rewards import Reward
from sdpo.stages.evaluate import EVAL_SAMPLES_FILE, load_eval_samples
from sdpo.stages.evaluate import head_to_head as compare_all
from sdpo.toy.world import get_world


def run_scores(folder: Path, reward: Reward) -> dict[str, torch.Tensor]:
    """Reward of every model's evaluation samples in one demo run folder."""
    prompts, _, samples = load_eval_samples(folder)
    return {name: reward.score(images, prompts) for name, images in samples.items()}


def head_to_head(folders: list[Path], world: str = "image") -> str:
    """A markdown table: every pair of models present in all ``folders``, pooled and per run."""
    reward = get_world(world).reward()
    runs = [run_scores(folder, reward) for folder in folders]
    models = [name for name in runs[0] if all(name in run for run in runs)]
    lines = [
        f"{len(folders)} run(s), {sum(len(run[models[0]]) for run in runs)} paired samples per comparison.",
        "",
        "| A vs B | A wins (pooled, 95% CI) | reward A - B (pooled, 95% CI) | A wins, per run |",
        "|---|---|---|---|",
    ]
    # The library's head_to_head puts the later model first ("A vs B", A later); this table has
    # always put the earlier one first, so it is handed the models in reverse.
    backwards = models[::-1]
    pooled_all = compare_all({name: torch.cat([run[name] for run in runs]) for name in backwards})
    per_run_all = [compare_all({name: run[name] for name in backwards}) for run in runs]
    for a, b in itertools.combinations(models, 2):
        pair = f"{a} vs {b}"
        pooled, per_run = pooled_all[pair], [table[pair].win_rate.value for table in per_run_all]
        lines.append(f"| {pair} | {pooled.win_rate} | {pooled.gain.value:+.3f} "
                     f"[{pooled.gain.low:+.3f}, {pooled.gain.high:+.3f}] | "
                     + ", ".join(f"{w:.3f}" for w in per_run) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="demo run folders (each with eval_samples.safetensors)")
    parser.add_argument("--world", default="image", choices=["image", "video"])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    missing = [str(f) for f in args.folders if not (f / EVAL_SAMPLES_FILE).is_file()]
    if missing:
        parser.error(f"no {EVAL_SAMPLES_FILE} in: {', '.join(missing)}")
    table = head_to_head(args.folders, args.world)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
