"""The report of `sdpo bench methods`: per-cell figures over seeds, paired tests, table and plots.

Per (condition, arm), over seeds: reward gain and win rate over the base (the world's reward and the
held-out second scorer), the quality guard, training stability (maximum and variance of the gradient
norm, loss spikes), the share of seeds that end below the base, the masked share and w by timestep
bucket. Each arm is also compared with Diffusion-DPO at the same beta (baselines and variants: at the
default beta), paired by seed: mean difference with its 95% interval and the paired t-test p-value.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

from sdpo.stats import paired_test, seed_interval

SPIKE_FACTOR = 3.0
"""A loss spike: a step whose loss exceeds this multiple of the median of the 20 steps before it."""


def _loss_spikes(history: list[dict[str, Any]]) -> int:
    losses = [row["loss"] for row in history if row.get("loss") is not None]
    return sum(1 for i in range(20, len(losses)) if losses[i] > SPIKE_FACTOR * statistics.median(losses[i - 20:i]))


def _training_figures(history: list[dict[str, Any]]) -> dict[str, Any]:
    norms = [row["grad_norm"] for row in history if row.get("grad_norm") is not None]
    buckets: dict[str, list[float]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith("w_by_t/"):
                buckets.setdefault(key.split("/", 1)[1], []).append(value)
    masked = [row.get("masked_fraction", 0.0) for row in history]
    return {"grad_norm_max": max(norms, default=math.nan),
            "grad_norm_var": statistics.pvariance(norms) if len(norms) > 1 else 0.0,
            "loss_spikes": _loss_spikes(history), "masked_share": sum(masked) / max(len(masked), 1),
            "w_by_t": {key: sum(v) / len(v) for key, v in sorted(buckets.items())}}


def _arm_method(label: str) -> tuple[str, float]:
    name, _, beta = label.rpartition("@")
    return name, float(beta)


def _reference_label(label: str, config: dict[str, Any]) -> str:
    """The Diffusion-DPO run an arm is paired with: same beta for the methods, the default beta otherwise."""
    if label in config.get("versus", {}):  # a method arm: same beta (MaPO: same grid position)
        return str(config["versus"][label])
    name, beta = _arm_method(label)
    return f"diffusion-dpo@{beta:g}" if name in config["methods"] else f"diffusion-dpo@{config['default_beta']:g}"


def seed_summary(values: list[float]) -> dict[str, float]:
    """Mean and 95% interval over seeds as the JSON results store it (mean, low, high, n)."""
    found = seed_interval(values)
    return {"mean": found.mean, "low": found.low, "high": found.high, "n": found.n}


def summarize(config: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """condition -> arm label -> figures over seeds (cells sorted by seed within each condition)."""
    rewards = list(cells[0]["evaluation"]["versus_base"]) if cells else []
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for condition in config["conditions"]:
        seeds = sorted((c for c in cells if c["condition"] == condition), key=lambda c: c["seed"])
        rows: dict[str, dict[str, Any]] = {}
        for label in config["arms"]:
            row: dict[str, Any] = {}
            for reward in rewards:
                gains = [c["evaluation"]["versus_base"][reward][label]["gain"]["value"] for c in seeds]
                wins = [c["evaluation"]["versus_base"][reward][label]["win_rate"]["value"] for c in seeds]
                reference = _reference_label(label, config)
                base_gains = [c["evaluation"]["versus_base"][reward][reference]["gain"]["value"] for c in seeds]
                test = paired_test(gains, base_gains)
                row[reward] = {"gain": seed_summary(gains), "win_rate": seed_summary(wins), "per_seed_gain": gains,
                               "versus_diffusion_dpo": {"against": reference, "difference": seed_summary(
                                   [g - b for g, b in zip(gains, base_gains, strict=True)]), "p_value": test.p_value}}
            row["collapse_share"] = sum(g < 0 for g in row[rewards[0]]["per_seed_gain"]) / len(seeds)
            row["feature_distance"] = seed_summary([c["evaluation"]["quality"][label] for c in seeds])
            figures = [_training_figures(c["histories"][label]) for c in seeds]
            for key in ("grad_norm_max", "grad_norm_var", "loss_spikes", "masked_share"):
                row[key] = seed_summary([f[key] for f in figures])
            row["w_by_t"] = {k: sum(f["w_by_t"].get(k, math.nan) for f in figures) / len(figures)
                             for k in figures[0]["w_by_t"]}
            rows[label] = row
        rows["base"] = {"feature_distance": seed_summary([c["evaluation"]["quality"]["base"] for c in seeds]),
                        "mean_reward": {r: seed_summary([c["evaluation"]["means"][r]["base"] for c in seeds])
                                        for r in rewards}}
        summary[condition] = rows
    return summary


def summarize_long(config: dict[str, Any], long: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """arm label -> step -> reward gain over base (over seeds), for the long-training arm."""
    if not long:
        return {}
    reward = next(iter(long[0]["points"][next(iter(long[0]["points"]))]["versus_base"]))
    curves: dict[str, dict[str, Any]] = {}
    for step in long[0]["points"]:
        for label in long[0]["points"][step]["versus_base"][reward]:
            gains = [run["points"][step]["versus_base"][reward][label]["gain"]["value"] for run in long]
            curves.setdefault(label, {})[step] = seed_summary(gains)
    return curves


def format_interval(interval: dict[str, float], digits: int = 3) -> str:
    """A ``seed_summary`` as a table cell: "+mean ± half-width" (the mean alone for one seed)."""
    if interval["n"] < 2:  # one seed has no interval
        return f"{interval['mean']:+.{digits}f}"
    half = (interval["high"] - interval["low"]) / 2
    return f"{interval['mean']:+.{digits}f} ± {half:.{digits}f}"


def format_p_value(value: float) -> str:
    """A p-value as a table cell ("—" where there is none)."""
    return "—" if math.isnan(value) else (f"{value:.3f}" if value >= 0.001 else "<0.001")


def markdown_table(config: dict[str, Any], summary: dict[str, Any], long: dict[str, Any], wall_s: float) -> str:
    """The README table: one block per condition, one row per arm."""
    lines = [f"Machine: {platform.machine()} CPU, {config['threads']} threads; {config['seeds']} seeds x "
             f"{config['steps']} steps per arm, {config['pairs_per_digit'] * 10} pairs, "
             f"{config['eval_per_digit'] * 10} evaluation samples per model and seed; {wall_s / 60:.1f} min of "
             "cell work in all (base-model pretraining not counted).",
             "Gains and win rates are means over seeds with 95% t intervals; 'vs DPO' is the paired difference "
             "in reward gain against Diffusion-DPO at the same beta (MaPO: at the beta in the same position of "
             "the grid), with the paired t-test p-value.", ""]
    for condition, rows in summary.items():
        rewards = list(rows["base"]["mean_reward"])
        lines += [f"**{condition}** (base feature distance {rows['base']['feature_distance']['mean']:.2f})", "",
                  f"| arm | gain ({rewards[0]}) | win rate | vs DPO [p] | gain ({rewards[-1]}) | vs DPO [p] | "
                  "feature distance | max grad norm | below base | masked |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, row in rows.items():
            if label == "base":
                continue
            first, second = row[rewards[0]], row[rewards[-1]]
            versus = first["versus_diffusion_dpo"]
            versus2 = second["versus_diffusion_dpo"]
            same = versus["against"] == label
            lines.append(
                f"| {label} | {format_interval(first['gain'])} | {first['win_rate']['mean']:.3f} | "
                + ("—" if same else f"{format_interval(versus['difference'])} [{format_p_value(versus['p_value'])}]")
                + f" | {format_interval(second['gain'])} | "
                + ("—" if same else f"{format_interval(versus2['difference'])} [{format_p_value(versus2['p_value'])}]")
                + f" | {row['feature_distance']['mean']:.2f} | {row['grad_norm_max']['mean']:.3g} | "
                f"{row['collapse_share']:.0%} | {row['masked_share']['mean']:.2f} |")
        lines.append("")
    if long:
        steps = list(next(iter(long.values())))
        lines += [f"**long training** ({config['long_condition']}, {config['long_seeds']} seeds, reward gain "
                  "over base by step)", "", "| arm | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for label, curve in long.items():
            lines.append(f"| {label} | " + " | ".join(format_interval(curve[s]) for s in steps) + " |")
    return "\n".join(lines) + "\n"


def plot_reward_vs_beta(config: dict[str, Any], summary: dict[str, Any], path: Path) -> Path:
    """Reward gain against beta per method, one panel per condition; baselines as single markers."""
    from sdpo.analysis.plots import pyplot

    plt = pyplot()
    conditions = list(summary)
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.5 * len(conditions), 3.6), squeeze=False)
    for axis, condition in zip(axes[0], conditions, strict=True):
        rows = summary[condition]
        reward = next(iter(rows["base"]["mean_reward"]))
        for method in config["methods"]:
            # MaPO's own grid is drawn at the Diffusion-DPO betas it is compared with.
            grid = config.get("mapo_betas", config["betas"]) if method == "mapo" else config["betas"]
            points = [(b, rows[f"{method}@{own:g}"][reward]["gain"]) for b, own in zip(config["betas"], grid,
                                                                                       strict=True)]
            name = method if method != "mapo" else f"mapo (beta {'/'.join(f'{b:g}' for b in grid)})"
            axis.errorbar([b for b, _ in points], [g["mean"] for _, g in points],
                          yerr=[(g["high"] - g["low"]) / 2 for _, g in points], marker="o", capsize=3, label=name)
        for label, row in rows.items():
            name, beta = ("", 0.0) if label == "base" else _arm_method(label)
            if label != "base" and name not in config["methods"]:
                gain = row[reward]["gain"]
                axis.errorbar([beta], [gain["mean"]], yerr=[(gain["high"] - gain["low"]) / 2], marker="s",
                              linestyle="none", capsize=3, label=name)
        axis.axhline(0.0, color="grey", lw=0.8)
        axis.set_xscale("log")
        axis.set_xlabel("beta")
        axis.set_ylabel(f"reward gain over base ({reward})")
        axis.set_title(condition)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_long(long: dict[str, Any], path: Path, title: str) -> Path:
    """Reward gain over training steps, one line per method."""
    from sdpo.analysis.plots import pyplot

    plt = pyplot()
    fig, axis = plt.subplots(figsize=(5.5, 3.6))
    for label, curve in long.items():
        steps = [int(s) for s in curve]
        axis.errorbar(steps, [curve[s]["mean"] for s in curve],
                      yerr=[(curve[s]["high"] - curve[s]["low"]) / 2 for s in curve], marker="o", capsize=3,
                      label=label)
    axis.axhline(0.0, color="grey", lw=0.8)
    axis.set_xlabel("training step")
    axis.set_ylabel("reward gain over base")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, config: dict[str, Any], cells: list[dict[str, Any]], long: list[dict[str, Any]],
                 wall_s: float) -> None:
    """results.json, table.md, reward_vs_beta.png and (with a long arm) reward_over_steps.png in ``out``;
    ``config`` is the sweep's settings as JSON-ready data (``sdpo.bench.methods.config_dict``)."""
    import torch

    from sdpo.files import write_atomic

    settings = {**config, "threads": torch.get_num_threads()}
    summary = summarize(settings, cells)
    curves = summarize_long(settings, long)
    table = markdown_table(settings, summary, curves, wall_s)
    plot_reward_vs_beta(settings, summary, out / "reward_vs_beta.png")
    if curves:
        plot_long(curves, out / "reward_over_steps.png", f"long training, {settings['long_condition']}")
    write_atomic(out / "results.json", json.dumps(
        {"config": settings, "machine": platform.platform(), "wall_s": wall_s, "summary": summary,
         "long": curves,  # each cell's evaluation and training history stay in cells/<condition>/seed-<s>/cell.json
         "cells": [f"cells/{c['condition']}/seed-{c['seed']}/cell.json" for c in cells]},
        indent=1, default=str))
    write_atomic(out / "table.md", table)


__all__ = ["markdown_table", "summarize", "write_report"]
