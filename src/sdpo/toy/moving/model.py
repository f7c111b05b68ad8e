"""The moving-digits world's base models: tiny CogVideoX-style and Wan-style transformers, pretrained on clips.

``pretrain_base(VideoToyConfig(...))`` trains a diffusers ``CogVideoXTransformer3DModel`` (v-prediction on a
zero-terminal-SNR ``CogVideoXDDIMScheduler``) or ``WanTransformer3DModel`` (rectified flow,
``FlowMatchEulerDiscreteScheduler`` with shift 3) together with a tiny ``CLIPTextModel``, from scratch,
on clips of the real digits moving in four directions ("a handwritten digit 7 moving right"). It
writes a diffusers-style folder (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
and the marker ``sdpo_toy.json``) that ``ToySpec.from_pretrained`` loads. Pixels are the latents
(no VAE), in each family's own layout: CogVideoX (B, F, C, H, W), Wan (B, C, F, H, W).

Caching, crash safety and corruption checks are the shared ones of ``sdpo.toy.pretraining`` and
``sdpo.toy.model_folder``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.models.base import unwrap
from sdpo.toy.base_models import BaseModels
from sdpo.toy.digits.data import load_split
from sdpo.toy.digits.tokenizer import build_tokenizer
from sdpo.toy.moving.data import (
    DEFAULT_CANVAS,
    DEFAULT_FRAMES,
    DEFAULT_SPEED,
    DIRECTIONS,
    check_geometry,
    render_clips,
    video_prompts_for,
)
from sdpo.toy.pretrain_loop import pretrain
from sdpo.toy.pretrain_settings import BETA_SCHEDULES, PretrainSettings
from sdpo.toy.text_encoder import build_text_encoder, tokenize

if TYPE_CHECKING:  # diffusers loads only when a model is built
    from diffusers.models import ModelMixin

VIDEO_FORMAT_VERSION = 1
"""Bumped whenever the folder layout or the training recipe changes, so old caches are not reused."""
WORLD = "toy-video"
"""The ``world`` entry of the marker: tells a video toy folder from an image toy folder."""
ARCHS = ("cogvideox", "wan")
EXTRA_WORDS = ("moving", *DIRECTIONS)
"""Words the digits world's tokenizer lacks; added as whole-word tokens."""


@dataclass(frozen=True)
class VideoToyConfig(PretrainSettings):
    """Clip geometry, model size and training recipe of a video toy base model. Every field is part of the cache key."""

    # [BOS] a handwritten digit N moving DIR [EOS] is 8 tokens; shorter would cut the direction off.
    min_prompt_tokens: ClassVar[int] = 8
    world: ClassVar[str | None] = WORLD
    denoiser_subfolder: ClassVar[str] = "transformer"

    arch: str = "cogvideox"
    """Transformer family: "cogvideox" (CogVideoXTransformer3DModel, v-prediction, DDIM) or "wan"
    (WanTransformer3DModel, rectified flow, Euler)."""
    frames: int = DEFAULT_FRAMES
    """Frames per clip."""
    canvas: int = DEFAULT_CANVAS
    """Height and width of the frames; the 8x8 digit moves inside it."""
    speed: int = DEFAULT_SPEED
    """Pixels the digit moves per frame; ``8 + (frames - 1) * speed`` must fit in ``canvas``."""
    patch_size: int = 4
    """Spatial patch size of the transformer; must divide ``canvas``. Tokens per frame are
    ``(canvas / patch_size)^2``; on CPU the cost of a step grows faster than their number. At the
    same CPU time, patch 4 (45 video tokens) gave clearer digits than patch 3 (80 tokens)."""
    num_attention_heads: int = 2
    """Attention heads of the transformer."""
    attention_head_dim: int = 32
    """Width of each head (the transformer's width is heads x this). Wan's 3-D rotary embedding splits
    it into time / height / width parts, so it must be at least 12."""
    num_layers: int = 3
    """Transformer blocks."""
    time_embed_dim: int = 64
    """Timestep embedding width (CogVideoX's ``time_embed_dim``, Wan's ``freq_dim``)."""
    beta_schedule: str = "squaredcos_cap_v2"
    """CogVideoX only: beta schedule before the zero-terminal-SNR rescale (cosine keeps more signal at
    mid t, which tiny frames need)."""
    snr_shift_scale: float = 1.0
    """CogVideoX only: the scheduler's SNR shift (the real 2B model uses 3; 1 leaves the schedule alone)."""
    flow_shift: float = 3.0
    """Wan only: sigma shift of the flow-matching scheduler (Wan 2.1 uses 3 at 480p)."""
    frame_channel: bool = True
    """Wan only: give the transformer a second input channel holding each frame's place in the clip
    (-1 first ... +1 last), concatenated to the latents as Wan's image-to-video models concatenate
    their first-frame mask. Wan's only positions are relative (3-D RoPE): without the real VAE,
    whose causal first latent frame marks where a clip starts, the model learns the axis of the
    motion but not its sign (about half the clips then move backwards)."""
    train_steps: int = 1600
    """Optimiser steps of pretraining (about 105 ms each on one idle CPU core at the default size)."""
    batch_size: int = 32
    """Clips per pretraining step."""
    ema_decay: float = 0.99
    """Decay of the exponential moving average of the weights that is saved (diffusers' ``EMAModel``, its
    default warm-up ``min(decay, n / (9 + n))``; 0 saves the raw weights)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InputError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        check_geometry(self.frames, self.canvas, self.speed)
        for name in ("patch_size", "num_attention_heads", "attention_head_dim", "num_layers", "time_embed_dim"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.canvas % self.patch_size:
            raise InputError(f"patch_size={self.patch_size} must divide canvas={self.canvas}")
        width = self.num_attention_heads * self.attention_head_dim
        # CogVideoX's 3-D sincos table gives 1/4 of the width to time and 3/8 to each spatial axis,
        # each split again into sin / cos halves.
        if self.arch == "cogvideox" and width % 16:
            raise InputError(f"CogVideoX needs num_attention_heads * attention_head_dim divisible by 16, got {width}")
        if self.arch == "wan" and self.attention_head_dim < 12:
            raise InputError(f"Wan's rotary embedding needs attention_head_dim >= 12, got {self.attention_head_dim}")
        self.check_pretrain_settings()
        if self.beta_schedule not in BETA_SCHEDULES:
            raise InputError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not self.snr_shift_scale > 0 or not self.flow_shift > 0:
            raise InputError("snr_shift_scale and flow_shift must be positive")

    def pretrained_models(self, progress: bool) -> BaseModels:
        models = build_video_models(self)
        train_video_base(self, models, progress)
        return models

    def hash_header(self) -> dict[str, Any]:
        return {"format": VIDEO_FORMAT_VERSION, "world": WORLD}

    def folder_name(self) -> str:
        return f"toy-video-{self.arch}-{self.short_hash()}"


# ------------------------------------------------------------------------------------------ building
def build_scheduler(config: VideoToyConfig) -> Any:
    """The training scheduler of the arch: zero-terminal-SNR v-prediction DDIM, or shifted flow matching."""
    if config.arch == "cogvideox":
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            snr_shift_scale=config.snr_shift_scale,
            clip_sample=False,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps, shift=config.flow_shift)


def build_transformer(config: VideoToyConfig) -> ModelMixin:
    """A freshly initialised transformer of the arch (uses the global RNG; see ``build_video_models``)."""
    width = config.num_attention_heads * config.attention_head_dim
    if config.arch == "cogvideox":
        from diffusers.models import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel(
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim,
            in_channels=1,
            out_channels=1,
            time_embed_dim=config.time_embed_dim,
            text_embed_dim=config.text_hidden_size,
            num_layers=config.num_layers,
            # No VAE: the latent grid is the pixel grid and no frames are compressed, so the
            # sinusoidal position table built at init is exactly the one every forward pass uses.
            sample_width=config.canvas,
            sample_height=config.canvas,
            sample_frames=config.frames,
            patch_size=config.patch_size,
            temporal_compression_ratio=1,
            max_text_seq_length=config.max_prompt_tokens,
        )
    from diffusers.models import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, config.patch_size, config.patch_size),
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=2 if config.frame_channel else 1,
        out_channels=1,
        text_dim=config.text_hidden_size,
        freq_dim=config.time_embed_dim,
        ffn_dim=4 * width,
        num_layers=config.num_layers,
        rope_max_seq_len=max(32, config.frames, config.canvas),
    )


def build_video_models(config: VideoToyConfig) -> BaseModels:
    """Freshly initialised transformer, text encoder, tokenizer and scheduler for ``config`` (seeded)."""
    tokenizer = build_tokenizer(config.max_prompt_tokens, EXTRA_WORDS)
    # Initialise under a private RNG so building a model never moves the caller's global stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        text_encoder = build_text_encoder(config, tokenizer)
        transformer = build_transformer(config)
    return BaseModels(transformer, "transformer", text_encoder, tokenizer, build_scheduler(config))


def to_layout(clips: Tensor, arch: str) -> Tensor:
    """Clips (B, F, C, H, W) in the arch's latent layout: unchanged for CogVideoX, (B, C, F, H, W) for Wan."""
    return clips if arch == "cogvideox" else clips.permute(0, 2, 1, 3, 4)


def frame_positions(latents: Tensor) -> Tensor:
    """The frame channel for Wan-layout latents (B, C, F, H, W): (B, 1, F, H, W), -1 on the first frame to +1 on the last."""
    batch, _, frames, height, width = latents.shape
    ramp = torch.linspace(-1.0, 1.0, frames, device=latents.device, dtype=latents.dtype)
    return ramp.view(1, 1, frames, 1, 1).expand(batch, 1, frames, height, width)


def transformer_config(model: nn.Module) -> Any:
    """The diffusers config of a transformer, possibly wrapped (DDP, torch.compile): a FrozenDict whose
    entries read as attributes, which ``nn.Module``'s attribute typing cannot express."""
    config: Any = unwrap(model).config
    return config


def check_transformer_inputs(model: nn.Module, arch: str, latents: Tensor, hidden: Tensor) -> None:
    """Refuse inputs a CogVideoX transformer would mishandle: its sinusoidal position table covers the
    joint [text; video] sequence, so the latents must have the frames and size it was built for and
    the text exactly ``max_text_seq_length`` tokens; anything else is a clear error here rather than a
    shape mismatch (or a silently rebuilt table) inside diffusers. Wan's rotary positions take any size."""
    if arch != "cogvideox":
        return
    config = transformer_config(model)
    if hidden.ndim != 3 or hidden.shape[1] != config.max_text_seq_length:
        raise InputError(f"CogVideoX needs exactly max_text_seq_length={config.max_text_seq_length} text "
                         f"tokens, got encoder_hidden_states of shape {tuple(hidden.shape)}")
    frames, _, height, width = latents.shape[1:]
    if (frames, height, width) != (config.sample_frames, config.sample_height, config.sample_width):
        raise InputError(f"CogVideoX's position table is for {config.sample_frames} frames of "
                         f"{config.sample_height}x{config.sample_width}, got {frames} of {height}x{width}")


def run_transformer(model: nn.Module, arch: str, latents: Tensor, timesteps: Tensor, hidden: Tensor) -> Tensor:
    """One forward pass of either arch on latents in its layout; ``timesteps`` are model timesteps.

    A Wan-style model built with ``frame_channel`` (one input channel more than the latents have)
    gets the frame channel appended here, so every caller (pretraining, ``predict``) feeds it alike.
    """
    timesteps = timesteps.to(device=latents.device, dtype=torch.float32)
    if arch == "cogvideox":
        return model(hidden_states=latents, encoder_hidden_states=hidden, timestep=timesteps, return_dict=False)[0]
    if transformer_config(model).in_channels == latents.shape[1] + 1:
        latents = torch.cat([latents, frame_positions(latents)], dim=1)
    return model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=hidden, return_dict=False)[0]


# ------------------------------------------------------------------------------------------ training
def train_video_base(config: VideoToyConfig, models: BaseModels, progress: bool) -> None:
    """Pretrain ``models`` on clips of the train digits, each visit in a fresh direction."""
    from sdpo.schedules import NoiseSchedule

    images, labels = load_split("train")
    # Every train digit in every direction: token ids per (digit index, direction).
    prompts = [video_prompts_for(labels, torch.full_like(labels, d)) for d in range(len(DIRECTIONS))]
    ids = torch.stack([tokenize(models.tokenizer, p, config.max_prompt_tokens) for p in prompts], dim=1)
    empty_ids = tokenize(models.tokenizer, [""], config.max_prompt_tokens)[0]
    schedule = NoiseSchedule.from_scheduler(models.scheduler)

    def batch_loss(batch: Tensor, generator: torch.Generator) -> Tensor:
        # Each visit of a digit draws a fresh direction (4x the clips).
        directions = torch.randint(0, len(DIRECTIONS), (len(batch),), generator=generator)
        x0 = to_layout(render_clips(images[batch], directions, config.frames, config.canvas, config.speed),
                       config.arch)
        batch_ids = ids[batch, directions].clone()
        batch_ids[torch.rand(len(batch), generator=generator) < config.prompt_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = schedule.sample_timesteps(len(batch), generator=generator)
        hidden = models.text_encoder(batch_ids).last_hidden_state
        prediction = run_transformer(models.denoiser, config.arch, schedule.add_noise(x0, noise, t),
                                     schedule.model_timestep(t), hidden)
        return nn.functional.mse_loss(prediction, schedule.target(x0, noise, t))

    pretrain(config, [models.denoiser, models.text_encoder], len(images), batch_loss, models.history,
             f"pretraining toy video base ({config.arch})", progress)
