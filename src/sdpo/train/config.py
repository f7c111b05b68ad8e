"""The training configuration: one dataclass, one docstring per field, validated in one place."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdpo.objectives import MethodConfig

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb", "all", "none")


@dataclass
class TrainConfig:
    """Everything `sdpo train` needs. Load from YAML with `TrainConfig.from_dict(yaml.safe_load(...))`."""

    family: str = "sd"
    """Model family: "sd", "sdxl", "cogvideox", "wan" (or "toy", the embedded demo model)."""
    pretrained: str = ""
    """Local diffusers model folder or hub id of the base model."""
    cache_dir: str = ""
    """Precompute cache made by `sdpo precompute` (latents and text embeddings of the pairs)."""
    output_dir: str = "outputs/run"
    """Where checkpoints, logs and the final LoRA / model are written."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """The preference objective: a preset name plus overrides (beta, estimator, clip, mask, ...)."""

    lora_rank: int = 16
    """LoRA rank; 0 trains the full denoiser against a frozen reference copy."""
    lora_alpha: float | None = None
    """LoRA scale numerator (alpha / rank scales the update); None means alpha = rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""

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
    lr_schedule: str = "constant_with_warmup"
    """One of constant, constant_with_warmup, linear, cosine."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 disables clipping (the norm is still logged)."""

    max_steps: int = 1000
    """Optimizer steps to train."""
    train_batch_size: int = 4
    """Pairs per process per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step. Global batch = train_batch_size x processes x this."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16"; frozen weights are cast to it, trainable ones stay float32."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the denoiser."""
    t_min: int = 0
    """Smallest training timestep index drawn."""
    t_max: int | None = None
    """Largest training timestep index drawn (None: the last one)."""
    seed: int = 0
    """Seeds initialisation, data order, timesteps and noise (each pair's draw depends only on the
    seed, the step and its global index, so runs are identical across process counts and resumes)."""

    log_every: int = 10
    """Optimizer steps between logged metrics."""
    checkpoint_every: int = 0
    """Optimizer steps between resumable checkpoints (0: only at the end)."""
    checkpoints_total_limit: int | None = 2
    """Keep at most this many checkpoints (None keeps all)."""
    validation_prompts: list[str] = field(default_factory=list)
    """Prompts sampled with the family's diffusers pipeline during training (empty: none)."""
    validation_every: int = 0
    """Optimizer steps between validation samples (0: only after the last step, if prompts are set)."""
    validation_inference_steps: int = 25
    """Sampler steps of the validation pipeline."""
    report_to: str = "tensorboard"
    """Experiment tracker: tensorboard, wandb, all or none (metrics.jsonl is always written)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    offload_reference: bool = False
    """Full fine-tuning only: keep the frozen reference (a copy in the trained weights' dtype) on the CPU
    between uses. Under FSDP the reference is sharded like the policy instead (offload with FSDP's
    ``fsdp_offload_params``)."""

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):
            self.method = method_from_dict(self.method)
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        positive_ints = ("max_steps", "train_batch_size", "gradient_accumulation_steps", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lora_rank", "lr_warmup_steps", "checkpoint_every", "num_workers", "t_min", "validation_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.report_to not in TRACKERS:
            raise ValueError(f"report_to must be one of {', '.join(TRACKERS)}, got {self.report_to!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.t_max is not None and self.t_max < self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be >= t_min ({self.t_min})")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a plain mapping (a parsed YAML file), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a YAML (or JSON) config file."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-safe mapping of every setting."""
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        if data["method"].get("clip") is not None:
            data["method"]["clip"] = list(data["method"]["clip"])
        return data


def method_from_dict(data: dict[str, Any]) -> MethodConfig:
    """A MethodConfig from a mapping whose optional "name" picks the preset the rest overrides."""
    data = dict(data)
    name = data.pop("name", "sdpo")
    if isinstance(data.get("clip"), list):
        data["clip"] = tuple(data["clip"])
    return MethodConfig.preset(name, **data)
