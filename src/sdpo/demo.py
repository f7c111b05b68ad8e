"""`sdpo demo`: the whole method, offline, on the embedded digits world.

The world supplies its base model, prompts, reward, real data and quality guard; everything else
is the library's own stages, exactly as a real model runs them: pretrain (or reuse) the base model
-> ``generate`` candidates -> ``score`` them with the world's reward -> ``build_pairs`` (best vs
worst) -> ``precompute`` -> ``train`` a LoRA per method -> ``evaluate`` base and tuned runs from
identical held-out noise (reward, gain and win rate with intervals, the quality guard) -> the
demo's report. Everything is built in a temporary sibling of the output folder and moved into
place at the end, so a failed run leaves no half-written report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sdpo.errors import InputError, UnwritableError
from sdpo.folders import check_replaceable, write_marker
from sdpo.method_presets import method_preset
from sdpo.objectives import METHODS, OWN_LOSS_METHODS
from sdpo.stages.evaluate import EVAL_SAMPLES_FILE, load_eval_samples, save_eval_samples
from sdpo.toy.settings import WorldRunSettings
from sdpo.train.config import TrainConfig

if TYPE_CHECKING:
    from sdpo.stages.evaluate import EvaluationResult
    from sdpo.toy.world import World

T = TypeVar("T")

__all__ = ["EVAL_SAMPLES_FILE", "DemoConfig", "load_eval_samples", "run_demo", "save_eval_samples"]

DEMO_BETA = {"diffusion-dpo": 2000.0, "dpo-cm": 2000.0, "sdpo": 2000.0}
"""Per-method default beta for the toy world (errors are per-pixel means of epsilon)."""


@dataclass
class DemoConfig(WorldRunSettings):
    """Settings of `sdpo demo` (the world, data sizes, LoRA recipe and evaluation are ``WorldRunSettings``)."""

    methods: tuple[str, ...] = ("sdpo",)
    """Methods to fine-tune and compare: any of diffusion-dpo, dpo-cm, sdpo."""
    steps: int = 300
    """Optimizer steps per method."""
    beta: float | None = None
    """Objective temperature; None uses the method's demo default (DEMO_BETA)."""
    seed: int = 0
    """Seed of pair sampling, training and evaluation noise."""
    out: str = "outputs/demo"
    """Output folder; replaced as a whole when the run succeeds."""
    pairs_per_digit: int = 32
    """Preference pairs per digit prompt (10 prompts)."""
    eval_per_digit: int = 50
    """Held-out evaluation samples per digit, from seeds never used for pairs."""

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        # "all": the weighted-DPO family the demo compares (kto needs labelled samples, not the demo's pairs)
        self.methods = tuple([m for m in METHODS if m not in OWN_LOSS_METHODS] if "all" in self.methods
                             else self.methods)
        for name in self.methods:
            method_preset(name)  # raises a one-line error for an unknown method
        self.check_shared()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        if self.eval_per_digit < 2:
            raise InputError("eval_per_digit must be at least 2 for confidence intervals")

    def train_config(self, method: str, output_dir: Path) -> TrainConfig:
        """The TrainConfig of one method's fine-tuning run."""
        beta = self.beta if self.beta is not None else DEMO_BETA[method]
        return TrainConfig(
            family="toy" if self.world == "image" else "toy-video",
            output_dir=str(output_dir),
            method=method_preset(method, beta=beta, num_inference_steps=self.num_inference_steps),
            lora_rank=self.lora_rank,
            learning_rate=self.learning_rate,
            lr_schedule="constant_with_warmup",
            lr_warmup_steps=min(20, self.steps // 10),
            max_steps=self.steps,
            train_batch_size=self.batch_size,
            log_every=max(1, min(10, self.steps // 20)),
            seed=self.seed,
            report_to="tensorboard",
        )


GENERATE_BATCH = 512
"""Candidates per generate / score / evaluate batch: the toy models are tiny, so large batches are cheap."""


def _prepare_output(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` to build into; fails early if ``out`` cannot be written."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as error:
        raise UnwritableError(f"output folder is not writable: {out} ({error.strerror})") from error
    return staging


def _publish(staging: Path, out: Path) -> None:
    """Replace ``out`` with the finished staging folder (the old one is removed only after)."""
    out = out.resolve()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_demo(config: DemoConfig) -> Path:
    """Run every stage and return the output folder holding report.md."""
    from sdpo.toy.world import get_world

    world = get_world(config.world, config.toy_overrides)
    out = Path(config.out)
    for method in config.methods:
        config.train_config(method, out)  # validate every run's settings before any work
    check_replaceable(out, "demo", flag="demo --out")  # it is replaced whole: only an earlier demo
    staging = _prepare_output(out)
    try:
        _run_stages(config, world, staging)
        write_marker(staging, "demo", json.loads(json.dumps(asdict(config), default=str)))
        _publish(staging, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    return out


def _timed(timings: dict[str, float], stage: str, work: Callable[[], T]) -> T:
    clock = time.perf_counter()
    result = work()
    timings[stage] = time.perf_counter() - clock
    return result


def _run_stages(config: DemoConfig, world: World, staging: Path) -> None:
    """The library's stages, as a real model runs them: generate -> score -> pairs -> precompute ->
    train (each method) -> evaluate; then the demo's report over the evaluation."""
    from sdpo.data import CachedPairs, precompute, read_pairs
    from sdpo.models.registry import load_spec
    from sdpo.stages.evaluate import evaluate
    from sdpo.stages.generate import SamplerSettings, generate
    from sdpo.stages.pairs import build_pairs
    from sdpo.stages.score import score
    from sdpo.toy.report import write_report
    from sdpo.train.trainer import train

    timings: dict[str, float] = {}
    base_folder = _timed(timings, "base model", lambda: world.pretrain(config.cache_root, config.progress))
    spec = load_spec(world.family, base_folder)
    reward = world.reward()
    sampler = SamplerSettings(config.num_inference_steps, world.guidance_scale)
    video = spec.media_kind == "video"
    candidates = staging / "candidates"
    # Clips as PNG frame folders only, and the pairs point at those: exact 8-bit pixels, where the
    # MP4 codec would blur the grey digits before precompute encodes them; nobody watches them.
    _timed(timings, "generate", lambda: generate(
        spec, world.prompts(config.pairs_per_digit), candidates, per_prompt=config.samples_per_prompt,
        seed=config.seed, sampler=sampler, batch_size=GENERATE_BATCH, progress=config.progress,
        frame_folders=video, mp4=not video))
    _timed(timings, "score", lambda: score(candidates, [reward], batch_size=GENERATE_BATCH,
                                           progress=config.progress))
    pairs = _timed(timings, "pairs", lambda: build_pairs(candidates, "best-worst", frames=video,
                                                         out=staging / "pairs.jsonl"))
    cache_dir = _timed(timings, "precompute", lambda: precompute(read_pairs(pairs.out), spec, staging / "cache",
                                                                 progress=config.progress))
    dataset = CachedPairs(cache_dir)

    histories = {}
    for method in config.methods:
        fresh = load_spec(world.family, base_folder)  # a fresh base network per method
        run = _timed(timings, f"train {method}", partial(
            train, config.train_config(method, staging / method), spec=fresh, dataset=dataset, progress=config.progress))
        histories[method] = run.history

    real = world.real("held_out")
    eval_prompts = world.prompts(config.eval_per_digit)
    evaluation = _timed(timings, "evaluate", lambda: evaluate(
        load_spec(world.family, base_folder), eval_prompts, {m: staging / m for m in config.methods}, [reward],
        staging / "evaluation", seed=10_000 + config.seed, sampler=sampler, batch_size=GENERATE_BATCH,
        quality=lambda media: world.quality(media, real), progress=config.progress))
    _export_link(staging / "evaluation" / EVAL_SAMPLES_FILE, staging / EVAL_SAMPLES_FILE)
    _, _, samples = load_eval_samples(staging)

    results = _results_table(evaluation, reward.name)
    (staging / "results.json").write_text(json.dumps(
        {"config": asdict(config), "results": results, "timings_s": timings,
         "head_to_head": {k: c.as_dict() for k, c in evaluation.head_to_head[reward.name].items()},
         "pairs": {"written": pairs.pairs, "skipped": pairs.skipped},
         "real_vs_real_fid_like": world.quality(world.real("train"), real)},
        indent=2, default=str))
    write_report(staging, config, world, results, histories, samples, eval_prompts, spec, dataset, timings)


def _results_table(evaluation: EvaluationResult, reward: str) -> dict[str, dict[str, Any]]:
    """The demo's per-model figures: base mean and feature distance; each method's comparison with the base."""
    results: dict[str, dict[str, Any]] = {"base": {"fid_like": evaluation.quality["base"],
                                                   "mean_reward": evaluation.means[reward]["base"]}}
    for method, comparison in evaluation.versus_base[reward].items():
        results[method] = {**comparison.as_dict(), "fid_like": evaluation.quality[method]}
    return results


def _export_link(source: Path, target: Path) -> None:
    """The evaluation export also at the top of the demo folder, where the benchmarks read it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
