"""The report of `sdpo bench online`: offline vs online arms over seeds, a table and a plot.

Per arm, over seeds: reward gain and win rate over the base for each scorer (the world's reward and
the held-out second scorer), the paired difference in gain against offline Diffusion-DPO with its
paired t-test, the quality guard (feature distance to real data) and the wall time.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from sdpo.bench.report import format_interval, format_p_value, seed_summary
from sdpo.stats import paired_test

BASELINE = "offline:diffusion-dpo"
"""The arm every other is paired with (offline Diffusion-DPO is what users run today)."""


def summarize_online(labels: list[str], seeds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """arm label -> figures over seeds (and "base" -> its feature distance and mean rewards)."""
    seeds = sorted(seeds, key=lambda s: s["seed"])
    rewards = list(seeds[0]["evaluation"]["versus_base"])
    baseline = BASELINE if BASELINE in labels else labels[0]
    summary: dict[str, dict[str, Any]] = {}
    for label in labels:
        row: dict[str, Any] = {}
        for reward in rewards:
            versus = [s["evaluation"]["versus_base"][reward] for s in seeds]
            gains = [v[label]["gain"]["value"] for v in versus]
            reference = [v[baseline]["gain"]["value"] for v in versus]
            row[reward] = {"gain": seed_summary(gains), "win_rate": seed_summary([v[label]["win_rate"]["value"] for v in versus]),
                           "per_seed_gain": gains,
                           "versus_baseline": {"against": baseline, "difference": seed_summary(
                               [g - b for g, b in zip(gains, reference, strict=True)]),
                               "p_value": paired_test(gains, reference).p_value}}
        row["feature_distance"] = seed_summary([s["evaluation"]["quality"][label] for s in seeds])
        row["wall_s"] = seed_summary([s["wall_s"][label] for s in seeds])
        summary[label] = row
    summary["base"] = {"feature_distance": seed_summary([s["evaluation"]["quality"]["base"] for s in seeds]),
                       "mean_reward": {r: seed_summary([s["evaluation"]["means"][r]["base"] for s in seeds])
                                       for r in rewards}}
    return summary


def online_table(config: dict[str, Any], summary: dict[str, Any], machine: str) -> str:
    """The README table: one row per arm."""
    rewards = list(summary["base"]["mean_reward"])
    candidates = config["rounds"] * config["samples_per_prompt"] * config["pairs_per_digit"] * 10
    lines = [f"Machine: {machine}; {config['seeds']} seeds; per arm {candidates} generated candidates, "
             f"{config['rounds'] * config['pairs_per_digit'] * 10} pairs, {config['rounds']} x "
             f"{config['steps_per_round']} optimizer steps of {config['batch_size']} pairs, beta "
             f"{config['beta']:g}; {config['eval_per_digit'] * 10} evaluation samples per model and seed. "
             f"Means over seeds with 95% t intervals; 'vs offline DPO' is the paired difference in gain with "
             f"its p-value. Base feature distance {summary['base']['feature_distance']['mean']:.2f}.", "",
             f"| arm | gain ({rewards[0]}) | win rate | vs offline DPO [p] | gain ({rewards[-1]}) | "
             "vs offline DPO [p] | feature distance | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in summary.items():
        if label == "base":
            continue
        first, second = row[rewards[0]], row[rewards[-1]]
        cells = []
        for figures in (first, second):
            versus = figures["versus_baseline"]
            cells.append("—" if versus["against"] == label
                         else f"{format_interval(versus['difference'])} [{format_p_value(versus['p_value'])}]")
        win = first["win_rate"]
        lines.append(f"| {label} | {format_interval(first['gain'])} | {win['mean']:.3f} ± {(win['high'] - win['low']) / 2:.3f} | "
                     f"{cells[0]} | "
                     f"{format_interval(second['gain'])} | {cells[1]} | {row['feature_distance']['mean']:.2f} | "
                     f"{row['wall_s']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def summarize_rounds(rounds: list[dict[str, list[float]]]) -> dict[str, list[dict[str, float]]]:
    """source -> per round, the mean candidate reward over seeds with its interval."""
    return {source: [seed_summary([seed[source][r] for seed in rounds]) for r in range(len(rounds[0][source]))]
            for source in rounds[0]}


def rounds_table(rounds: dict[str, list[dict[str, float]]]) -> str:
    """Mean reward of the candidates each round generated (the data the next training sees)."""
    count = len(next(iter(rounds.values())))
    lines = ["Mean reward of the candidates generated in each round (offline: always the base):", "",
             "| source | " + " | ".join(f"round {r}" for r in range(count)) + " |", "|---" * (count + 1) + "|"]
    # (every arm scores the same candidates per round: round r ends at (r + 1) x that many reward calls)
    for source, values in rounds.items():
        lines.append(f"| {source} | " + " | ".join(format_interval(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def plot_online(summary: dict[str, Any], path: Path) -> Path:
    """Reward gain over base per arm and scorer, with 95% intervals."""
    from sdpo.analysis.plots import pyplot

    plt = pyplot()
    labels = [label for label in summary if label != "base"]
    rewards = list(summary["base"]["mean_reward"])
    fig, axis = plt.subplots(figsize=(1.3 * len(labels) + 2.5, 3.6))
    width = 0.8 / len(rewards)
    for k, reward in enumerate(rewards):
        gains = [summary[label][reward]["gain"] for label in labels]
        axis.bar([i + k * width for i in range(len(labels))], [g["mean"] for g in gains], width,
                 yerr=[(g["high"] - g["low"]) / 2 for g in gains], capsize=3, label=reward)
    axis.set_xticks([i + width * (len(rewards) - 1) / 2 for i in range(len(labels))], labels, fontsize=8)
    axis.axhline(0.0, color="grey", lw=0.8)
    axis.set_ylabel("reward gain over base")
    axis.set_title("offline pairs vs online rounds, same budget")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward_curves(config: dict[str, Any], summary: dict[str, Any], rounds: dict[str, list[dict[str, float]]],
                       path: Path) -> Path:
    """Left: each online arm's candidate reward per round against the reward calls spent so far; right: each
    arm's held-out gain against its wall time (the same reward calls and optimizer steps per arm)."""
    from sdpo.analysis.plots import pyplot

    plt = pyplot()
    per_round = config["samples_per_prompt"] * config["pairs_per_digit"] * 10
    reward = next(iter(summary["base"]["mean_reward"]))
    fig, (calls, wall) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for source, values in rounds.items():
        xs = [(r + 1) * per_round for r in range(len(values))]
        calls.errorbar(xs, [v["mean"] for v in values], yerr=[(v["high"] - v["low"]) / 2 for v in values],
                       marker="o", capsize=3, label=source)
    calls.set_xlabel("reward calls (scored candidates)")
    calls.set_ylabel(f"mean candidate reward ({reward})")
    calls.legend(fontsize=7)
    calls.grid(alpha=0.3)
    for label, row in summary.items():
        if label == "base":
            continue
        gain = row[reward]["gain"]
        wall.errorbar([row["wall_s"]["mean"]], [gain["mean"]], yerr=[(gain["high"] - gain["low"]) / 2],
                      marker="o", capsize=3, label=label)
    wall.set_xlabel("wall time per arm (s)")
    wall.set_ylabel(f"held-out gain over base ({reward})")
    wall.legend(fontsize=7)
    wall.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_online_report(out: Path, config: dict[str, Any], labels: list[str], seeds: list[dict[str, Any]],
                        rounds: list[dict[str, list[float]]]) -> None:
    """results.json, table.md (arms, then candidate rewards by round), online_vs_offline.png and
    reward_curves.png in ``out``."""
    import torch

    from sdpo.files import write_atomic

    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    summary = summarize_online(labels, seeds)
    by_round = summarize_rounds(rounds)
    table = online_table(config, summary, machine) + "\n" + rounds_table(by_round)
    plot_online(summary, out / "online_vs_offline.png")
    plot_reward_curves(config, summary, by_round, out / "reward_curves.png")
    write_atomic(out / "results.json", json.dumps(
        {"config": config, "machine": machine, "summary": summary, "candidate_reward_by_round": by_round,
         "seeds": [f"seed-{s['seed']}/seed.json" for s in seeds]}, indent=1, default=str))
    write_atomic(out / "table.md", table)


__all__ = ["online_table", "plot_reward_curves", "rounds_table", "summarize_online", "summarize_rounds", "write_online_report"]
