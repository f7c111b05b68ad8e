"""The digits world's base model: a small text-conditioned UNet pretrained on the 8x8 digits.

``pretrain_base`` trains a diffusers ``UNet2DConditionModel`` and a tiny ``CLIPTextModel`` together,
from scratch, on prompts such as "a handwritten digit 7", and caches the folder (``sdpo.toy.pretraining``,
``sdpo.toy.model_folder``) that ``ToySpec.from_pretrained`` loads, like any Stable Diffusion folder without
a VAE (the 8x8 pixels are the latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdpo.errors import InputError
from sdpo.toy.base_models import BaseModels
from sdpo.toy.digits.data import IMAGE_SIZE, load_split, prompts_for
from sdpo.toy.digits.tokenizer import build_tokenizer
from sdpo.toy.pretrain_loop import pretrain
from sdpo.toy.pretrain_settings import BETA_SCHEDULES, PretrainSettings
from sdpo.toy.text_encoder import build_text_encoder, tokenize

FORMAT_VERSION = 2
"""Bumped whenever the folder layout or the training recipe changes, so old caches are not reused."""


@dataclass(frozen=True)
class ToyModelConfig(PretrainSettings):
    """Size and training recipe of the toy base model. Every field is part of the cache key."""

    block_out_channels: tuple[int, ...] = (32, 64)
    """UNet channels per resolution level (8x8, then 4x4, ...)."""
    full_resolution_attention: bool = False
    """Give the 8x8 level attention too; lower levels and the middle block always have it. Off by
    default: on two CPU cores it triples the step time for little gain on 8x8 digits."""
    layers_per_block: int = 1
    """ResNet (+ transformer) layers per UNet level."""
    attention_heads: int = 4
    """Attention heads in the UNet's transformer blocks (diffusers' ``attention_head_dim``)."""
    norm_num_groups: int = 8
    """GroupNorm groups in the UNet; must divide every entry of ``block_out_channels``."""
    beta_schedule: str = "squaredcos_cap_v2"
    """DDPM beta schedule; the cosine schedule keeps more signal at mid t, which 8x8 images need."""
    prediction_type: str = "epsilon"
    """What the UNet predicts: "epsilon" or "v_prediction"."""

    def __post_init__(self) -> None:
        channels = tuple(int(c) for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", channels)
        if not channels or any(c <= 0 for c in channels):
            raise InputError(f"block_out_channels must be positive integers, got {self.block_out_channels}")
        # Each level but the last halves the resolution; 8 -> 4 -> 2 -> 1 is the deepest possible.
        if len(channels) > 4:
            raise InputError(f"at most 4 UNet levels fit an 8x8 image, got {len(channels)}")
        if self.norm_num_groups <= 0 or any(c % self.norm_num_groups for c in channels):
            raise InputError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels {channels}")
        if self.attention_heads <= 0 or any(c % self.attention_heads for c in channels):
            raise InputError(f"attention_heads={self.attention_heads} must divide every block_out_channels {channels}")
        if int(self.layers_per_block) <= 0:
            raise InputError(f"layers_per_block must be positive, got {self.layers_per_block}")
        self.check_pretrain_settings()
        if self.beta_schedule not in BETA_SCHEDULES:
            raise InputError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")

    def hash_header(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION}

    def pretrained_models(self, progress: bool) -> BaseModels:
        models = build_models(self)
        train_base(self, models, progress)
        return models


# ------------------------------------------------------------------------------------------ building
def build_models(config: ToyModelConfig) -> BaseModels:
    """Freshly initialised UNet, text encoder, tokenizer and scheduler for ``config`` (seeded)."""
    from diffusers import DDPMScheduler
    from diffusers.models import UNet2DConditionModel

    tokenizer = build_tokenizer(config.max_prompt_tokens)
    levels = len(config.block_out_channels)
    first_down = "CrossAttnDownBlock2D" if config.full_resolution_attention else "DownBlock2D"
    last_up = "CrossAttnUpBlock2D" if config.full_resolution_attention else "UpBlock2D"
    # Initialise under a private RNG so building a model never moves the caller's global stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        text_encoder = build_text_encoder(config, tokenizer)
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE,
            in_channels=1,
            out_channels=1,
            down_block_types=(first_down, *("CrossAttnDownBlock2D",) * (levels - 1)),
            up_block_types=(*("CrossAttnUpBlock2D",) * (levels - 1), last_up),
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            cross_attention_dim=config.text_hidden_size,
            attention_head_dim=config.attention_heads,  # diffusers' name for the number of heads
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
    )
    return BaseModels(unet, "unet", text_encoder, tokenizer, scheduler)


# ------------------------------------------------------------------------------------------ training
def train_base(config: ToyModelConfig, models: BaseModels, progress: bool) -> None:
    """Pretrain ``models`` on the train split of the digits (prompt dropout for guidance)."""
    from sdpo.schedules import NoiseSchedule

    images, labels = load_split("train")
    ids_by_image = tokenize(models.tokenizer, prompts_for(labels), config.max_prompt_tokens)
    empty_ids = tokenize(models.tokenizer, [""], config.max_prompt_tokens)[0]
    schedule = NoiseSchedule.from_scheduler(models.scheduler)

    def batch_loss(batch: Tensor, generator: torch.Generator) -> Tensor:
        x0 = images[batch]
        ids = ids_by_image[batch].clone()
        ids[torch.rand(len(batch), generator=generator) < config.prompt_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = schedule.sample_timesteps(len(batch), generator=generator)
        hidden = models.text_encoder(ids).last_hidden_state
        prediction = models.denoiser(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        return torch.nn.functional.mse_loss(prediction, schedule.target(x0, noise, t))

    pretrain(config, [models.denoiser, models.text_encoder], len(images), batch_loss, models.history,
             "pretraining toy base", progress)
