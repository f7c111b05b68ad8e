"""`sdpo evaluate`: the base model and tuned runs (LoRA folders) on the same prompts and identical noise.

For every reward: each model's mean, its gain over the base (95% normal interval over the paired
samples) and its win rate over the base (Wilson 95% interval, ties count half), plus head-to-head
win rates between every two models. Written to ``out``: ``results.json``, ``report.md``, a sample
grid per model (``grid-<model>.png``; videos: a contact sheet of frames plus one MP4 per sample
of the first prompts) and ``eval_samples.safetensors``.

``eval_samples.safetensors`` (the format the demo writes): one float tensor per model name (the
samples in [-1, 1], images (N, C, H, W) or videos (N, F, C, H, W)), the tensor ``noise`` (the
shared initial noise), and metadata ``prompts`` (JSON list, one per sample), ``seed`` and ``layout``.
Any outside scorer can re-score it (:func:`load_eval_samples`).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sdpo.errors import InputError
from sdpo.files import atomic_output, named_for, write_atomic
from sdpo.models.base import unwrap
from sdpo.models.lora_check import load_lora_checked
from sdpo.rewards.base import Reward
from sdpo.stages.generate import SamplerSettings, sample_with_seeds, write_media
from sdpo.stats import Comparison, compare
from sdpo.train.model_card import record_evaluation

EVAL_SAMPLES_FILE = "eval_samples.safetensors"
"""Evaluation samples of a run: one tensor per model, the shared noise, and the prompts in the metadata."""


def save_eval_samples(path: str | Path, samples: dict[str, Tensor], noise: Tensor, prompts: list[str],
                      seed: int, extra: dict[str, str] | None = None) -> Path:
    """Write the evaluation export (see the module docstring), atomically."""
    path = Path(path)
    tensors = {name: value.contiguous() for name, value in samples.items()}
    tensors["noise"] = noise.contiguous()
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata={
            "prompts": json.dumps(prompts), "seed": str(seed), **(extra or {}),
            "layout": "samples in [-1, 1] as the sampler returns them; noise is the shared initial noise"})
    return path


def load_eval_samples(run_folder: str | Path) -> tuple[list[str], Tensor, dict[str, Tensor]]:
    """(prompts, shared noise, samples by model name) of an evaluation (or demo) folder."""
    with safe_open(str(Path(run_folder) / EVAL_SAMPLES_FILE), "pt") as handle:
        prompts = json.loads(handle.metadata()["prompts"])
        samples = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return prompts, samples.pop("noise"), samples


@dataclass
class EvaluationResult:
    """What ``evaluate`` measured."""

    out: Path
    models: list[str]
    """"base" then the run names."""
    means: dict[str, dict[str, float]]
    """reward -> model -> mean score."""
    versus_base: dict[str, dict[str, Comparison]]
    """reward -> run -> comparison with the base."""
    head_to_head: dict[str, dict[str, Comparison]] = field(default_factory=dict)
    """reward -> "A vs B" -> comparison (A as the tuned side) for every two models."""
    quality: dict[str, float] = field(default_factory=dict)
    """model -> quality guard value (when a guard was given)."""
    sample_scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """reward -> model -> the score of each sample (results.json's ``sample_scores``; ``sdpo rate`` compares
    people's choices with them)."""

    def as_dict(self) -> dict[str, Any]:
        return {"models": self.models, "means": self.means,
                "versus_base": {r: {m: c.as_dict() for m, c in v.items()} for r, v in self.versus_base.items()},
                "head_to_head": {r: {m: c.as_dict() for m, c in v.items()} for r, v in self.head_to_head.items()},
                "quality": self.quality}


def head_to_head(scores: dict[str, Tensor]) -> dict[str, Comparison]:
    """Every two models: "A vs B" -> the comparison of A (the later model, as the tuned side) against B."""
    return {f"{a} vs {b}": compare(scores[b], scores[a]) for b, a in itertools.combinations(scores, 2)}


def _sample_all(spec: Any, prompts: list[str], noise: Tensor, seeds: list[int], sampler: SamplerSettings,
                batch_size: int, progress: bool) -> Tensor:
    out = []
    for start in range(0, len(prompts), batch_size):
        out.append(sample_with_seeds(spec, prompts[start:start + batch_size], noise[start:start + batch_size],
                                     seeds[start:start + batch_size], sampler, progress))
    return torch.cat(out)


def _drop_new_adapters(model: Any, before: set[str]) -> None:
    """Delete the adapters ``load_lora`` added, so the next run starts from the base again."""
    inner: Any = unwrap(model)  # a diffusers model with peft's adapter methods
    new = [name for name in getattr(inner, "peft_config", {}) if name not in before]
    if new:
        inner.delete_adapters(new)


def evaluate(
    spec: Any,
    prompts: list[str],
    runs: dict[str, str | Path],
    rewards: list[Reward],
    out: str | Path,
    *,
    seed: int = 10_000,
    sampler: SamplerSettings | None = None,
    batch_size: int = 4,
    quality: Callable[[Tensor], float] | None = None,
    samples_per_prompt: int = 1,
    progress: bool = True,
    reward_options: dict[str, dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> EvaluationResult:
    """Sample the base and each run (name -> LoRA folder) from identical noise, score, compare, report.

    ``out`` holding an evaluation with other settings is refused (FolderError naming the field) unless
    ``overwrite``, which replaces it whole once the new one is written; another stage's folder is
    always refused. ``reward_options`` (reward name -> its factory's options) are recorded with the settings.
    """
    from sdpo.seeding import derive_seed

    sampler = sampler or SamplerSettings()
    settings = evaluation_settings(prompts, runs, [reward.name for reward in rewards], seed, sampler,
                                   samples_per_prompt, reward_options)
    settings.update(family=spec.family, media_format=asdict(spec.media_format),
                    model=spec.pretrained and str(spec.pretrained))
    check_evaluation_out(Path(out), settings, overwrite)
    if not runs:
        raise InputError("evaluate needs at least one run (NAME=LORA_DIR) to compare with the base")
    names = [reward.name for reward in rewards]
    if len(set(names)) < len(names):
        raise InputError(f"two rewards are named {next(n for n in names if names.count(n) > 1)!r}: their "
                         "results would overwrite each other; give one another name")
    for reward in rewards:
        if reward.media != spec.media_kind:
            raise InputError(f"reward {reward.name!r} scores {reward.media}s, but the {spec.family} model makes "
                             f"{spec.media_kind}s")
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    if len(all_prompts) < 2:
        raise InputError("need at least two evaluation samples for intervals")
    seeds = [derive_seed(seed, i) for i in range(len(all_prompts))]
    noise = torch.cat([spec.initial_latents(1, s) for s in seeds])
    samples = {"base": _sample_all(spec, all_prompts, noise, seeds, sampler, batch_size, progress)}
    for name, folder in runs.items():
        if name in samples or name == "noise":
            raise InputError(f"run name {name!r} is taken; pick another")
        before = set(getattr(unwrap(spec.denoiser), "peft_config", {}))
        load_lora_checked(spec, folder)
        try:
            samples[name] = _sample_all(spec, all_prompts, noise, seeds, sampler, batch_size, progress)
        finally:
            _drop_new_adapters(spec.denoiser, before)
    scores = {r.name: {m: r.score(x, all_prompts).detach().float().cpu() for m, x in samples.items()}
              for r in rewards}
    result = EvaluationResult(
        Path(out), list(samples),
        means={r: {m: v.mean().item() for m, v in s.items()} for r, s in scores.items()},
        versus_base={r: {m: compare(s["base"], s[m]) for m in runs} for r, s in scores.items()},
        head_to_head={r: head_to_head(s) for r, s in scores.items()},
        quality={m: float(quality(x)) for m, x in samples.items()} if quality else {},
        sample_scores={r: {m: v.tolist() for m, v in s.items()} for r, s in scores.items()})
    _write_outputs(result, samples, noise, all_prompts, seed, sampler, runs, settings, keep_ratings=not overwrite)
    for name, folder in runs.items():  # only cards sdpo wrote; a LoRA from elsewhere is left as it is
        record_evaluation(folder, str(out), {r: c[name].as_dict() for r, c in result.versus_base.items()})
    return result


def evaluation_settings(prompts: list[str], runs: dict[str, str | Path], rewards: list[str], seed: int,
                        sampler: SamplerSettings, samples_per_prompt: int,
                        reward_options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The settings that define an evaluation's content (the spec's family, model and size are added)."""
    return {"prompts": list(prompts), "runs": {name: str(folder) for name, folder in runs.items()},
            "rewards": list(rewards), "reward_options": {k: dict(v) for k, v in (reward_options or {}).items()},
            "seed": seed, "sampler": asdict(sampler), "samples_per_prompt": samples_per_prompt}


def check_evaluation_out(out: Path, settings: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse an ``out`` that holds anything but an evaluation, or (without ``overwrite``) one made with
    other settings; only the keys of ``settings`` are compared (an evaluation from before markers: its
    results.json's seed, sampler and runs)."""
    from sdpo.folders import check_replaceable, check_reuse, saved_settings

    check_replaceable(out, "evaluation", flag="evaluate --out")  # its folder is replaced whole: nothing else
    if overwrite:
        return
    saved = saved_settings(out, "evaluation")
    if saved is None and (out / "results.json").is_file():
        legacy = json.loads((out / "results.json").read_text(encoding="utf-8"))
        saved = {key: legacy[key] for key in ("seed", "sampler", "runs") if key in legacy}
        settings = {key: value for key, value in settings.items() if key in saved}
    check_reuse(out, "evaluation", settings, saved=saved,
                hint="use a new --out folder, or --overwrite to replace that evaluation whole")


def _write_outputs(result: EvaluationResult, samples: dict[str, Tensor], noise: Tensor, prompts: list[str],
                   seed: int, sampler: SamplerSettings, runs: dict[str, str | Path], settings: dict[str, Any],
                   keep_ratings: bool = True) -> None:
    """Write everything into a fresh sibling folder, then put it in the place of ``result.out``: no file of
    an earlier evaluation (a grid of a run no longer evaluated) survives beside the new results, except
    people's answers (``ratings/``, of ``sdpo rate``) when the settings are the same (``keep_ratings``):
    the same settings make the same samples, and an hour of a person's answers is not remade by a rerun."""
    import shutil
    import tempfile

    from sdpo.folders import write_marker

    final = result.out
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_files(out, result, samples, noise, prompts, seed, sampler, runs)
        if keep_ratings and (final / "ratings").is_dir():
            shutil.copytree(final / "ratings", out / "ratings", symlinks=True)
        write_marker(out, "evaluation", settings)
        _swap(out, final)
    except OSError as error:
        shutil.rmtree(out, ignore_errors=True)
        raise named_for(error, out, final) from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _swap(staging: Path, final: Path) -> None:
    import shutil
    import tempfile

    from sdpo.files import fsync_dir

    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "evaluation")
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_files(out: Path, result: EvaluationResult, samples: dict[str, Tensor], noise: Tensor,
                 prompts: list[str], seed: int, sampler: SamplerSettings, runs: dict[str, str | Path]) -> None:
    save_eval_samples(out / EVAL_SAMPLES_FILE, samples, noise, prompts, seed)
    for name, media in samples.items():
        write_grid(media, out / f"grid-{name}.png")
        if media.ndim == 5:
            for index in range(min(4, media.shape[0])):
                write_media(media[index], out / f"{name}-{index:02d}.mp4")
    write_atomic(out / "results.json", json.dumps(
        {**result.as_dict(), "prompts": prompts, "seed": seed, "sampler": asdict(sampler),
         "runs": {k: str(v) for k, v in runs.items()}, "sample_scores": result.sample_scores}, indent=2))
    write_atomic(out / "report.md", report_markdown(result, len(prompts)))


def write_grid(media: Tensor, path: Path, columns: int = 8) -> None:
    """A PNG grid of up to 32 images, or for clips a contact sheet (one row of frames per sample, 8 rows)."""
    if media.ndim == 5:
        rows = media[:8]
        step = max(1, rows.shape[1] // 8)
        tiles, columns = rows[:, ::step][:, :8].flatten(0, 1), min(8, rows[:, ::step].shape[1])
    else:
        tiles = media[:32]
    count, channels, height, width = tiles.shape
    grid_rows = (count + columns - 1) // columns
    canvas = torch.full((channels, grid_rows * height, columns * width), -1.0)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        canvas[:, r * height:(r + 1) * height, c * width:(c + 1) * width] = tile
    write_media(canvas, path)


def report_markdown(result: EvaluationResult, n: int) -> str:
    """The evaluation as a markdown report."""
    lines = [f"# Evaluation: {', '.join(result.models)}", "", f"{n} paired samples per model (identical noise).", ""]
    for reward, table in result.versus_base.items():
        lines += [f"## {reward}", "", "| model | mean | gain over base (95% CI) | win rate over base (95% CI) |",
                  "|---|---|---|---|", f"| base | {result.means[reward]['base']:.4f} | | |"]
        for name, comparison in table.items():
            lines.append(f"| {name} | {result.means[reward][name]:.4f} | {comparison.gain} | {comparison.win_rate} |")
        lines += ["", "| A vs B | A wins (95% CI) | reward A - B (95% CI) |", "|---|---|---|"]
        for pair, comparison in result.head_to_head[reward].items():
            lines.append(f"| {pair} | {comparison.win_rate} | {comparison.gain} |")
        lines.append("")
    if result.quality:
        lines += ["## Quality guard", "", *(f"- {m}: {v:.4f}" for m, v in result.quality.items()), ""]
    lines += ["Samples: " + ", ".join(f"grid-{m}.png" for m in result.models) + f"; export: {EVAL_SAMPLES_FILE}.", ""]
    return "\n".join(lines)
