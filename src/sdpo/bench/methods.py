"""`sdpo bench methods`: when, if ever, do the importance weights help?

For every data condition (``sdpo.bench.conditions``) and seed, the world's base model is fine-tuned
once per arm (a method at a beta, a published baseline, or a variant) on the same pairs with the same
batches, timesteps and noise (one TrainConfig seed), then all arms and the base are sampled from the
same held-out noise and scored by the world's reward and by a second scorer that never built pairs
or trained anything. A long-training arm continues the core methods to several times the step
budget, evaluated along the way. Statistics are over seeds (``sdpo.stats``); the report is
``sdpo.bench.report``.

A killed sweep resumes: every (condition, seed) cell whose evaluation is written is kept.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpo.bench.conditions import CONDITIONS, condition_cache, samples_cache_of, weak_overrides
from sdpo.bench.report import write_report
from sdpo.errors import InputError
from sdpo.method_presets import method_preset
from sdpo.objectives import METHODS, OWN_LOSS_METHODS, MethodConfig, MethodName
from sdpo.toy.pretraining import PretrainedWorld
from sdpo.toy.settings import WorldRunSettings
from sdpo.toy.world import World

if TYPE_CHECKING:
    from torch import Tensor

    from sdpo.rewards.base import Reward
    from sdpo.train.config import TrainConfig

BASELINES: dict[str, str] = {
    "dpo+sft": "Diffusion-DPO plus an SFT term on the winners, sft_weight = beta/4 (as in Reg-DPO)",
    "diffusion-sdpo": "Diffusion-DPO with Diffusion-SDPO's winner-preserving loser scaling (arXiv 2511.03317)",
}
"""Published stabilizers run as further baselines, at ``BenchConfig.default_beta``."""


@dataclass(frozen=True)
class Arm:
    """One trained configuration: a method preset at a beta, with settings changed."""

    name: str
    """Row name: a method, a baseline (BASELINES) or a variant ("sdpo:normalize=true")."""
    method: str
    """The MethodConfig preset it starts from."""
    beta: float
    """Objective temperature."""
    settings: tuple[tuple[str, Any], ...] = ()
    """MethodConfig fields changed from the preset."""

    @property
    def label(self) -> str:
        return f"{self.name}@{self.beta:g}"

    def method_config(self, num_inference_steps: int) -> MethodConfig:
        return method_preset(self.method, beta=self.beta, num_inference_steps=num_inference_steps,
                                   **dict(self.settings))


def parse_variant(text: str, beta: float) -> Arm:
    """An arm from "method:key=value,key=value" (values are YAML: true, 0.5, [0, 2])."""
    import yaml

    method, _, rest = text.partition(":")
    if method not in METHODS:
        raise InputError(f"variant {text!r}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    settings = []
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise InputError(f"variant {text!r}: expected key=value, got {item!r}")
        settings.append((key.strip(), yaml.safe_load(value)))
    arm = Arm(text, method, beta, tuple(settings))
    try:
        arm.method_config(50)  # one clear error for an unknown or invalid setting
    except (TypeError, ValueError) as error:  # the math module raises plain errors; this is the user's input
        raise InputError(f"variant {text!r}: {error}") from error
    return arm


@dataclass
class BenchConfig(WorldRunSettings):
    """Settings of `sdpo bench methods` (the defaults are the full sweep; ``quick()`` the test-sized one);
    the world, data sizes, LoRA recipe and evaluation are ``WorldRunSettings``."""

    conditions: tuple[str, ...] = tuple(CONDITIONS)
    """Data conditions (sdpo.bench.conditions.CONDITIONS)."""
    methods: tuple[MethodName, ...] = METHODS
    """Methods trained at every beta of ``betas`` (MaPO: of ``mapo_betas``). Diffusion-KTO trains on the same
    members as the pairs, unpaired (``condition_cache(..., samples=True)``)."""
    betas: tuple[float, ...] = (200.0, 2000.0, 20000.0)
    """The beta grid of the methods (the robustness picture; one value gives no picture). Diffusion-KTO's beta
    is on the same scale (a member whose error moves by d gets logit beta*d under both)."""
    mapo_betas: tuple[float, ...] = (0.01, 0.1, 1.0)
    """MaPO's grid: its beta weighs the margin term against the SFT term (the paper's 0.1 in the middle), 100x
    across as ``betas``; each is compared with Diffusion-DPO at the ``betas`` value in the same position."""
    default_beta: float = 2000.0
    """The beta of the baselines, the variants and the long-training arm."""
    baselines: tuple[str, ...] = tuple(BASELINES)
    """Published stabilizers (BASELINES) trained at ``default_beta``."""
    variants: tuple[str, ...] = ("sdpo:normalize=true", "sdpo:estimator=relative")
    """Further rows, "method:key=value,..." at ``default_beta``."""
    seeds: int = 5
    """Seeds per cell: each has its own pairs, training draws and evaluation noise."""
    steps: int = 100
    """Optimizer steps of every arm."""
    long_steps: int = 400
    """Steps of the long-training arm (0: none); evaluated every ``long_every`` steps."""
    long_every: int = 100
    """Evaluation interval of the long-training arm."""
    long_condition: str = "off-policy-far"
    """Data condition of the long-training arm."""
    long_seeds: int = 3
    """Seeds of the long-training arm."""
    out: str = "outputs/bench-methods"
    """Output folder (a rerun resumes the cells it holds)."""

    def __post_init__(self) -> None:
        self.check_shared()
        self.conditions, self.methods = tuple(self.conditions), tuple(self.methods)
        self.betas, self.baselines, self.variants = tuple(self.betas), tuple(self.baselines), tuple(self.variants)
        self.mapo_betas = tuple(self.mapo_betas)
        if "mapo" in self.methods and len(self.mapo_betas) != len(self.betas):
            raise InputError(f"mapo_betas {list(self.mapo_betas)} must have one value per beta {list(self.betas)}: "
                             "each is compared with Diffusion-DPO at the beta in its position")
        for name in self.conditions:
            if name not in CONDITIONS:
                raise InputError(f"unknown condition {name!r}; choose one of {', '.join(CONDITIONS)}")
        for name in self.baselines:
            if name not in BASELINES:
                raise InputError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
        if len(self.betas) < 1 or self.default_beta not in self.betas:
            raise InputError(f"default_beta {self.default_beta:g} must be one of the betas {list(self.betas)}: "
                             "the baselines are compared with Diffusion-DPO there")
        if "diffusion-dpo" not in self.methods:
            raise InputError("methods must include diffusion-dpo: every row is compared with it")
        for name in ("seeds", "steps", "long_every", "long_seeds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.long_steps < 0 or (self.long_steps and self.long_steps % self.long_every):
            raise InputError(f"long_steps must be a multiple of long_every ({self.long_every}), got {self.long_steps}")
        if self.long_steps and self.long_condition not in self.conditions:
            raise InputError(f"long_condition {self.long_condition!r} is not among the conditions")
        self.arms()  # every arm's method settings are validated now, before any work

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """The test-sized sweep: two conditions, two betas, two seeds, a few steps (about 2 minutes)."""
        settings: dict[str, Any] = dict(
            conditions=("on-policy", "off-policy-far"), betas=(200.0, 2000.0), mapo_betas=(0.01, 0.1),
            variants=("sdpo:normalize=true",), seeds=2, steps=6,
            long_steps=8, long_every=4, long_seeds=1, pairs_per_digit=2, eval_per_digit=2, batch_size=4,
            num_inference_steps=4, samples_per_prompt=2)
        settings.update(overrides)
        return cls(**settings)

    def method_betas(self, method: str) -> tuple[float, ...]:
        """The beta grid ``method`` is trained at (``mapo_betas`` for MaPO, else ``betas``)."""
        return self.mapo_betas if method == "mapo" else self.betas

    def versus(self) -> dict[str, str]:
        """Each method arm -> the Diffusion-DPO arm it is compared with (same beta; MaPO: same grid position)."""
        return {f"{method}@{beta:g}": f"diffusion-dpo@{dpo:g}" for method in self.methods
                for beta, dpo in zip(self.method_betas(method), self.betas, strict=True)}

    def arms(self) -> list[Arm]:
        """Every arm of a cell: the methods at each beta, then baselines and variants at the default beta."""
        arms = [Arm(method, method, beta) for method in self.methods for beta in self.method_betas(method)]
        for name in self.baselines:
            settings = (("sft_weight", self.default_beta / 4),) if name == "dpo+sft" else (("safeguard", True),)
            arms.append(Arm(name, "diffusion-dpo", self.default_beta, settings))
        arms += [parse_variant(text, self.default_beta) for text in self.variants]
        for arm in arms:
            arm.method_config(self.num_inference_steps)
        return arms


def _train_config(config: BenchConfig, arm: Arm, seed: int, steps: int, cache: Path, out: Path,
                  keep_checkpoint: bool = False) -> TrainConfig:
    from sdpo.train.config import TrainConfig

    return TrainConfig(
        family="toy" if config.world == "image" else "toy-video", cache_dir=str(cache), output_dir=str(out),
        method=arm.method_config(config.num_inference_steps), lora_rank=config.lora_rank,
        learning_rate=config.learning_rate, lr_schedule="constant_with_warmup",
        lr_warmup_steps=min(20, config.steps // 10), max_steps=steps,
        # KTO takes the pairs' 2B members as samples: the same latents through the networks per step and epoch.
        train_batch_size=config.batch_size * (2 if arm.method_config(config.num_inference_steps).unpaired else 1),
        log_every=1, seed=seed, report_to="none", checkpoint_every=steps if keep_checkpoint else 0)


@dataclass
class SweepContext:
    """What every cell of one sweep shares: the world, its generators, rewards and real data."""

    config: Any
    """The sweep's settings: a BenchConfig, or any WorldRunSettings with an ``out`` (`sdpo bench online`)."""
    world: World
    generators: dict[str, Path]
    rewards: list[Reward]
    real: Tensor
    out: Path


def sweep_context(config: Any, weak: bool = True) -> SweepContext:
    """The shared pieces of a sweep of ``config`` (WorldRunSettings with an ``out``); ``weak``: also the
    weaker generator the off-policy conditions draw from."""
    from transformers.utils import logging as transformers_logging

    from sdpo.rewards.registry import load_reward
    from sdpo.toy.world import get_world

    transformers_logging.disable_progress_bar()  # one bar per loaded model, hundreds per sweep
    world = get_world(config.world, config.toy_overrides)
    if not isinstance(world, PretrainedWorld):  # both embedded worlds are: the weak generator needs its config
        raise TypeError(f"world {config.world!r} has no pretraining config")
    base = world.pretrain(config.cache_root, config.progress)
    generators = {"base": base}
    if weak:
        weak_world = get_world(config.world, weak_overrides(config.toy_overrides, world.config.train_steps,
                                                             world.config.seed))
        generators["weak"] = weak_world.pretrain(config.cache_root, config.progress)
    held_out = (load_reward("digits", split="held_out", seed=1, hidden=32) if config.world == "image"
                else load_reward("moving-digits", split="held_out", seed=1, hidden=32))
    return SweepContext(config, world, generators, [world.reward(), held_out], world.real("held_out"), Path(config.out))


def _cell_data(context: SweepContext, condition: str, seed: int, samples: bool = False) -> Path:
    config = context.config
    return condition_cache(
        condition, context.generators, context.world, context.out / "data" / f"seed-{seed}",
        prompts=context.world.prompts(config.pairs_per_digit), per_prompt=config.samples_per_prompt, seed=seed,
        num_inference_steps=config.num_inference_steps, batch_size=512, progress=config.progress, samples=samples)


def evaluate_cell(context: SweepContext, runs: Mapping[str, str | Path], seed: int, out: Path) -> dict[str, Any]:
    """One cell's runs against the base on the sweep's rewards and quality guard (also ``sdpo bench online``'s)."""
    from sdpo.models.registry import load_spec
    from sdpo.stages.evaluate import evaluate
    from sdpo.stages.generate import SamplerSettings

    config, world = context.config, context.world
    result = evaluate(
        load_spec(world.family, context.generators["base"]), world.prompts(config.eval_per_digit), dict(runs),
        context.rewards, out, seed=10_000 + seed, sampler=SamplerSettings(config.num_inference_steps,
                                                                          world.guidance_scale),
        batch_size=512, quality=lambda media: world.quality(media, context.real), progress=config.progress)
    return result.as_dict()


def _run_cell(context: SweepContext, condition: str, seed: int) -> dict[str, Any]:
    """Train every arm on one condition's pairs (KTO: their members, unpaired) for one seed, evaluate them
    together; cached on disk."""
    from sdpo.data import CachedPairs, CachedSamples
    from sdpo.models.registry import load_spec
    from sdpo.train.trainer import train

    config = context.config
    folder = context.out / "cells" / condition / f"seed-{seed}"
    done = folder / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # a cell killed half-way is redone whole
    start = time.perf_counter()
    arms = config.arms()
    unpaired = any(arm.method_config(config.num_inference_steps).unpaired for arm in arms)
    cache = _cell_data(context, condition, seed, samples=unpaired)
    dataset = CachedPairs(cache)
    samples = CachedSamples(samples_cache_of(cache)) if unpaired else None
    runs, histories = {}, {}
    for arm in arms:
        run = folder / "runs" / arm.label
        kto = arm.method_config(config.num_inference_steps).unpaired
        data, data_dir = (samples, samples_cache_of(cache)) if kto else (dataset, cache)
        result = train(_train_config(config, arm, seed, config.steps, data_dir, run),
                       spec=load_spec(context.world.family, context.generators["base"]), dataset=data,
                       progress=config.progress)
        runs[arm.label], histories[arm.label] = run, result.history
    evaluation = evaluate_cell(context, runs, seed, folder / "evaluation")
    cell = {"condition": condition, "seed": seed, "pairs": len(dataset), "evaluation": evaluation,
            "histories": histories, "wall_s": time.perf_counter() - start}
    done.write_text(json.dumps(cell, default=str))
    return cell


def _run_long(context: SweepContext, seed: int) -> dict[str, Any]:
    """The core methods at the default beta, trained to ``long_steps`` and evaluated every ``long_every``."""
    from sdpo.data import CachedPairs
    from sdpo.models.registry import load_spec
    from sdpo.train.trainer import train

    config = context.config
    folder = context.out / "long" / f"seed-{seed}"
    done = folder / "long.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    cache = _cell_data(context, config.long_condition, seed)
    # The weighted-DPO family only: the long arm asks whether the weights matter later in training.
    arms = [Arm(method, method, config.default_beta) for method in config.methods if method not in OWN_LOSS_METHODS]
    points: dict[str, Any] = {}
    for steps in range(config.long_every, config.long_steps + 1, config.long_every):
        runs = {}
        for arm in arms:
            run = folder / "runs" / arm.label
            # A longer max_steps is a safe change on resume: the run continues where it stopped.
            train(_train_config(config, arm, seed, steps, cache, run, keep_checkpoint=True), dataset=CachedPairs(cache),
                  spec=load_spec(context.world.family, context.generators["base"]), progress=config.progress,
                  resume="latest")
            runs[arm.label] = run
        points[str(steps)] = evaluate_cell(context, runs, seed, folder / f"evaluation-{steps:05d}")
    long = {"seed": seed, "condition": config.long_condition, "points": points, "wall_s": time.perf_counter() - start}
    done.write_text(json.dumps(long, default=str))
    return long


def run_bench(config: BenchConfig) -> Path:
    """Run (or resume) the sweep and write results.json, table.md and the plots; returns the folder."""
    out = Path(config.out)
    settings = config_dict(config)
    claim_folder(out, settings)
    context = sweep_context(config)
    cells = [_run_cell(context, condition, seed) for condition in config.conditions for seed in range(config.seeds)]
    long = [_run_long(context, seed) for seed in range(config.long_seeds)] if config.long_steps else []
    # The cells' own times: a resumed sweep reports the work of every run, not the last one's.
    write_report(out, settings, cells, long, wall_s=sum(part.get("wall_s", 0.0) for part in cells + long))
    return out


SETTINGS_FILE = "settings.json"
"""The sweep's settings, written first: a rerun resumes only a sweep with the same settings."""
_NOT_SETTINGS = ("out", "progress", "cache_root")


def claim_folder(out: Path, config: dict[str, Any]) -> None:
    """Create ``out`` for this sweep, or check that the sweep it holds has the same settings."""
    from sdpo.files import write_atomic

    settings = {k: v for k, v in json.loads(json.dumps(config)).items() if k not in _NOT_SETTINGS}
    path = out / SETTINGS_FILE
    if path.is_file():
        held = json.loads(path.read_text())
        changed = [f"{k}: {held.get(k)!r} -> {v!r}" for k, v in settings.items() if held.get(k) != v]
        if changed:
            raise InputError(f"{out} holds a sweep with other settings ({'; '.join(changed[:3])}); "
                             "use another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a bench folder; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=1))


def config_dict(config: BenchConfig) -> dict[str, Any]:
    """The settings as JSON-ready data (what results.json records)."""
    return {**asdict(config), "arms": [arm.label for arm in config.arms()], "versus": config.versus()}
