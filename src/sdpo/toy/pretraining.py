"""What the image and video toy base models share: settings, text encoder, and the pretraining loop.

Each world's config extends ``PretrainSettings`` with its denoiser's fields; each world supplies
the loss of one batch, and ``pretrain`` runs the shuffled-epoch AdamW loop with warm-up, cosine
decay and an exponential moving average of the weights around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

MARKER_FILE = "sdpo_toy.json"
"""Written last into a base-model folder: its presence marks the folder complete."""


class ToyCacheError(ValueError):
    """A cached toy base-model folder is damaged or was made for another config."""


def corrupt_folder_error(folder: Path, why: str) -> ToyCacheError:
    """The error for a damaged cached base model, saying how to recover."""
    return ToyCacheError(f"toy base model folder {folder} is corrupt: {why}; delete it and run again to retrain it")


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
    """Decay of the exponential moving average of the weights that is saved (0 saves the raw weights)."""
    prompt_dropout: float = 0.1
    """Share of training prompts replaced by the empty prompt, so classifier-free guidance works."""
    seed: int = 0
    """Seed of initialisation, batches, noise and timesteps."""

    min_prompt_tokens: ClassVar[int] = 6
    """The shortest ``max_prompt_tokens`` that holds the world's prompts with begin and end tokens."""

    def check_pretrain_settings(self) -> None:
        """Raise ValueError naming the first shared field that is out of range."""
        for name in ("text_hidden_size", "text_layers", "text_heads", "train_steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.text_hidden_size % self.text_heads:
            raise ValueError(f"text_heads={self.text_heads} must divide text_hidden_size={self.text_hidden_size}")
        if self.max_prompt_tokens < self.min_prompt_tokens:
            raise ValueError(
                f"max_prompt_tokens must be at least {self.min_prompt_tokens} to hold a prompt, "
                f"got {self.max_prompt_tokens}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """The config from ``to_dict`` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**values)

    def hash_header(self) -> dict[str, Any]:
        """Entries hashed with the fields: the folder format (and world) the cache key stands for."""
        raise NotImplementedError

    def short_hash(self) -> str:
        """Ten hex digits identifying the config and the folder format (the cache key)."""
        text = json.dumps({**self.hash_header(), **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def build_text_encoder(settings: PretrainSettings, tokenizer: Any) -> nn.Module:
    """A fresh CLIP text encoder sized by ``settings`` for ``tokenizer`` (seed the RNG before calling)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.text_hidden_size,
        intermediate_size=4 * settings.text_hidden_size,
        num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.text_heads,
        max_position_embeddings=settings.max_prompt_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))


def learning_rate_at(settings: PretrainSettings, step: int) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to a tenth of it at the last step."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.train_steps - settings.warmup_steps)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


BatchLoss = Callable[[Tensor, torch.Generator], Tensor]
"""Loss of one batch: (indices into the training set, the run's generator) -> scalar loss."""


def pretrain(
    settings: PretrainSettings,
    modules: list[nn.Module],
    num_examples: int,
    batch_loss: BatchLoss,
    history: list[float],
    description: str,
    progress: bool = True,
) -> None:
    """Train ``modules`` jointly on ``batch_loss``; their weights end as the moving average.

    Batches are shuffled epochs over ``num_examples`` indices, so each example is seen equally
    often even with few steps; the generator that shuffles is the one ``batch_loss`` draws from.
    Appends each step's loss to ``history``.
    """
    from tqdm.auto import tqdm

    for module in modules:
        module.train()
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    average = [p.detach().clone() for p in params] if settings.ema_decay > 0 else None

    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(num_examples, generator=generator)
    cursor = 0
    bar = tqdm(range(settings.train_steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        if cursor + settings.batch_size > len(order):
            order = torch.randperm(num_examples, generator=generator)
            cursor = 0
        batch = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(settings, step)
        loss = batch_loss(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        if average is not None:
            # The usual warm-up of the decay: early weights are poor, so the average forgets them fast.
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - decay)
        history.append(loss.item())
        if step % 25 == 0 or step == settings.train_steps - 1:
            recent = history[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    bar.close()

    if average is not None:
        with torch.no_grad():
            for p, averaged in zip(params, average, strict=True):
                p.copy_(averaged)
    for module in modules:
        module.eval()


def pretrain_into_cache(
    final: Path,
    settings: PretrainSettings,
    train_and_save: Callable[[Path], list[float]],
    check: Callable[[Path], Any],
) -> Path:
    """``final``, trained on first use and reused afterwards (``check`` validates it either way).

    ``train_and_save(folder)`` trains the model, writes it to ``folder`` and returns its loss
    history. It writes into a temporary sibling; the marker goes in last and the folder is renamed
    into place, so an interrupted run leaves nothing that could be mistaken for a finished model.
    """
    if final.exists():
        check(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        history = train_and_save(temporary)
        tail = history[-100:]
        size = max(1, math.ceil(len(history) / 10))
        marker = {
            **settings.hash_header(),
            "complete": True,
            "config": settings.to_dict(),
            "config_hash": settings.short_hash(),
            "train_seconds": round(time.perf_counter() - start, 2),
            "train_cpu_seconds": round(time.process_time() - cpu_start, 2),
            "final_loss": sum(tail) / len(tail),
            # Mean loss over each tenth of training, to judge whether more steps would still help.
            "loss_by_tenth": [round(sum(history[i : i + size]) / len(history[i : i + size]), 4)
                              for i in range(0, len(history), size)],
            "torch_threads": torch.get_num_threads(),
        }
        (temporary / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(temporary, final)
        except OSError:
            # Another process finished the same config first (the target is a non-empty folder):
            # its copy is as good as ours.
            if not final.exists():
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(temporary)
    check(final)
    return final
