"""The training configuration: one dataclass, one docstring per field, validated in one place.

Values are coerced by each field's type annotation (``sdpo.train.coercion``), so numbers work in the
forms people write them: PyYAML reads ``1e-4`` as a string, and ``--set learning_rate=1e-4`` does too.
Every bad value ends in a one-line InputError naming the field.

Overrides (``sdpo train --set``) apply to the mapping the user wrote, before the method preset is
expanded (`apply_overrides`): ``--set method.name=diffusion-dpo`` gives Diffusion-DPO's defaults plus
only the method keys written in the file or on the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from sdpo.errors import ConfigError, InputError, MissingFileError
from sdpo.objectives import MethodConfig
from sdpo.train.coercion import check_choice, check_keys, coerce, field_names, one_line, show, type_hints
from sdpo.train.lora_targets import check_lora_targets

# The settings that name one of a few choices: each field's type is its Literal, the tuples are derived.
LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]
Tracker = Literal["tensorboard", "wandb", "all", "none"]
PairWeighting = Literal["none", "gap"]
LatentSampling = Literal["auto", "mean", "sample"]
Flip = Literal["none", "pair", "independent"]
LR_SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)
MIXED_PRECISION: tuple[MixedPrecision, ...] = get_args(MixedPrecision)
TRACKERS: tuple[Tracker, ...] = get_args(Tracker)
PAIR_WEIGHTINGS: tuple[PairWeighting, ...] = get_args(PairWeighting)
LATENT_SAMPLING: tuple[LatentSampling, ...] = get_args(LatentSampling)
FLIPS: tuple[Flip, ...] = get_args(Flip)


@dataclass
class TrainConfig:
    """Everything `sdpo train` needs. Load with `TrainConfig.from_file(path)` or `TrainConfig.from_dict(mapping)`."""

    family: str = "sd"
    """Model family: "sd", "sdxl", "cogvideox", "wan" (or "toy", the embedded demo model)."""
    pretrained: str = ""
    """Local diffusers model folder or hub id of the base model."""
    cache_dir: str = ""
    """Precompute cache made by `sdpo precompute` (latents and text embeddings of the pairs)."""
    output_dir: str = "outputs/run"
    """Where checkpoints, logs and the final LoRA / model are written."""
    method: MethodConfig = field(default_factory=lambda: MethodConfig.preset("sdpo"))
    """The preference objective: a preset name plus overrides (beta, estimator, clip, mask, ...). In a
    file, a mapping whose ``name`` (default "sdpo") picks the preset the other keys override."""

    lora_rank: int = 16
    """LoRA rank; 0 trains the full denoiser against a frozen reference copy."""
    lora_alpha: float | None = None
    """LoRA scale numerator (alpha / rank scales the update); None means alpha = rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | str | None = None
    """Layers LoRA adapts: a list of module names (a name matches a module whose full name is it or
    ends with "." + it, as in peft) or one regular expression matched against full module names.
    None: the family default, ``spec.lora_target_modules()``: the attention projections to_q, to_k,
    to_v, to_out.0 and the feed-forward projections (ff.net.0.proj, ff.net.2 on SD / SDXL /
    CogVideoX and the toy models; ffn.net.0.proj, ffn.net.2 on Wan), those present in the denoiser.
    The feed-forward layers are included because preference tuning moves style and detail, which
    they carry; ["to_q", "to_k", "to_v", "to_out.0"] adapts attention only (about half the
    trainable parameters and a little less memory). Checked against the denoiser when it loads."""
    init_lora: str | None = None
    """A finished LoRA run folder (its ``pytorch_lora_weights.safetensors``) whose adapter weights
    training starts from, instead of the random initialisation; it must have this run's rank and
    targets. The reference stays the base model. ``sdpo online`` uses it to continue a policy from
    round to round. None: a fresh adapter."""

    learning_rate: float = 1e-4
    """Peak learning rate (AdamW)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    use_8bit_adam: bool = False
    """Use bitsandbytes' 8-bit AdamW (needs `pip install bitsandbytes` and a GPU)."""
    lr_schedule: LrSchedule = "constant_with_warmup"
    """One of constant, constant_with_warmup, linear, cosine."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 disables clipping (the norm is still logged)."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the trained weights (the LoRA adapters, or the whole
    denoiser when lora_rank is 0), kept by diffusers' ``EMAModel`` beside them, saved in every checkpoint
    and exported to ``OUTPUT/ema/`` in the same format as the raw weights; 0 keeps none. The average is
    updated after each applied optimizer step (a step the non-finite guard skips leaves it alone), with
    ``EMAModel``'s warm-up: the first update copies the weights, update n uses ``min(ema_decay, n / (9 + n))``.
    Costs one float32 copy of the trained weights on the device."""
    ema_warmup: bool = False
    """Use ``EMAModel``'s power warm-up instead: update n decays by ``min(ema_decay, 1 - n ** -ema_power)``
    (its ``use_ema_warmup`` with ``inv_gamma`` 1)."""
    ema_power: float = 2 / 3
    """Exponent of the power warm-up (``ema_warmup`` only); diffusers suggests 2/3 for a million steps, 3/4
    for shorter runs (0.999 after 10k steps)."""
    pair_weighting: PairWeighting = "none"
    """Per-pair multiplier on the preference loss: "none", or "gap": each pair weighs its score gap (the
    ``gap`` that `sdpo pairs` writes and precompute stores) divided by the mean gap over the cache, so the
    loss keeps its scale and clearly ranked pairs count more (as VideoDPO weights pairs by their score gap)."""

    max_steps: int = 1000
    """Optimizer steps to train."""
    train_batch_size: int = 4
    """Pairs per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step. Global batch = train_batch_size x processes x this."""
    mixed_precision: MixedPrecision = "no"
    """"no", "fp16" or "bf16"; frozen weights are cast to it, trainable ones stay float32."""
    gradient_checkpointing: bool | Literal["auto"] = False
    """Trade compute for memory in the denoiser: recompute each block's activations in the backward pass
    instead of keeping them (about one more forward per step). true, false, or "auto": on one CUDA device,
    one probe step without checkpointing measures the peak memory before training, and checkpointing
    stays off only when that peak plus the optimizer state fits the free memory with 10% to spare (a
    probe that runs out of memory turns it on); on under FSDP, DeepSpeed or several processes (no probe
    there); off on a CPU (host memory has no peak counter, and the CPU-sized runs fit). The decision is
    logged (``sdpo.train.checkpointing_choice``)."""
    t_min: int = 0
    """Smallest training timestep index drawn."""
    t_max: int | None = None
    """Largest training timestep index drawn (None: the last one)."""
    seed: int = 0
    """Seeds initialisation, data order, timesteps and noise (each pair's draw depends only on the
    seed, the step and its global index, so runs are identical across process counts and resumes)."""
    latent_sampling: LatentSampling = "auto"
    """Which latent of each cached image or clip a step trains on: "mean" (the VAE posterior's mean,
    the same every step), "sample" (a fresh ``mean + std * eps`` each step, as diffusers' Diffusion-DPO
    scripts get from ``vae.encode(x).latent_dist.sample()``; needs a cache that stores the std) or
    "auto" (sample when the cache stores the std, else the mean). Caches made by ``sdpo precompute`` for
    the VAE families store it; older caches, and the toy worlds (whose encoder is deterministic), do not,
    so "auto" trains on the mean there, as before. eps is drawn per (seed, step, pair, member)."""
    flip: Flip = "none"
    """Horizontal-flip augmentation of the latents, drawn per (seed, step, pair): "none"; "pair" mirrors
    winner and loser together (one coin per pair: the comparison stays between two images of the
    same composition, so the preference signal is about content, not orientation; diffusers' SDXL
    Diffusion-DPO script flips the stacked pair so); "independent" gives each member its own coin (as
    diffusers' SD 1.5 script, which flips each image as it loads it). The flip reverses the last
    latent axis, the width in every family's layout (every frame of a clip alike): for convolutional
    VAEs the latent of a mirrored image is close to the mirrored latent, not equal to it. Off by
    default: mirroring is wrong where orientation is content (text, digits, "on the left" prompts),
    and turning it on changes what a run trains on."""

    log_every: int = 10
    """Optimizer steps between logged metrics."""
    checkpoint_every: int = 0
    """Optimizer steps between resumable checkpoints (0: only at the end)."""
    checkpoints_total_limit: int | None = 2
    """Keep at most this many checkpoints (None keeps all)."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts sampled with the family's diffusers pipeline (the embedded worlds: their own sampler) during
    training (empty: none)."""
    validation_every: int = 0
    """Optimizer steps between validation samples (0: only after the last step, if prompts are set)."""
    validation_inference_steps: int = 25
    """Sampler steps of the validation pipeline."""
    validation_guidance_scale: float | None = None
    """Classifier-free guidance of validation samples (None: the pipeline's or embedded world's default)."""
    report_to: Tracker = "tensorboard"
    """Experiment tracker: tensorboard, wandb, all or none (metrics.jsonl is always written)."""
    max_bad_steps: int = 10
    """Consecutive optimizer steps with a non-finite loss or gradient norm after which the run stops
    (each such step is skipped: no update, logged to bad_steps.jsonl); the last good weights are
    checkpointed first. fp16's loss scaler overflows a few times at the start: keep this above ~5."""
    offload_reference: bool = False
    """Full fine-tuning only: keep the frozen reference (a copy in the trained weights' dtype) on the CPU
    between uses. Under FSDP the reference is sharded like the policy instead (offload with FSDP's
    ``fsdp_offload_params``)."""

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML reads an unquoted `no` (accelerate's spelling) as false
            self.mixed_precision = "no"
        hints = type_hints(type(self))
        for item in fields(self):
            if item.name != "method":
                setattr(self, item.name, coerce(item.name, hints[item.name], getattr(self, item.name)))
        self.method = method_from_dict(self.method)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (types are already coerced)."""
        for name in ("max_steps", "train_batch_size", "gradient_accumulation_steps", "log_every",
                     "validation_inference_steps", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("lora_rank", "lr_warmup_steps", "checkpoint_every", "t_min", "validation_every"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("learning_rate", "adam_epsilon"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        check_choice("lr_schedule", self.lr_schedule, LrSchedule)
        check_choice("mixed_precision", self.mixed_precision, MixedPrecision)
        check_choice("report_to", self.report_to, Tracker)
        check_choice("pair_weighting", self.pair_weighting, PairWeighting)
        if self.gradient_checkpointing not in (True, False, "auto"):  # coerced: a bool or a string
            raise InputError(f"gradient_checkpointing must be true, false or auto, "
                             f"got {show(self.gradient_checkpointing)}")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"ema_decay must be in [0, 1) (0: no moving average), got {self.ema_decay}")
        if not self.ema_power > 0:
            raise InputError(f"ema_power must be a positive number, got {self.ema_power}")
        check_choice("latent_sampling", self.latent_sampling, LatentSampling)
        check_choice("flip", self.flip, Flip)
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.validation_guidance_scale is not None and not 0 <= self.validation_guidance_scale < math.inf:
            raise InputError(f"validation_guidance_scale must be a finite number >= 0 (or null for the default), "
                             f"got {self.validation_guidance_scale}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise InputError(f"lora_alpha must be a positive number (or null for alpha = rank), got {self.lora_alpha}")
        check_lora_targets(self.lora_target_modules)
        if self.init_lora is not None and self.lora_rank == 0:
            raise InputError("init_lora needs LoRA training (lora_rank > 0): full fine-tuning has no adapter to start")
        if self.t_max is not None and self.t_max < self.t_min:
            raise InputError(f"t_max ({self.t_max}) must be >= t_min ({self.t_min})")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise InputError(f"checkpoints_total_limit must be a positive integer or null (keep all), "
                             f"got {self.checkpoints_total_limit}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise InputError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a plain mapping (a parsed YAML or JSON file), rejecting unknown keys by name.

        ``TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config`` for every config.
        """
        if not isinstance(data, Mapping):
            raise InputError(f"a config must be a mapping of settings, got {show(data)}")
        check_keys(data, field_names(cls), "config key")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: Iterable[tuple[str, Any]] = ()) -> TrainConfig:
        """Read a YAML (or JSON) config file; ``overrides`` ((dotted key, value) pairs, as `sdpo train
        --set` gives them) are merged into what the file says before anything is expanded."""
        return cls.from_dict(apply_overrides(read_config_file(path), overrides))

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML- and JSON-safe mapping of every setting (the method fully expanded)."""
        return _plain(dataclasses.asdict(self))


# --------------------------------------------------------------------- files and overrides
def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping a YAML (or JSON) config file holds, before any coercion or preset expansion."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise InputError(f"config file {path} is not UTF-8 text (byte {error.start})") from error
    except yaml.YAMLError as error:
        raise InputError(f"config file {path} is not valid YAML: {one_line(error)}") from error
    except RecursionError as error:
        raise InputError(f"config file {path} is nested too deeply") from error
    except ValueError as error:  # e.g. an integer of more than 4,300 digits
        raise InputError(f"config file {path} holds a value that cannot be read: {one_line(error)[:120]}") from error
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of settings, got {show(data)}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` as (key, value), the value read as YAML (``10``, ``1e-4``, ``[0.9, 0.99]``, ``null``)."""
    import yaml

    if "=" not in text:
        raise InputError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise InputError(f"--set {text!r}: the value is not valid YAML: {one_line(error)}") from error


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of the raw config mapping ``data`` with each (dotted key, value) override set in it.

    Overrides land in what the user wrote, not in the expanded config, so ``method.name=X`` switches to
    preset X's defaults; method keys written explicitly (in the file or another override, e.g.
    ``method.clip``) are the user's own and stay. Only ``method`` has sub-keys.
    """
    result = copy.deepcopy(dict(data))
    for key, value in overrides:
        parts = str(key).split(".")
        if not all(parts):
            raise InputError(f"override {key!r}: expected a setting name such as max_steps or method.beta")
        top = parts[0]
        check_keys({top: None}, field_names(TrainConfig), "config key")
        if len(parts) == 1:
            result[top] = value
            continue
        if top != "method":
            raise InputError(f"override {key!r}: {top} is a single setting, not a group (set {top}=VALUE)")
        check_keys({parts[1]: None}, field_names(MethodConfig), "method setting")
        if len(parts) > 2:
            whole = f"method.{parts[1]}"
            raise InputError(f"override {key!r}: {whole} is a single setting, not a group (set {whole}=VALUE)")
        method = result.get("method", {})
        if isinstance(method, MethodConfig):
            raise InputError(f"override {key!r}: the method is already built; override a mapping instead")
        if not isinstance(method, dict):
            raise InputError(f"override {key!r}: method in the config is not a mapping (got {show(method)})")
        result["method"] = {**method, parts[1]: value}
    return result


# --------------------------------------------------------------------- the method
def method_from_dict(data: Mapping[str, Any] | MethodConfig) -> MethodConfig:
    """A MethodConfig from a mapping whose optional "name" picks the preset the rest overrides."""
    if isinstance(data, MethodConfig):
        return data
    if not isinstance(data, Mapping):
        raise InputError(f"method must be a mapping such as {{name: sdpo, beta: 1000.0}}, got {show(data)}")
    check_keys(data, field_names(MethodConfig), "method setting")
    hints = type_hints(MethodConfig)
    values = {key: coerce(f"method.{key}", hints[key], value) for key, value in data.items()}
    try:
        return MethodConfig.preset(values.pop("name", "sdpo"), **values)
    except ValueError as error:  # the math layer raises built-ins only
        raise ConfigError(f"method: {error}") from None


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: what YAML and JSON hold."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
