"""`sdpo bench online`: offline pairs against online rounds, at the same sample and step budget.

Refreshing the pairs from the current policy is the direct cure for the off-policy bias the
importance weights correct for cheaply. For each seed and method (Diffusion-DPO and SDPO by default):

* ``offline``: R groups of K candidates per prompt from the base (seeds s+0 ... s+R-1), best vs worst of
  each group (R pairs per prompt), one LoRA trained R x N steps on all of them;
* ``online``: `sdpo online` with R rounds of K candidates per prompt from the current policy, N steps a
  round, each round continuing the previous round's LoRA on every round's pairs so far;
* ``online:grpo`` (with ``grpo`` set): `sdpo online` with ``method: grpo``, the same R rounds of K
  candidates per prompt (so the same reward calls) and N optimizer steps a round, each of ``batch_size``
  (trajectory, step) members.

Both arms generate the same number of candidates, build the same number of pairs, take the same
number of optimizer steps and start from the same round-0 candidates (the base, seed s). All arms and
the base are then sampled from the same held-out noise and scored by the world's reward, the held-out
second scorer and the quality guard, as in `sdpo bench methods`. Wall time covers generation,
scoring, pairs, precompute and training (the offline data is built once and shared by the methods,
and counted in each).

A killed run resumes: every seed whose ``seed.json`` is written is kept.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpo.errors import InputError
from sdpo.objectives import METHODS, MethodName
from sdpo.toy.settings import WorldRunSettings

if TYPE_CHECKING:
    from sdpo.bench.methods import SweepContext
    from sdpo.data.pairs import PreferencePair

SOURCES = ("offline", "online")
"""Where an arm's pairs come from: the base model only, or each round's current policy."""
GRPO_ARM = "online:grpo"
"""The label of the GRPO arm (``OnlineBenchConfig.grpo``)."""


@dataclass
class OnlineBenchConfig(WorldRunSettings):
    """Settings of `sdpo bench online` (the defaults are the full run; ``quick()`` the test-sized one); the
    world, data sizes (``samples_per_prompt`` is K per round), LoRA recipe and evaluation are
    ``WorldRunSettings``."""

    methods: tuple[MethodName, ...] = ("diffusion-dpo", "sdpo")
    """Methods trained from each source (MethodConfig presets)."""
    beta: float = 2000.0
    """Objective temperature of every arm."""
    seeds: int = 3
    """Seeds: each has its own candidates, training draws and evaluation noise."""
    rounds: int = 3
    """Rounds R (online), or groups of candidates from the base (offline)."""
    steps_per_round: int = 100
    """Optimizer steps N per round (the warm-up restarts each online round); offline trains R x N in one run."""
    out: str = "outputs/bench-online"
    """Output folder (a rerun resumes the seeds it holds)."""
    grpo: dict[str, Any] | None = None
    """GRPO settings (``sdpo.rl.config.GrpoConfig`` fields) of an ``online:grpo`` arm; None: no GRPO arm."""
    grpo_learning_rate: float | None = None
    """The GRPO arm's LoRA learning rate (None: ``learning_rate``, the preference arms')."""

    def __post_init__(self) -> None:
        self.check_shared()
        self.methods = tuple(self.methods)
        if not self.methods:
            raise InputError("methods must name at least one method")
        for method in self.methods:
            if method not in METHODS:
                raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            if method == "kto":
                raise InputError("method kto trains on labelled samples; the online rounds build pairs")
        for name in ("seeds", "rounds", "steps_per_round"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not self.beta > 0:
            raise InputError(f"beta must be positive, got {self.beta}")
        if self.grpo is not None:
            from sdpo.rl.config import GrpoConfig

            GrpoConfig.from_dict(self.grpo)
        if self.grpo_learning_rate is not None and not self.grpo_learning_rate > 0:
            raise InputError(f"grpo_learning_rate must be positive, got {self.grpo_learning_rate}")

    @classmethod
    def quick(cls, **overrides: Any) -> OnlineBenchConfig:
        """The test-sized run: two seeds, two rounds of a few steps on a few prompts."""
        settings: dict[str, Any] = dict(seeds=2, rounds=2, steps_per_round=3, pairs_per_digit=1, eval_per_digit=2,
                                        batch_size=4, samples_per_prompt=2, num_inference_steps=4)
        settings.update(overrides)
        return cls(**settings)

    def labels(self) -> list[str]:
        """Arm labels, "source:method"."""
        grpo = [GRPO_ARM] if self.grpo is not None else []
        return [f"{source}:{method}" for source in SOURCES for method in self.methods] + grpo

    def _train(self, method: str, seed: int) -> dict[str, Any]:
        """TrainConfig fields of every arm (family, folders and max_steps are set per arm)."""
        return {"method": {"name": method, "beta": self.beta, "num_inference_steps": self.num_inference_steps},
                "lora_rank": self.lora_rank, "learning_rate": self.learning_rate,
                "lr_schedule": "constant_with_warmup", "lr_warmup_steps": min(20, self.steps_per_round // 10),
                "train_batch_size": self.batch_size, "log_every": 1, "seed": seed, "report_to": "none",
                "checkpoint_every": 0}


def _offline_cache(context: SweepContext, config: OnlineBenchConfig, seed: int, folder: Path) -> Path:
    """R groups of K base candidates per prompt, best vs worst of each, in one precompute cache."""
    from sdpo.data import precompute, read_pairs
    from sdpo.models.registry import load_spec
    from sdpo.stages.generate import SamplerSettings, generate
    from sdpo.stages.pairs import build_pairs
    from sdpo.stages.score import score

    world, base = context.world, context.generators["base"]
    video = world.family == "toy-video"
    pairs: list[PreferencePair] = []
    for r in range(config.rounds):
        out = folder / f"candidates-{r:02d}"
        generate(load_spec(world.family, base), world.prompts(config.pairs_per_digit), out,
                 per_prompt=config.samples_per_prompt, seed=_data_seed(seed) + r,
                 sampler=SamplerSettings(config.num_inference_steps, world.guidance_scale), batch_size=512,
                 progress=config.progress, frame_folders=video, mp4=not video)
        score(out, [world.reward()], batch_size=512, progress=config.progress)
        built = build_pairs(out, "best-worst", frames=video, out=folder / f"pairs-{r:02d}.jsonl")
        pairs += read_pairs(built.out)
    return precompute(pairs, load_spec(world.family, base), folder / "cache", batch_size=512,
                      progress=config.progress, overwrite=True)


def _data_seed(seed: int) -> int:
    """Candidate seed of round 0 for a bench seed; round r uses this + r (spaced so seeds never share)."""
    return 1000 * seed


def _offline(context: SweepContext, config: OnlineBenchConfig, seed: int, folder: Path) -> tuple[dict[str, Path], dict]:
    from sdpo.data import CachedPairs
    from sdpo.models.registry import load_spec
    from sdpo.train.config import TrainConfig
    from sdpo.train.trainer import train

    world, base = context.world, context.generators["base"]
    start = time.perf_counter()
    cache = _offline_cache(context, config, seed, folder / "offline")
    data_s = time.perf_counter() - start
    runs, seconds = {}, {}
    for method in config.methods:
        start = time.perf_counter()
        run = folder / "offline" / "runs" / method
        train(TrainConfig.from_dict({**config._train(method, seed), "family": world.family, "pretrained": str(base),
                                     "cache_dir": str(cache), "output_dir": str(run),
                                     "max_steps": config.rounds * config.steps_per_round}),
              spec=load_spec(world.family, base), dataset=CachedPairs(cache), progress=config.progress)
        runs[f"offline:{method}"], seconds[f"offline:{method}"] = run, data_s + time.perf_counter() - start
    return runs, seconds


def _online(context: SweepContext, config: OnlineBenchConfig, seed: int, folder: Path) -> tuple[dict[str, Path], dict]:
    from sdpo.stages.online import OnlineConfig, run_online

    world = context.world
    prompts, held_out = folder / "prompts.txt", folder / "eval-prompts.txt"
    prompts.write_text("\n".join(world.prompts(config.pairs_per_digit)) + "\n")
    held_out.write_text("\n".join(world.prompts(1)) + "\n")  # required by the stage; rounds are not evaluated
    runs, seconds = {}, {}
    for method in config.methods:
        start = time.perf_counter()
        stage = OnlineConfig(
            family=world.family, pretrained=str(context.generators["base"]), prompts=str(prompts),
            eval_prompts=str(held_out), reward=world.reward().name, out=str(folder / "online" / method),
            rounds=config.rounds, per_prompt=config.samples_per_prompt, steps=config.steps_per_round,
            train=config._train(method, seed), num_inference_steps=config.num_inference_steps,
            guidance_scale=world.guidance_scale, batch_size=512, seed=_data_seed(seed), evaluate_rounds=False,
            progress=config.progress)
        runs[f"online:{method}"] = run_online(stage)[-1]
        seconds[f"online:{method}"] = time.perf_counter() - start
    if config.grpo is not None:
        start = time.perf_counter()
        train = {**config._train(config.methods[0], seed), "method": {"name": "sdpo"},  # unused by GRPO
                 "learning_rate": config.grpo_learning_rate or config.learning_rate}
        stage = OnlineConfig(
            family=world.family, pretrained=str(context.generators["base"]), prompts=str(prompts),
            eval_prompts=str(held_out), reward=world.reward().name, out=str(folder / "online" / "grpo"),
            rounds=config.rounds, per_prompt=config.samples_per_prompt, steps=config.steps_per_round, train=train,
            num_inference_steps=config.num_inference_steps, guidance_scale=world.guidance_scale, batch_size=512,
            seed=_data_seed(seed), evaluate_rounds=False, progress=config.progress, method="grpo",
            grpo=dict(config.grpo))
        runs[GRPO_ARM] = run_online(stage)[-1]
        seconds[GRPO_ARM] = time.perf_counter() - start
    return runs, seconds


def _run_seed(context: SweepContext, config: OnlineBenchConfig, seed: int) -> dict[str, Any]:
    """Every arm of one seed, evaluated together; cached as seed.json."""
    from sdpo.bench.methods import evaluate_cell

    folder = Path(config.out) / f"seed-{seed}"
    done = folder / "seed.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # a seed killed half-way is redone whole
    folder.mkdir(parents=True)
    offline_runs, offline_s = _offline(context, config, seed, folder)
    online_runs, online_s = _online(context, config, seed, folder)
    runs = {**offline_runs, **online_runs}
    evaluation = evaluate_cell(context, runs, seed, folder / "evaluation")
    record = {"seed": seed, "evaluation": evaluation, "wall_s": {**offline_s, **online_s},
              "runs": {label: str(path) for label, path in runs.items()}}
    done.write_text(json.dumps(record, default=str))
    return record


def candidate_rewards(config: OnlineBenchConfig, seed: int) -> dict[str, list[float]]:
    """Mean ``total`` score of the candidates generated in each round: the base's for the offline data
    (one list, shared by its methods), the current policy's for each online arm."""
    folder = Path(config.out) / f"seed-{seed}"

    def mean_total(candidates: Path) -> float:
        totals = [json.loads(line)["total"] for line in (candidates / "candidates.jsonl").read_text().splitlines()]
        return sum(totals) / len(totals)

    found = {"offline": [mean_total(folder / "offline" / f"candidates-{r:02d}") for r in range(config.rounds)]}
    arms: dict[str, str] = {f"online:{method}": method for method in config.methods}
    if config.grpo is not None:
        arms[GRPO_ARM] = "grpo"
    for label, name in arms.items():
        found[label] = [mean_total(folder / "online" / name / f"round-{r:02d}" / "candidates")
                        for r in range(config.rounds)]
    return found


def run_online_bench(config: OnlineBenchConfig) -> Path:
    """Run (or resume) every seed and write results.json and table.md; returns the output folder."""
    from sdpo.bench.methods import claim_folder, sweep_context
    from sdpo.bench.online_report import write_online_report

    out = Path(config.out)
    claim_folder(out, asdict(config))
    context = sweep_context(config, weak=False)  # the world, base, scorers and real data of `sdpo bench methods`
    seeds = [_run_seed(context, config, seed) for seed in range(config.seeds)]
    rounds = [candidate_rewards(config, seed) for seed in range(config.seeds)]
    write_online_report(out, asdict(config), config.labels(), seeds, rounds)
    return out


__all__ = ["GRPO_ARM", "SOURCES", "OnlineBenchConfig", "run_online_bench"]
