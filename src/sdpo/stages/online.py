"""`sdpo online CONFIG`: rounds of on-policy pairs, the direct cure for off-policy bias.

Round r (folder ``round-{r:02d}/`` of ``out``) runs the library's stages as ``sdpo demo`` does:
generate K candidates per prompt from the current policy (the base with round r-1's LoRA; the base in
round 0) -> score -> pairs -> precompute -> train N steps -> evaluate on held-out prompts. Every stage
is skipped when its output is there (each is written atomically or resumes itself), so a killed run
resumes at the round and stage where it stopped.

The reference is always the base. With ``warm_start`` (the default) round r's LoRA starts from round
r-1's weights, so the policy keeps improving and has trained R x N steps after R rounds; without it,
every round trains a fresh LoRA. ``keep_pairs`` decides whether a round sees the pairs of every round
so far or of its own round only.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from sdpo.errors import ConfigError, InputError, MissingFileError, SdpoError
from sdpo.files import write_atomic
from sdpo.stages.processes import on_main_process

Reference = Literal["base", "previous"]
"""What an online run's reference model can be (``OnlineConfig.reference``)."""
OnlineMethod = Literal["preference", "grpo"]
"""How an online round learns from its scored candidates (``OnlineConfig.method``)."""

DONE = ".done"
"""Marker written (atomically) after a stage whose output folder has no completion mark of its own."""


@dataclass
class OnlineConfig:
    """Settings of `sdpo online` (a YAML file of these fields)."""

    family: str
    """Model family (sd, sdxl, cogvideox, wan, or an embedded world's: toy, toy-video)."""
    pretrained: str
    """Base model folder or hub id."""
    prompts: str
    """Training prompts file (one per line, or JSONL with 'prompt')."""
    eval_prompts: str
    """Held-out prompts file for each round's evaluation."""
    reward: str
    """Reward registry name used to score candidates and evaluations."""
    out: str = "outputs/online"
    """Output folder; holds round-00/, round-01/, ..."""
    rounds: int = 2
    """Number of rounds R."""
    per_prompt: int = 4
    """Candidates K per prompt per round."""
    steps: int = 100
    """Optimizer steps N per round."""
    reference: Reference = "base"
    """Reference model: "base" (the only one implemented; "previous" needs the trainer to start from a LoRA)."""
    keep_pairs: bool = True
    """Train each round on the pairs of all rounds so far (true) or of its own round only (false)."""
    warm_start: bool = True
    """Start each round's LoRA from the previous round's weights (true) or from a fresh adapter (false)."""
    evaluate_rounds: bool = True
    """Evaluate every round's policy on the held-out prompts (false: no evaluation; e.g. a benchmark
    that evaluates the last policy itself, with its own noise)."""
    reward_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the reward's factory."""
    train_config: str | None = None
    """Base training YAML (a TrainConfig); family, pretrained, cache_dir, output_dir and max_steps are set here."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields overriding those of ``train_config``."""
    num_inference_steps: int = 50
    """Sampler steps for candidates and evaluation."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale."""
    batch_size: int = 8
    """Generate / score / precompute / evaluate batch size."""
    eval_per_prompt: int = 1
    """Evaluation samples per held-out prompt."""
    seed: int = 0
    """Run seed; round r generates with seed + r (fresh noise each round)."""
    progress: bool = False
    """Show progress bars."""
    method: OnlineMethod = "preference"
    """"preference": best-vs-worst pairs -> precompute -> ``train.method`` (Diffusion-DPO, SDPO, ...);
    "grpo": the candidates are sampled with a stochastic sampler whose trajectories are recorded, and
    the update is GRPO on them (settings in ``grpo``; the group is the ``per_prompt`` candidates of a prompt;
    each round trains on its own trajectories only, so ``keep_pairs`` does not apply)."""
    grpo: dict[str, Any] = field(default_factory=dict)
    """GRPO settings (``sdpo.rl.config.GrpoConfig``: noise_level, clip_range, kl_coefficient, select,
    train_steps, window_start, noise_steps); only with ``method: grpo``."""

    def __post_init__(self) -> None:
        from sdpo.stages.checks import check_config_types

        check_config_types(self, "online config")  # strictly: the string "false" is not a bool
        if self.reference not in get_args(Reference):
            choices = " or ".join(repr(choice) for choice in get_args(Reference))
            raise InputError(f"reference must be {choices}, got {self.reference!r}")
        if self.reference == "previous":
            raise InputError("reference: previous is not implemented yet (the reference is the base; "
                         "warm_start: true continues the policy from round to round)")
        for name in ("rounds", "steps", "num_inference_steps", "batch_size", "eval_per_prompt"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.per_prompt, int) or self.per_prompt < 2:
            raise InputError(f"per_prompt must be at least 2 (a pair needs two candidates), got {self.per_prompt!r}")
        self._check_method()
        for name in ("prompts", "eval_prompts") + (("train_config",) if self.train_config else ()):
            if not Path(getattr(self, name)).is_file():
                raise MissingFileError(f"{name}: no such file {_shown(getattr(self, name))}")

    def _check_method(self) -> None:
        if self.method not in get_args(OnlineMethod):
            raise InputError(f"method must be {' or '.join(map(repr, get_args(OnlineMethod)))}, got {self.method!r}")
        if self.method != "grpo":
            if self.grpo:
                raise InputError("grpo settings are given but method is not grpo (set method: grpo)")
            return
        from sdpo.models.registry import spec_class

        if not callable(getattr(spec_class(self.family), "decode_latents", None)):
            raise InputError(f"method: grpo needs the {self.family} spec to decode latents (decode_latents), "
                             f"which it does not implement yet")
        rollout = self.grpo_config.rollout(self.num_inference_steps, self.guidance_scale)
        rollout.check("flow")  # the DDIM bound (one step fewer) is checked once the model's schedule is known

    @property
    def grpo_config(self) -> Any:
        """The ``grpo`` section, validated (``sdpo.rl.config.GrpoConfig``)."""
        from sdpo.rl.config import GrpoConfig

        try:
            return GrpoConfig.from_dict(self.grpo)
        except TypeError as error:
            raise InputError(f"grpo: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> OnlineConfig:
        """The config of a YAML file; an unknown, missing or bad field is one line naming the file."""
        import dataclasses

        from sdpo.train.config import read_config_file

        data = read_config_file(path)
        names = [key for key in data if not isinstance(key, str)]
        if names:
            raise ConfigError(f"{path}: field names must be strings, got {names[0]!r:.40}")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            raise InputError(f"{path}: unknown online config field(s) {', '.join(unknown)}")
        missing = [f.name for f in fields if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{path}: missing online config field(s) {', '.join(missing)}")
        _check_finite_values(path, data)
        try:
            return cls(**data)
        except SdpoError as error:  # name the file the bad value came from
            raise type(error)(f"{path}: {str(error).removeprefix('online config: ')}") from None


def _shown(path: str) -> str:
    """A path for a one-line message: as typed, or quoted when it holds a line break or another control."""
    return path if path.isprintable() else repr(path)


def _check_finite_values(path: str | Path, value: Any, field: str = "") -> None:
    """No NaN or inf anywhere in the config, nested ``train`` and ``reward_options`` mappings included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: {field} must be a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite_values(path, item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_finite_values(path, item, f"{field}[{index}]")


def _train_config(config: OnlineConfig, cache_dir: Path, output_dir: Path, previous: Path | None = None) -> Any:
    from sdpo.train.config import TrainConfig, read_config_file

    data = read_config_file(config.train_config) if config.train_config else {}
    data.update(config.train)
    data.update(family=config.family, pretrained=config.pretrained, cache_dir=str(cache_dir),
                output_dir=str(output_dir), max_steps=config.steps, seed=data.get("seed", config.seed))
    if config.warm_start and previous is not None:
        data["init_lora"] = str(previous)
    return TrainConfig.from_dict(data)


def _round(config: OnlineConfig, r: int, prompts: list[str], eval_prompts: list[str], reward: Any,
           settings: dict[str, Any] | None = None, rescore: bool = False) -> Path:
    """One round's stages, each skipped when done; returns its LoRA run folder. ``settings``: written to the
    online folder's marker once round 0's candidates exist; ``rescore``: score them again first."""
    from sdpo.folders import write_marker
    from sdpo.models.registry import load_spec
    from sdpo.stages.generate import SamplerSettings, generate
    from sdpo.stages.score import score

    out = Path(config.out)
    folder = out / f"round-{r:02d}"
    previous = out / f"round-{r - 1:02d}" / "run" if r > 0 else None
    sampler = SamplerSettings(config.num_inference_steps, config.guidance_scale)
    spec = load_spec(config.family, config.pretrained)
    video = spec.media_kind == "video"
    rollout = None
    if config.method == "grpo":
        rollout = config.grpo_config.rollout(config.num_inference_steps, config.guidance_scale)
        rollout.check(spec.schedule.prediction_type)
        _warn_gradient_free(rollout, spec.schedule, r)
    generate(spec, prompts, folder / "candidates", per_prompt=config.per_prompt, seed=config.seed + r,
             sampler=sampler, lora=previous, batch_size=config.batch_size, progress=config.progress,
             frame_folders=video, rollout=rollout)
    if settings is not None:  # the first output exists: from here on the folder is bound to these settings
        write_marker(out, "online", settings)
    # Scoring, pairs, the cache and the evaluation write files that every process would write at once
    # under torchrun: process 0 does them, the others wait (training and generation share the work).
    on_main_process("score", lambda: score(
        folder / "candidates", [reward], batch_size=config.batch_size, progress=config.progress,
        reward_options={reward.name: config.reward_options}, rescore=rescore))
    run = folder / "run"
    if rollout is not None:
        _grpo_update(config, folder, run, previous, rollout)
    else:
        _preference_update(config, r, folder, run, previous, video)
    if config.evaluate_rounds:
        on_main_process("evaluate", lambda: evaluate_round(config, folder, run, eval_prompts, reward, sampler))
    return run


def _warn_gradient_free(rollout: Any, schedule: Any, r: int) -> None:
    """Say once (round 0) when the trained window holds a step that cannot learn (see ``gradient_free_steps``)."""
    from sdpo.train.log import warn

    dead = set(rollout.gradient_free_steps(schedule))
    window = set(range(rollout.window_start, rollout.window_start + rollout.train_steps))
    hit = sorted(dead & window) if rollout.select == "window" else sorted(dead)
    if r == 0 and hit:
        warn(f"grpo: sampler step(s) {hit} start at a level with alpha < 1e-3 where this model clips its x0 "
             f"estimate, so their mean has no gradient; set grpo.window_start to {max(hit) + 1}", stacklevel=3)


def _preference_update(config: OnlineConfig, r: int, folder: Path, run: Path, previous: Path | None,
                       video: bool) -> None:
    """Pairs -> precompute -> train ``train.method`` on them (each skipped when done)."""
    from sdpo.data import precompute, read_pairs
    from sdpo.models.registry import load_spec
    from sdpo.stages.pairs import build_pairs
    from sdpo.train.trainer import train

    out = Path(config.out)
    cache = folder / "cache"

    def pairs_and_cache() -> None:
        if not (folder / "pairs.jsonl").is_file():  # build_pairs writes it atomically
            build_pairs(folder / "candidates", "best-worst", frames=video, out=folder / "pairs.jsonl")
        if not (folder / f"cache{DONE}").is_file():
            shutil.rmtree(cache, ignore_errors=True)  # a half-written cache from a killed run
            rounds = range(r + 1) if config.keep_pairs else [r]
            pairs = [pair for k in rounds for pair in read_pairs(out / f"round-{k:02d}" / "pairs.jsonl")]
            precompute(pairs, load_spec(config.family, config.pretrained), cache, batch_size=config.batch_size,
                       progress=config.progress)
            write_atomic(folder / f"cache{DONE}", "")

    on_main_process("pairs and precompute", pairs_and_cache)
    # "latest": a finished run is left as it is, a killed one continues from its last checkpoint
    train(_train_config(config, cache, run, previous), spec=load_spec(config.family, config.pretrained),
          resume="latest", progress=config.progress)


def _grpo_update(config: OnlineConfig, folder: Path, run: Path, previous: Path | None, rollout: Any) -> None:
    """GRPO on this round's scored trajectories, through the trainer (``steps`` optimizer steps; resumable)."""
    from sdpo.models.registry import load_spec
    from sdpo.rl.trajectories import TrajectorySteps
    from sdpo.train.trainer import train

    candidates = folder / "candidates"
    spec = load_spec(config.family, config.pretrained)
    dataset = TrajectorySteps.from_folder(candidates, spec, rollout, config.grpo_config)
    train(_train_config(config, candidates, run, previous), spec=spec, dataset=dataset, resume="latest",
          progress=config.progress)


def evaluate_round(config: OnlineConfig, folder: Path, run: Path, eval_prompts: list[str], reward: Any,
                   sampler: Any) -> None:
    """One round's evaluation: the round's LoRA against the base on the held-out prompts, in ``folder``."""
    from sdpo.models.registry import load_spec
    from sdpo.stages.evaluate import evaluate

    if (folder / "evaluation" / "results.json").is_file():
        return
    evaluate(load_spec(config.family, config.pretrained), eval_prompts, {"online": run}, [reward],
             folder / "evaluation", seed=10_000 + config.seed, sampler=sampler, batch_size=config.batch_size,
             samples_per_prompt=config.eval_per_prompt, progress=config.progress)


GENERATE_FIELDS = ("family", "pretrained", "prompts", "per_prompt", "seed", "num_inference_steps",
                   "guidance_scale", "batch_size", "method", "grpo")
"""Settings round 0's candidates depend on; every other setting changes only what comes after them."""


def online_settings(config: OnlineConfig, prompts: list[str], eval_prompts: list[str], train: Any) -> dict[str, Any]:
    """What defines an online folder's content: the config with the prompt files' prompts and the resolved
    training settings; ``out``, ``progress``, ``rounds`` (more rounds continue the same job) and
    ``evaluate_rounds`` are not part of it."""
    import dataclasses

    skip = {"out", "progress", "rounds", "evaluate_rounds", "train_config", "train"}
    if config.method == "preference":  # as folders made before GRPO recorded them: they still resume
        skip |= {"method", "grpo"}
    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    resolved = {k: v for k, v in train.to_dict().items() if k not in ("output_dir", "cache_dir", "init_lora")}
    return {**data, "prompts": list(prompts), "eval_prompts": list(eval_prompts), "train": resolved}


def _claim(out: Path, settings: dict[str, Any], restart: bool) -> bool:
    """Check a rerun in ``out`` (FolderError naming the first differing field, unless ``restart``); with
    ``restart``, delete what the changed settings make stale. Returns whether round 0 must be rescored."""
    from sdpo.folders import check_replaceable, check_reuse, first_difference, saved_settings, write_marker

    if not restart:
        check_reuse(out, "online", settings, hint="pass --restart to recompute what the new settings change, "
                                                  "or choose another out folder")
        return False
    check_replaceable(out, "online", flag="--restart")
    saved = saved_settings(out, "online") or {}
    keep = bool(saved) and all(first_difference(k, saved.get(k), settings.get(k)) is None for k in GENERATE_FIELDS)
    for folder in sorted(out.glob("round-*")) if out.is_dir() else []:
        if keep and folder.name == "round-00":
            for entry in folder.iterdir():  # round 0's candidates are kept (its generation is unchanged)
                if entry.name != "candidates":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        else:
            shutil.rmtree(folder)
    if keep:
        write_marker(out, "online", settings)
    return keep


def run_online(config: OnlineConfig, restart: bool = False) -> list[Path]:
    """All rounds (resuming where a killed run stopped); returns each round's LoRA run folder.

    A rerun in a used ``out`` continues the same job; other settings are refused (FolderError naming the
    field and both values) unless ``restart``, which recomputes what they change: every round, keeping
    only round 0's candidates when what they depend on (GENERATE_FIELDS) is unchanged (they are scored again).
    """
    from sdpo.rewards.registry import load_reward
    from sdpo.stages.records import read_prompts

    out = Path(config.out)
    checked = _train_config(config, out / "cache", out / "run")  # every training setting, before any work
    if config.warm_start and checked.lora_rank == 0:
        raise InputError("warm_start needs LoRA training (lora_rank > 0); set warm_start: false to fine-tune "
                         "the full denoiser afresh each round")
    if config.method == "preference" and checked.method.unpaired:
        raise InputError(f"train.method {checked.method.name} trains on labelled samples, and online rounds build "
                         "pairs: choose a pair method (diffusion-dpo, dpo-cm, sdpo, mapo) or method: grpo")
    prompts, eval_prompts = read_prompts(config.prompts), read_prompts(config.eval_prompts)
    settings = online_settings(config, prompts, eval_prompts, checked)
    rescore = on_main_process("checking the out folder", lambda: _claim(out, settings, restart))
    reward = load_reward(config.reward, **config.reward_options)
    return [_round(config, r, prompts, eval_prompts, reward, settings if r == 0 else None, rescore and r == 0)
            for r in range(config.rounds)]


__all__ = ["OnlineConfig", "run_online"]
