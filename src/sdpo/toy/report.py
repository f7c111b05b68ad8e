"""The demo's markdown report: the comparison table, training curves, weight profile, sample grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdpo.analysis.plots import plot_training_curves, plot_weight_profile
from sdpo.analysis.weights import weight_profile
from sdpo.data import collate_pairs
from sdpo.toy.grids import media_grid


def digit_grid(samples: torch.Tensor, per_digit: int, path: Path) -> None:
    """Write a PNG of the first samples of each digit (samples digit-major): 8 images or 2 clips a digit."""
    shown = min(2 if samples.ndim == 5 else 8, per_digit)
    rows = samples.reshape(10, per_digit, *samples.shape[1:])[:, :shown]
    media_grid(rows.reshape(-1, *samples.shape[1:]), nrow=shown).save(path)


def write_report(
    folder: Path,
    config: Any,
    world: Any,
    results: dict[str, dict],
    histories: dict[str, list[dict]],
    samples: dict[str, torch.Tensor],
    prompts: list[str],
    spec: Any,
    dataset: Any,
    timings: dict[str, float],
) -> Path:
    """Write report.md and its PNG figures into ``folder``."""
    per_digit = len(prompts) // 10
    for name in ("base", *histories):
        digit_grid(samples[name], per_digit, folder / f"samples_{name}.png")
    plot_training_curves(histories, folder / "training_curves.png")

    batch = collate_pairs([dataset[i] for i in range(min(len(dataset), 256))])
    grid = torch.arange(0, spec.schedule.num_timesteps, spec.schedule.num_timesteps // 25)
    profile = weight_profile(spec, spec.denoiser, batch, grid, config.num_inference_steps, seed=config.seed)
    plot_weight_profile(profile, folder / "weight_profile.png", f"base model, demo pairs (K = {config.num_inference_steps})")

    lines = [
        "# sdpo demo report",
        "",
        f"Base model: the embedded {world.name} digits world. Pairs: {len(dataset)} (best vs worst of "
        f"{config.samples_per_prompt} samples). Training: {config.steps} steps, batch {config.batch_size}, "
        f"LoRA rank {config.lora_rank}, lr {config.learning_rate}. Evaluation: {len(prompts)} held-out seeds "
        f"({per_digit} per digit), base and tuned sampled from identical initial noise.",
        "",
        "| model | mean reward | reward gain vs base [95% CI] | win rate vs base [95% CI] | ties | feature distance to real |",
        "|---|---|---|---|---|---|",
        f"| base | {results['base']['mean_reward']:.3f} | | | | {results['base']['fid_like']:.2f} |",
    ]
    for method in histories:
        r = results[method]
        gain, win = r["gain"], r["win_rate"]
        lines.append(
            f"| {method} | {r['tuned_mean']:.3f} | {gain['value']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] "
            f"| {win['value']:.3f} [{win['low']:.3f}, {win['high']:.3f}] | {r['ties']:.3f} | {r['fid_like']:.2f} |"
        )
    lines += [
        "",
        "Feature distance: Fréchet distance between Gaussian fits of classifier features of the samples and of "
        "the held-out real digits (lower is closer to real data); it guards against reward hacking and collapse.",
        "",
        "## Training curves",
        "",
        "![training curves](training_curves.png)",
        "",
        "## Importance weights of the base model",
        "",
        "Mean w(t) = p_theta(x_s|x_t) / q(x_s|x_t,x_0) (expected estimator) on the demo's chosen and rejected samples.",
        "",
        "![weight profile](weight_profile.png)",
        "",
        "## Samples (digits 0-9 in order; same seeds in every grid)",
        "",
        "base:",
        "",
        "![base](samples_base.png)",
        "",
    ]
    for method in histories:
        lines += [f"{method}:", "", f"![{method}](samples_{method}.png)", ""]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    lines += ["", "Evaluation samples with prompts and seeds: `eval_samples.safetensors`; all figures: `results.json`."]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
