"""The video toy world's base models: tiny CogVideoX-style and Wan-style transformers, pretrained on moving digits.

``pretrain_video_base`` trains a diffusers ``CogVideoXTransformer3DModel`` (v-prediction on a
zero-terminal-SNR ``CogVideoXDDIMScheduler``) or ``WanTransformer3DModel`` (rectified flow,
``FlowMatchEulerDiscreteScheduler`` with shift 3) together with a tiny ``CLIPTextModel``, from scratch,
on clips of the real digits moving in four directions ("a handwritten digit 7 moving right"). It
writes a diffusers-style folder (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
and the marker ``sdpo_toy.json``) that ``VideoToySpec.from_pretrained`` loads. Pixels are the latents
(no VAE), in each family's own layout: CogVideoX (B, F, C, H, W), Wan (B, C, F, H, W).

Caching, crash safety and corruption checks are those of the image toy (``sdpo.toy.base_model``): the
folder is keyed by a hash of the config, built in a temporary sibling and renamed into place only when
complete, and a damaged folder raises ``ToyCacheError`` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.models.base import unwrap
from sdpo.toy.base_model import (
    MARKER_FILE,
    ToyCacheError,
    _corrupt,
    _learning_rate,
    build_tokenizer,
    default_cache_root,
    read_marker,
    tokenize,
)
from sdpo.toy.data import load_split
from sdpo.toy.video_data import (
    DEFAULT_CANVAS,
    DEFAULT_FRAMES,
    DEFAULT_SPEED,
    DIRECTIONS,
    check_geometry,
    render_clips,
    video_prompts_for,
)

VIDEO_FORMAT_VERSION = 1
"""Bumped whenever the folder layout or the training recipe changes, so old caches are not reused."""
WORLD = "toy-video"
"""The ``world`` entry of the marker: tells a video toy folder from an image toy folder."""
ARCHS = ("cogvideox", "wan")
EXTRA_WORDS = ("moving", *DIRECTIONS)
"""Words the image toy's tokenizer lacks; added as whole-word tokens."""
REQUIRED_FILES = (
    MARKER_FILE,
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "scheduler/scheduler_config.json",
)
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class VideoToyConfig:
    """Clip geometry, model size and training recipe of a video toy base model. Every field is part of the cache key."""

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
    text_hidden_size: int = 32
    """Width of the CLIP text encoder (the transformer's ``text_embed_dim`` / ``text_dim``)."""
    text_layers: int = 1
    """Transformer layers of the text encoder."""
    text_heads: int = 2
    """Attention heads of the text encoder; must divide ``text_hidden_size``."""
    max_prompt_tokens: int = 8
    """Fixed padded prompt length, including begin / end tokens (CogVideoX's ``max_text_seq_length``)."""
    num_train_timesteps: int = 1000
    """Length T of the training timestep grid."""
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
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth of it)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up."""
    ema_decay: float = 0.99
    """Decay of the exponential moving average of the weights that is saved (0 saves the raw weights)."""
    prompt_dropout: float = 0.1
    """Share of training prompts replaced by the empty prompt, so classifier-free guidance works."""
    seed: int = 0
    """Seed of initialisation, batches, directions, noise and timesteps."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        check_geometry(self.frames, self.canvas, self.speed)
        positive = ("patch_size", "num_attention_heads", "attention_head_dim", "num_layers", "time_embed_dim",
                    "text_hidden_size", "text_layers", "text_heads", "train_steps", "batch_size")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.canvas % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide canvas={self.canvas}")
        width = self.num_attention_heads * self.attention_head_dim
        # CogVideoX's 3-D sincos table gives 1/4 of the width to time and 3/8 to each spatial axis,
        # each split again into sin / cos halves.
        if self.arch == "cogvideox" and width % 16:
            raise ValueError(f"CogVideoX needs num_attention_heads * attention_head_dim divisible by 16, got {width}")
        if self.arch == "wan" and self.attention_head_dim < 12:
            raise ValueError(f"Wan's rotary embedding needs attention_head_dim >= 12, got {self.attention_head_dim}")
        if self.text_hidden_size % self.text_heads:
            raise ValueError(f"text_heads={self.text_heads} must divide text_hidden_size={self.text_hidden_size}")
        # [BOS] a handwritten digit N moving DIR [EOS] is 8 tokens; shorter would cut the direction off.
        if self.max_prompt_tokens < 8:
            raise ValueError(f"max_prompt_tokens must be at least 8 to hold a prompt, got {self.max_prompt_tokens}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not self.snr_shift_scale > 0 or not self.flow_shift > 0:
            raise ValueError("snr_shift_scale and flow_shift must be positive")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay and warmup_steps must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VideoToyConfig:
        """The config from ``to_dict`` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VideoToyConfig fields: {unknown}")
        return cls(**values)

    def short_hash(self) -> str:
        """Ten hex digits identifying the config and the folder format (the cache key)."""
        text = json.dumps({"format": VIDEO_FORMAT_VERSION, "world": WORLD, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclass
class _Models:
    transformer: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    history: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ building
def build_video_tokenizer(max_length: int) -> Any:
    """The image toy's word-level tokenizer with the motion words added as whole-word tokens."""
    from tokenizers import AddedToken

    tokenizer = build_tokenizer(max_length)
    tokenizer.add_tokens([AddedToken(word, single_word=True) for word in EXTRA_WORDS])
    return tokenizer


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


def build_transformer(config: VideoToyConfig) -> nn.Module:
    """A freshly initialised transformer of the arch (uses the global RNG; see ``build_video_models``)."""
    width = config.num_attention_heads * config.attention_head_dim
    if config.arch == "cogvideox":
        from diffusers import CogVideoXTransformer3DModel

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
    from diffusers import WanTransformer3DModel

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


def build_video_models(config: VideoToyConfig) -> _Models:
    """Freshly initialised transformer, text encoder, tokenizer and scheduler for ``config`` (seeded)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_video_tokenizer(config.max_prompt_tokens)
    # Initialise under a private RNG so building a model never moves the caller's global stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden_size,
            intermediate_size=4 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_prompt_tokens,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ))
        transformer = build_transformer(config)
    return _Models(transformer, text_encoder, tokenizer, build_scheduler(config))


def to_layout(clips: Tensor, arch: str) -> Tensor:
    """Clips (B, F, C, H, W) in the arch's latent layout: unchanged for CogVideoX, (B, C, F, H, W) for Wan."""
    return clips if arch == "cogvideox" else clips.permute(0, 2, 1, 3, 4)


def from_layout(latents: Tensor, arch: str) -> Tensor:
    """Latents in the arch's layout back to clips (B, F, C, H, W)."""
    return latents if arch == "cogvideox" else latents.permute(0, 2, 1, 3, 4)


def frame_positions(latents: Tensor) -> Tensor:
    """The frame channel for Wan-layout latents (B, C, F, H, W): (B, 1, F, H, W), -1 on the first frame to +1 on the last."""
    batch, _, frames, height, width = latents.shape
    ramp = torch.linspace(-1.0, 1.0, frames, device=latents.device, dtype=latents.dtype)
    return ramp.view(1, 1, frames, 1, 1).expand(batch, 1, frames, height, width)


def run_transformer(model: nn.Module, arch: str, latents: Tensor, timesteps: Tensor, hidden: Tensor) -> Tensor:
    """One forward pass of either arch on latents in its layout; ``timesteps`` are model timesteps.

    A Wan-style model built with ``frame_channel`` (one input channel more than the latents have)
    gets the frame channel appended here, so every caller (pretraining, ``predict``) feeds it alike.
    """
    timesteps = timesteps.to(device=latents.device, dtype=torch.float32)
    if arch == "cogvideox":
        return model(hidden_states=latents, encoder_hidden_states=hidden, timestep=timesteps, return_dict=False)[0]
    if unwrap(model).config.in_channels == latents.shape[1] + 1:
        latents = torch.cat([latents, frame_positions(latents)], dim=1)
    return model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=hidden, return_dict=False)[0]


# ------------------------------------------------------------------------------------------ training
def _train(config: VideoToyConfig, models: _Models, progress: bool) -> None:
    from tqdm.auto import tqdm

    from sdpo.schedules import NoiseSchedule

    images, labels = load_split("train")
    # Every train digit in every direction: token ids per (digit index, direction).
    prompts = [video_prompts_for(labels, torch.full_like(labels, d)) for d in range(len(DIRECTIONS))]
    ids = torch.stack([tokenize(models.tokenizer, p, config.max_prompt_tokens) for p in prompts], dim=1)
    empty_ids = tokenize(models.tokenizer, [""], config.max_prompt_tokens)[0]
    schedule = NoiseSchedule.from_scheduler(models.scheduler)

    transformer, text_encoder = models.transformer, models.text_encoder
    transformer.train()
    text_encoder.train()
    params = [p for module in (transformer, text_encoder) for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    ema = [p.detach().clone() for p in params] if config.ema_decay > 0 else None

    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    bar = tqdm(range(config.train_steps), desc=f"pretraining toy video base ({config.arch})",
               disable=not progress, leave=False)
    for step in bar:
        # Shuffled epochs over the digits; each visit draws a fresh direction (4x the clips).
        if cursor + config.batch_size > len(order):
            order = torch.randperm(len(images), generator=generator)
            cursor = 0
        batch = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        directions = torch.randint(0, len(DIRECTIONS), (len(batch),), generator=generator)
        x0 = to_layout(render_clips(images[batch], directions, config.frames, config.canvas, config.speed),
                       config.arch)
        batch_ids = ids[batch, directions].clone()
        drop = torch.rand(len(batch), generator=generator) < config.prompt_dropout
        batch_ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = schedule.sample_timesteps(len(batch), generator=generator)
        noisy = schedule.add_noise(x0, noise, t)

        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        hidden = text_encoder(batch_ids).last_hidden_state
        prediction = run_transformer(transformer, config.arch, noisy, schedule.model_timestep(t), hidden)
        loss = nn.functional.mse_loss(prediction, schedule.target(x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        if ema is not None:
            # The usual warm-up of the decay: early weights are poor, so the average forgets them fast.
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        models.history.append(loss.item())
        if step % 25 == 0 or step == config.train_steps - 1:
            recent = models.history[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    bar.close()

    if ema is not None:
        with torch.no_grad():
            for p, average in zip(params, ema, strict=True):
                p.copy_(average)
    transformer.eval()
    text_encoder.eval()


# ------------------------------------------------------------------------------------------ cache
def video_base_folder(config: VideoToyConfig, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the video base model for ``config`` is (or will be) cached."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / f"toy-video-{config.arch}-{config.short_hash()}"


def check_video_folder(folder: str | os.PathLike[str], config: VideoToyConfig | None = None) -> dict[str, Any]:
    """Validate a video toy folder without loading the models; returns its marker.

    Checks the marker (complete, of the video world), that every required file exists and parses
    (safetensors headers, JSON), and, given ``config``, that the folder was trained with it. Raises
    ToyCacheError otherwise.
    """
    from safetensors import safe_open

    folder = Path(folder)
    marker = read_marker(folder)
    if marker.get("world") != WORLD:
        raise _corrupt(folder, f"{MARKER_FILE} is not a video toy marker (world {marker.get('world')!r})")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise _corrupt(folder, f"missing {', '.join(missing)}")
    for name in REQUIRED_FILES:
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as handle:
                    if not list(handle.keys()):
                        raise ValueError("no tensors")
            elif name.endswith(".json"):
                json.loads((folder / name).read_text())
        except Exception as error:  # noqa: BLE001 - any read failure means the file is damaged
            raise _corrupt(folder, f"{name} is unreadable ({type(error).__name__})") from error
    try:
        stored = VideoToyConfig.from_dict(marker["config"])
    except (TypeError, ValueError) as error:
        raise _corrupt(folder, f"{MARKER_FILE} holds an invalid config ({error})") from error
    if config is not None and stored != config:
        raise _corrupt(folder, f"{MARKER_FILE} holds a different config than its name's hash")
    return marker


def save_video_models(models: _Models, folder: Path) -> None:
    """Write the four diffusers subfolders."""
    models.transformer.save_pretrained(folder / "transformer")
    models.text_encoder.save_pretrained(folder / "text_encoder")
    models.tokenizer.save_pretrained(folder / "tokenizer")
    models.scheduler.save_pretrained(folder / "scheduler")


def pretrain_video_base(
    config: VideoToyConfig | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """The folder of the pretrained video toy base model for ``config``, training it on first use.

    A complete cached folder is reused as it is. Otherwise the model is trained on clips of the
    train split and written to a temporary sibling folder renamed into place at the end, so an
    interrupted run leaves nothing that could be mistaken for a finished model. Raises
    ToyCacheError when the folder exists but is damaged.
    """
    config = config or VideoToyConfig()
    final = video_base_folder(config, cache_root)
    if final.exists():
        check_video_folder(final, config)
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        models = build_video_models(config)
        _train(config, models, progress)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        save_video_models(models, temporary)
        tail = models.history[-100:]
        marker = {
            "format": VIDEO_FORMAT_VERSION,
            "world": WORLD,
            "complete": True,
            "config": config.to_dict(),
            "config_hash": config.short_hash(),
            "train_seconds": round(seconds, 2),
            "train_cpu_seconds": round(cpu_seconds, 2),
            "final_loss": sum(tail) / len(tail),
            "torch_threads": torch.get_num_threads(),
        }
        # The marker is written last: a folder without it is never complete.
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
    check_video_folder(final, config)
    return final


__all__ = [
    "ARCHS",
    "REQUIRED_FILES",
    "ToyCacheError",
    "VideoToyConfig",
    "build_scheduler",
    "build_transformer",
    "build_video_models",
    "build_video_tokenizer",
    "check_video_folder",
    "from_layout",
    "pretrain_video_base",
    "run_transformer",
    "save_video_models",
    "to_layout",
    "video_base_folder",
]
