"""Figures for reports: training curves and importance-weight profiles (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdpo.analysis.weights import WeightProfile

CURVES = (
    ("loss", "loss"),
    ("accuracy", "implicit accuracy"),
    ("reward_margin", "reward margin (mean z / beta)"),
    ("weight_mean", "mean objective weight W"),
)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """One panel per logged quantity, one line per run (keyed by its label)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for axis, (key, title) in zip(axes, CURVES, strict=True):
        for label, rows in histories.items():
            points = [(row["step"], row[key]) for row in rows if key in row]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weight_profile(profile: WeightProfile, path: str | Path, title: str = "") -> Path:
    """Mean importance weight w(t) of chosen and rejected samples along the trajectory."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(5.5, 3.5))
    axis.plot(profile.timesteps.tolist(), profile.chosen.tolist(), marker="o", ms=3, label="chosen")
    axis.plot(profile.timesteps.tolist(), profile.rejected.tolist(), marker="o", ms=3, label="rejected")
    axis.axhline(0.9, color="grey", ls="--", lw=0.8, label="mask threshold 0.9")
    axis.set_xlabel("timestep t (0 = clean)")
    axis.set_ylabel("mean w(t)")
    axis.set_ylim(-0.02, 1.05)
    axis.set_title(title or "step-wise importance weight")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
