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
from safetensors.torch import save_file

from sdpo.objectives import METHODS, MethodConfig
from sdpo.train.config import TrainConfig

DEMO_BETA = {"diffusion-dpo": 2000.0, "dpo-cm": 2000.0, "sdpo": 2000.0}
"""Per-method default beta for the toy world (errors are per-pixel means of epsilon)."""


@dataclass
class DemoConfig:
    """Settings of `sdpo demo`; every field is a command-line flag."""

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
    """ToyModelConfig fields to override (tests use a tiny, fast base model)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        self.methods = tuple(METHODS if "all" in self.methods else self.methods)
        for name in self.methods:
            MethodConfig.preset(name)  # raises a one-line error for an unknown method
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
            family="toy",
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
    from sdpo.toy.base_model import ToyModelConfig, pretrain_base
    from sdpo.toy.data import NUM_CLASSES, load_split, prompts_for
    from sdpo.toy.pairs import generate_pairs
    from sdpo.toy.reward import digit_reward, feature_distance
    from sdpo.toy.spec import ToySpec
    from sdpo.train.trainer import train

    out = Path(config.out)
    for method in config.methods:
        config.train_config(method, out)  # validate every run's settings before any work
    staging = _prepare_output(out)
    timings: dict[str, float] = {}
    try:
        clock = time.perf_counter()
        base_folder = pretrain_base(ToyModelConfig(**config.toy_overrides), config.cache_root, config.progress)
        timings["base model"] = time.perf_counter() - clock

        spec = ToySpec.from_pretrained(base_folder)
        reward = digit_reward()
        clock = time.perf_counter()
        train_prompts = prompts_for([d for d in range(NUM_CLASSES) for _ in range(config.pairs_per_digit)])
        pairs_path = generate_pairs(spec, reward, train_prompts, staging / "pairs", config.samples_per_prompt,
                                    seed=config.seed, num_inference_steps=config.num_inference_steps,
                                    progress=config.progress)
        timings["pairs"] = time.perf_counter() - clock

        clock = time.perf_counter()
        cache_dir = precompute(read_pairs(pairs_path), spec, staging / "cache", progress=config.progress)
        dataset = CachedPairs(cache_dir)
        timings["precompute"] = time.perf_counter() - clock

        eval_prompts = prompts_for([d for d in range(NUM_CLASSES) for _ in range(config.eval_per_digit)])
        fmt = spec.media_format
        eval_noise = torch.randn((len(eval_prompts), fmt.channels, fmt.height, fmt.width),
                                 generator=torch.Generator().manual_seed(10_000 + config.seed))
        real_images, _ = load_split("held_out")
        base_samples = _sample(spec, spec.denoiser, eval_prompts, eval_noise, config)
        base_scores = reward(base_samples, eval_prompts)
        results = {"base": {"fid_like": feature_distance(base_samples, real_images),
                            "mean_reward": base_scores.mean().item()}}
        samples = {"base": base_samples, "noise": eval_noise}
        histories = {}
        for method in config.methods:
            clock = time.perf_counter()
            spec = ToySpec.from_pretrained(base_folder)  # a fresh base network per method
            run = train(config.train_config(method, staging / method), spec=spec, dataset=dataset,
                        progress=config.progress)
            timings[f"train {method}"] = time.perf_counter() - clock
            tuned = _sample(spec, run.model, eval_prompts, eval_noise, config)
            comparison = compare(base_scores, reward(tuned, eval_prompts))
            results[method] = {**comparison.as_dict(), "fid_like": feature_distance(tuned, real_images)}
            samples[method] = tuned
            histories[method] = run.history

        from sdpo.toy.report import write_report

        save_file({k: v.contiguous() for k, v in samples.items()} | {
            "digits": torch.tensor([d for d in range(NUM_CLASSES) for _ in range(config.eval_per_digit)])},
            str(staging / "eval_samples.safetensors"),
            metadata={"prompts": json.dumps(eval_prompts), "seed": str(10_000 + config.seed),
                      "layout": "images (N, 1, 8, 8) in [-1, 1]; noise is the shared initial DDIM noise"})
        (staging / "results.json").write_text(json.dumps(
            {"config": asdict(config), "results": results, "timings_s": timings,
             "real_vs_real_fid_like": feature_distance(load_split("train")[0], real_images)},
            indent=2, default=str))
        write_report(staging, config, results, histories, samples, eval_prompts, spec, dataset, timings)
        _publish(staging, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    return out


def _sample(spec, model, prompts, noise, config: DemoConfig) -> torch.Tensor:
    from sdpo.toy.sampling import sample

    return sample(spec, model, prompts, noise, num_inference_steps=config.num_inference_steps,
                  progress=config.progress)
