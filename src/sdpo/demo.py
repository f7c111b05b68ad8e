"""`sdpo demo`: the whole method, offline, on the embedded digits world.

Stages: pretrain (or reuse) the toy base model -> sample and score candidates into preference
pairs -> precompute the cache -> fine-tune with LoRA for each requested method -> sample base and
tuned models from identical held-out seeds -> compare rewards, win rate and a quality guard ->
write a report. Everything is built in a temporary sibling of the output folder and moved into
place at the end, so a failed run leaves no half-written report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sdpo.objectives import METHODS, MethodConfig
from sdpo.train.config import TrainConfig

DEMO_BETA = {"diffusion-dpo": 2000.0, "dpo-cm": 2000.0, "sdpo": 2000.0}
"""Per-method default beta for the toy world (errors are per-pixel means of epsilon)."""


@dataclass
class DemoConfig:
    """Settings of `sdpo demo`; every field is a command-line flag."""

    world: str = "image"
    """Embedded world: "image" (8x8 digits, a UNet) or "video" (moving digits, a tiny video transformer)."""
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
    samples_per_prompt: int = 4
    """Candidates sampled per pair; the best and worst by reward form the pair."""
    eval_per_digit: int = 50
    """Held-out evaluation samples per digit, from seeds never used for pairs."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    learning_rate: float = 1e-3
    """LoRA learning rate."""
    lora_rank: int = 8
    """LoRA rank."""
    num_inference_steps: int = 25
    """Sampler steps for pairs and evaluation (and the K of the importance weights)."""
    cache_root: str | None = None
    """Where the pretrained base model is cached (default $SDPO_CACHE or ~/.cache/sdpo)."""
    toy_overrides: dict = field(default_factory=dict)
    """Base-model config fields to override (ToyModelConfig or VideoToyConfig; tests use tiny ones)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        self.methods = tuple(METHODS if "all" in self.methods else self.methods)
        for name in self.methods:
            MethodConfig.preset(name)  # raises a one-line error for an unknown method
        from sdpo.toy.world import WORLDS

        if self.world not in WORLDS:
            raise ValueError(f"unknown world {self.world!r}; choose one of {', '.join(WORLDS)}")
        for name in ("steps", "pairs_per_digit", "eval_per_digit", "batch_size", "num_inference_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be at least 2, got {self.samples_per_prompt}")
        if self.eval_per_digit < 2:
            raise ValueError("eval_per_digit must be at least 2 for confidence intervals")

    def train_config(self, method: str, output_dir: Path) -> TrainConfig:
        """The TrainConfig of one method's fine-tuning run."""
        beta = self.beta if self.beta is not None else DEMO_BETA[method]
        return TrainConfig(
            family="toy" if self.world == "image" else "toy-video",
            output_dir=str(output_dir),
            method=MethodConfig.preset(method, beta=beta, num_inference_steps=self.num_inference_steps),
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


EVAL_SAMPLES_FILE = "eval_samples.safetensors"
"""Evaluation samples of a run: one tensor per model, the shared noise, and the prompts in the metadata."""


def load_eval_samples(run_folder: str | Path) -> tuple[list[str], Tensor, dict[str, Tensor]]:
    """(prompts, shared noise, samples by model name) of a finished demo run."""
    with safe_open(str(Path(run_folder) / EVAL_SAMPLES_FILE), "pt") as handle:
        prompts = json.loads(handle.metadata()["prompts"])
        samples = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return prompts, samples.pop("noise"), samples


def _prepare_output(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` to build into; fails early if ``out`` cannot be written."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as error:
        raise PermissionError(f"output folder is not writable: {out} ({error.strerror})") from error
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
    from sdpo.data import CachedPairs, precompute, read_pairs
    from sdpo.evaluate import compare
    from sdpo.models.registry import load_spec
    from sdpo.toy.pairs import generate_pairs
    from sdpo.toy.report import write_report
    from sdpo.toy.world import get_world
    from sdpo.train.trainer import train

    world = get_world(config.world, config.toy_overrides)
    out = Path(config.out)
    for method in config.methods:
        config.train_config(method, out)  # validate every run's settings before any work
    staging = _prepare_output(out)
    timings: dict[str, float] = {}
    try:
        clock = time.perf_counter()
        base_folder = world.pretrain(config.cache_root, config.progress)
        timings["base model"] = time.perf_counter() - clock

        spec = load_spec(world.family, base_folder)
        reward = world.reward()
        clock = time.perf_counter()
        pairs_path = generate_pairs(spec, reward, world.prompts(config.pairs_per_digit), staging / "pairs",
                                    config.samples_per_prompt, seed=config.seed,
                                    num_inference_steps=config.num_inference_steps,
                                    guidance_scale=world.guidance_scale, progress=config.progress)
        timings["pairs"] = time.perf_counter() - clock

        clock = time.perf_counter()
        cache_dir = precompute(read_pairs(pairs_path), spec, staging / "cache", progress=config.progress)
        dataset = CachedPairs(cache_dir)
        timings["precompute"] = time.perf_counter() - clock

        eval_prompts = world.prompts(config.eval_per_digit)
        sample_shape = tuple(dataset[0].chosen.shape)
        eval_noise = torch.randn((len(eval_prompts), *_pixel_shape(spec, sample_shape)),
                                 generator=torch.Generator().manual_seed(10_000 + config.seed))
        real = world.real("held_out")
        clock = time.perf_counter()
        sampler = dict(num_inference_steps=config.num_inference_steps, guidance_scale=world.guidance_scale,
                       progress=config.progress)
        base_samples = spec.sample(eval_prompts, spec.encode_media(eval_noise), **sampler)
        timings["evaluate base"] = time.perf_counter() - clock
        base_scores = reward.score(base_samples, eval_prompts)
        results = {"base": {"fid_like": world.quality(base_samples, real),
                            "mean_reward": base_scores.mean().item()}}
        samples = {"base": base_samples, "noise": eval_noise}
        histories = {}
        for method in config.methods:
            clock = time.perf_counter()
            spec = load_spec(world.family, base_folder)  # a fresh base network per method
            run = train(config.train_config(method, staging / method), spec=spec, dataset=dataset,
                        progress=config.progress)
            timings[f"train {method}"] = time.perf_counter() - clock
            tuned = spec.sample(eval_prompts, spec.encode_media(eval_noise), model=run.model, **sampler)
            comparison = compare(base_scores, reward.score(tuned, eval_prompts))
            results[method] = {**comparison.as_dict(), "fid_like": world.quality(tuned, real)}
            samples[method] = tuned
            histories[method] = run.history

        save_file({k: v.contiguous() for k, v in samples.items()},
                  str(staging / EVAL_SAMPLES_FILE),
                  metadata={"prompts": json.dumps(eval_prompts), "seed": str(10_000 + config.seed),
                            "world": config.world,
                            "layout": "samples in [-1, 1] as the world's sampler returns them; noise is the "
                                      "shared initial noise of base and tuned sampling"})
        (staging / "results.json").write_text(json.dumps(
            {"config": asdict(config), "results": results, "timings_s": timings,
             "real_vs_real_fid_like": world.quality(world.real("train"), real)},
            indent=2, default=str))
        write_report(staging, config, world, results, histories, samples, eval_prompts, spec, dataset, timings)
        _publish(staging, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    return out


def _pixel_shape(spec, latent_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one sample's starting noise: the world's pixel layout (C, H, W) or (F, C, H, W)."""
    fmt = spec.media_format
    if fmt.frames is None:
        return (fmt.channels, fmt.height, fmt.width)
    return (fmt.frames, fmt.channels, fmt.height, fmt.width)
