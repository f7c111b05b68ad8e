"""The fields every world's base-model config shares (text encoder, optimisation), their checks and the cache key.

Each world's config extends ``PretrainSettings`` with its denoiser's fields and supplies a builder of
fresh models and the loss of one batch (``pretrained_models``); the hash of all the fields and the
folder format (``hash_header``) names the cached folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from sdpo.errors import InputError
from sdpo.toy.base_models import BaseModels

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
"""The DDPM beta schedules a world's config may name."""


@dataclass(frozen=True)
class PretrainSettings:
    """Text-encoder and optimisation fields of a toy base-model config (a world's config extends it)."""

    text_hidden_size: int = 32
    """Width of the CLIP text encoder, and so of the denoiser's text conditioning."""
    text_layers: int = 1
    """Transformer layers of the text encoder."""
    text_heads: int = 2
    """Attention heads of the text encoder; must divide ``text_hidden_size``."""
    max_prompt_tokens: int = 8
    """Fixed padded prompt length in tokens, including the begin and end tokens."""
    num_train_timesteps: int = 1000
    """Length T of the training timestep grid."""
    train_steps: int = 1000
    """Optimiser steps of pretraining."""
    batch_size: int = 64
    """Samples per pretraining step."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth of it)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the weights that is saved (diffusers' ``EMAModel``, its
    default warm-up ``min(decay, n / (9 + n))``; 0 saves the raw weights)."""
    prompt_dropout: float = 0.1
    """Share of training prompts replaced by the empty prompt, so classifier-free guidance works."""
    seed: int = 0
    """Seed of initialisation, batches, noise and timesteps."""

    min_prompt_tokens: ClassVar[int] = 6
    """The shortest ``max_prompt_tokens`` that holds the world's prompts with begin and end tokens."""
    world: ClassVar[str | None] = None
    """The ``world`` entry of the folder's marker (None: the digits world, whose markers predate it)."""
    denoiser_subfolder: ClassVar[str] = "unet"
    """Folder of the denoiser in the saved model: "unet" or "transformer"."""

    def check_pretrain_settings(self) -> None:
        """Raise ValueError naming the first shared field that is out of range."""
        for name in ("text_hidden_size", "text_layers", "text_heads", "train_steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.text_hidden_size % self.text_heads:
            raise InputError(f"text_heads={self.text_heads} must divide text_hidden_size={self.text_hidden_size}")
        if self.max_prompt_tokens < self.min_prompt_tokens:
            raise InputError(
                f"max_prompt_tokens must be at least {self.min_prompt_tokens} to hold a prompt, "
                f"got {self.max_prompt_tokens}"
            )
        if self.num_train_timesteps < 2:
            raise InputError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise InputError("weight_decay and warmup_steps must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise InputError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """The config from ``to_dict`` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**values)

    def hash_header(self) -> dict[str, Any]:
        """Entries hashed with the fields: the folder format (and world) the cache key stands for."""
        raise NotImplementedError

    def folder_name(self) -> str:
        """The cached folder's name: ``toy-base-<short_hash>`` (a world may name its folders otherwise)."""
        return f"toy-base-{self.short_hash()}"

    def pretrained_models(self, progress: bool) -> BaseModels:
        """Freshly initialised models (seeded), pretrained on the world's training data."""
        raise NotImplementedError

    def short_hash(self) -> str:
        """Ten hex digits identifying the config and the folder format (the cache key)."""
        text = json.dumps({**self.hash_header(), **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]
