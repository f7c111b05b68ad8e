"""`sdpo analyze weights`: the paper's w(t) diagnostic for a model, on a cache of pairs and on fresh samples.

For the base model and, given a training run, the tuned one, and for each K asked for, the profile
of w(t) (mean and spread per grid timestep) is computed on:

* the pairs of a precompute cache, chosen and rejected apart (whoever generated them), and
* fresh samples of that model itself (on-policy by construction), when prompts are given.

Everything goes into ``results.json``, ``table.md`` and ``weight_profiles.png`` under ``out``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdpo.errors import InputError


@dataclass
class WeightAnalysis:
    """Where the analysis was written and the profiles it holds."""

    out: Path
    """Folder of results.json, table.md and weight_profiles.png."""
    profiles: dict[str, dict[str, Any]]
    """Label ("base, cache chosen, K=25") -> {"t", "mean", "std"} lists."""


def _cache_batch(cache: str | Path, max_pairs: int) -> Any:
    from sdpo.data import CachedPairs, collate_pairs

    dataset = CachedPairs(cache)
    # A bucketed cache's buckets have different shapes: the first pair's bucket alone stacks into a batch.
    ids = dataset.bucket_ids()
    same = (ids == ids[0]).nonzero()[:, 0][:max_pairs]
    return collate_pairs([dataset[int(i)] for i in same])


def _fresh_latents(spec: Any, prompts: list[str], steps: int, guidance: float, seed: int) -> tuple[Any, Any]:
    """Encoded samples of the spec's current model (adapters as loaded) and their prompts' conditions."""
    with torch.no_grad():
        pixels = spec.sample(prompts, spec.initial_latents(len(prompts), seed), num_inference_steps=steps,
                             guidance_scale=guidance)
        return spec.encode_media(pixels).float(), spec.encode_prompts(prompts)


def _profiles_of(spec: Any, model_name: str, batch: Any, fresh: Any, grid: Any, ks: list[int],
                 seed: int, device: torch.device) -> dict[str, dict[str, Any]]:
    from sdpo.analysis.weights import member_profile

    sets = {}
    if batch is not None:
        conditions = {key: value.to(device) for key, value in batch.conditions.items()}
        sets["cache chosen"] = (batch.chosen.to(device), conditions)
        sets["cache rejected"] = (batch.rejected.to(device), conditions)
    if fresh is not None:
        latents, conditions = fresh
        sets["fresh samples"] = (latents.to(device), {key: value.to(device) for key, value in conditions.items()})
    found = {}
    for k in ks:
        for source, (x0, conditions) in sets.items():
            profile = member_profile(spec, spec.denoiser, x0, conditions, grid, k, seed)
            found[f"{model_name}, {source}, K={k}"] = {"t": grid.tolist(), "mean": profile.mean.tolist(),
                                                       "std": profile.std.tolist(), "samples": int(x0.shape[0])}
    return found


def analyze_weights(
    spec: Any,
    out: str | Path,
    *,
    cache: str | Path | None = None,
    prompts: list[str] | None = None,
    lora: str | Path | None = None,
    ks: tuple[int, ...] = (50,),
    grid_points: int = 20,
    max_pairs: int = 256,
    sampler_steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> WeightAnalysis:
    """Profiles of the base model (and of the ``lora`` run loaded on it) on ``cache`` and/or fresh samples."""
    if cache is None and not prompts:
        raise InputError("analyze weights needs a cache of pairs (--cache) or prompts for fresh samples (--prompts)")
    if grid_points < 2:
        raise InputError(f"grid points must be at least 2, got {grid_points}")
    if any(k < 1 for k in ks):
        raise InputError(f"K must be at least 1, got {list(ks)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(spec.denoiser.parameters()).device
    steps = spec.schedule.num_timesteps
    grid = torch.linspace(0, steps - 1, grid_points).round().long().unique()
    batch = _cache_batch(cache, max_pairs) if cache is not None else None
    models = [("base", None)] + ([("tuned", lora)] if lora else [])
    profiles: dict[str, dict[str, Any]] = {}
    spec.denoiser.eval()
    for name, folder in models:
        if folder is not None:
            spec.load_lora(folder)
        fresh = _fresh_latents(spec, prompts, sampler_steps, guidance_scale, seed) if prompts else None
        profiles.update(_profiles_of(spec, name, batch, fresh, grid, list(ks), seed, device))
    setting = {"cache": str(cache) if cache else None, "lora": str(lora) if lora else None, "ks": list(ks),
               "pairs": int(batch.chosen.shape[0]) if batch is not None else 0, "fresh": len(prompts or []),
               "sampler_steps": sampler_steps, "num_timesteps": steps}
    (out / "results.json").write_text(json.dumps({"setting": setting, "profiles": profiles}, indent=1))
    (out / "table.md").write_text(markdown_table(profiles, setting))
    plot_profiles(profiles, out / "weight_profiles.png", steps)
    return WeightAnalysis(out, profiles)


def markdown_table(profiles: dict[str, dict[str, Any]], setting: dict[str, Any]) -> str:
    """One row per grid timestep, one "mean ± std" column per profile."""
    labels = list(profiles)
    lines = [f"w(t) mean ± std over samples; cache {setting['cache'] or '—'} ({setting['pairs']} pairs), "
             f"{setting['fresh']} fresh samples, K = {', '.join(map(str, setting['ks']))}.", "",
             "| t | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    grid = profiles[labels[0]]["t"]
    for row, t in enumerate(grid):
        cells = " | ".join(f"{profiles[label]['mean'][row]:.3f} ± {profiles[label]['std'][row]:.3f}" for label in labels)
        lines.append(f"| {t} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_profiles(profiles: dict[str, dict[str, Any]], path: Path, num_timesteps: int) -> Path:
    """One panel per K: mean w(t) per source (colour) and model (solid base, dashed tuned), one-std bands."""
    from sdpo.analysis.plots import pyplot

    plt = pyplot()
    parsed = [(label, *label.rsplit(", ", 2)) for label in profiles]  # (label, model, source, "K=k")
    ks = list(dict.fromkeys(k for *_, k in parsed))
    sources = list(dict.fromkeys(source for _, _, source, _ in parsed))
    colours = dict(zip(sources, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), squeeze=False, sharey=True)
    for axis, k in zip(axes[0], ks, strict=True):
        for label, model, source, label_k in parsed:
            if label_k != k:
                continue
            profile = profiles[label]
            t, mean, std = profile["t"], profile["mean"], profile["std"]
            axis.plot(t, mean, color=colours.get(source), ls="-" if model == "base" else "--", marker="o", ms=2,
                      lw=1.2, label=f"{model}, {source}")
            axis.fill_between(t, [m - s for m, s in zip(mean, std, strict=True)],
                              [m + s for m, s in zip(mean, std, strict=True)], color=colours.get(source), alpha=0.08)
        axis.set_title(k)
        axis.set_xlim(0, num_timesteps - 1)
        axis.set_ylim(-0.02, 1.05)
        axis.set_xlabel("timestep t (0 = clean)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("w(t), mean and one std")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
