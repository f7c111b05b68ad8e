"""The published denoiser architectures the benchmarks build: each model's config (from the diffusers
folder of its published checkpoint), a tiny config of the same family for CPU runs, its scheduler, the
shapes of one pair member's inputs, and how to build it with random weights (nothing is downloaded).

``benchmarks.gpu_step``, ``benchmarks.option_cost`` and ``benchmarks.checkpoint_size`` import it as a
package module (``python -m benchmarks.NAME`` from the repository root).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.train.setup import cast_frozen

__all__ = ["ARCHS", "Arch", "add_lora", "build_denoiser", "building_on", "count_parameters", "make_batch",
           "make_spec", "sync"]

# ---------------------------------------------------------------------- published configs
# Denoiser configs from the diffusers folders of the published checkpoints. Keys left out have the
# same value in the published config and the class default. --count-only checks the sizes.

SD15_UNET: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5, unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SDXL_UNET: dict[str, Any] = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + pooled text 1280
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}

COGVIDEOX_2B: dict[str, Any] = {  # THUDM/CogVideoX-2b, transformer/config.json
    "num_attention_heads": 30,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embed_dim": 512,
    "text_embed_dim": 4096,
    "num_layers": 30,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_width": 90,
    "sample_height": 60,
    "sample_frames": 49,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 226,
    "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "spatial_interpolation_scale": 1.875,
    "temporal_interpolation_scale": 1.0,
    "use_rotary_positional_embeddings": False,
    "use_learned_positional_embeddings": False,
}

COGVIDEOX_5B: dict[str, Any] = {  # THUDM/CogVideoX-5b, transformer/config.json
    **COGVIDEOX_2B,
    "num_attention_heads": 48,
    "num_layers": 42,
    "use_rotary_positional_embeddings": True,
    "use_learned_positional_embeddings": False,
}

WAN21_1_3B: dict[str, Any] = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

# ---------------------------------------------------------------------- tiny configs (--tiny)
# The sizes of sdpo.models.tiny: same classes and code paths, a few thousand parameters.

_TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
TINY_SD15 = dict(_TINY_UNET)
TINY_SDXL = {
    **_TINY_UNET,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,
    "use_linear_projection": True,
}
TINY_COGVIDEOX_2B: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 16,
    "num_layers": 2,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 9,
    "patch_size": 2,
    "temporal_compression_ratio": 4,
    "max_text_seq_length": 16,
    "use_rotary_positional_embeddings": False,
}
TINY_COGVIDEOX_5B = {**TINY_COGVIDEOX_2B, "attention_head_dim": 16, "use_rotary_positional_embeddings": True}
TINY_WAN: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}


# ---------------------------------------------------------------------- schedulers
def _sd_scheduler() -> Any:
    """SD1.5 / SDXL training betas: DDPM, scaled_linear 0.00085..0.012, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


def _cogvideox_scheduler(snr_shift_scale: float) -> Callable[[], Any]:
    """CogVideoX: v-prediction on zero-terminal-SNR betas with an SNR shift (3.0 for 2B, 1.0 for 5B)."""

    def build() -> Any:
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=True,
            steps_offset=0,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            snr_shift_scale=snr_shift_scale,
        )

    return build


def _wan_scheduler() -> Any:
    """Wan 2.1 at 480p: rectified flow with sigmas shifted by 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


# ---------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """One benchmarked model: how to build it and the shapes of one pair member's inputs."""

    name: str
    published: str
    """Published parameter count of the denoiser, for the sanity check."""
    denoiser_class: str
    """diffusers class of the denoiser."""
    family: str
    """sdpo spec: "sd", "sdxl", "cogvideox" or "wan"."""
    config: dict[str, Any]
    tiny_config: dict[str, Any]
    scheduler: Callable[[], Any]
    media: tuple[int, int, int | None]
    """Pixel (height, width, frames) of the paper's setting."""
    latents: tuple[int, ...]
    """Latent shape of one sample, in the family's layout."""
    text: tuple[int, int]
    """(tokens, width) of the text conditioning."""
    tiny_latents: tuple[int, ...]
    tiny_text: tuple[int, int]
    pooled: int = 0
    """Width of SDXL's pooled text embedding (0 for the others)."""
    tiny_pooled: int = 0


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch("sd15", "0.86B", "UNet2DConditionModel", "sd", SD15_UNET, TINY_SD15, _sd_scheduler,
             (512, 512, None), (4, 64, 64), (77, 768), (4, 8, 8), (8, 32)),
        Arch("sdxl", "2.6B", "UNet2DConditionModel", "sdxl", SDXL_UNET, TINY_SDXL, _sd_scheduler,
             (1024, 1024, None), (4, 128, 128), (77, 2048), (4, 8, 8), (8, 32), pooled=1280, tiny_pooled=16),
        Arch("cogvideox-2b", "1.7B", "CogVideoXTransformer3DModel", "cogvideox", COGVIDEOX_2B,
             TINY_COGVIDEOX_2B, _cogvideox_scheduler(3.0),
             (480, 720, 49), (13, 16, 60, 90), (226, 4096), (3, 4, 8, 8), (16, 16)),
        Arch("cogvideox-5b", "5.6B", "CogVideoXTransformer3DModel", "cogvideox", COGVIDEOX_5B,
             TINY_COGVIDEOX_5B, _cogvideox_scheduler(1.0),
             (480, 720, 49), (13, 16, 60, 90), (226, 4096), (3, 4, 8, 8), (16, 16)),
        Arch("wan2.1-1.3b", "1.4B", "WanTransformer3DModel", "wan", WAN21_1_3B, TINY_WAN, _wan_scheduler,
             (480, 832, 81), (16, 21, 60, 104), (512, 4096), (4, 2, 8, 8), (8, 16)),
    )
}


# ---------------------------------------------------------------------- building
@contextlib.contextmanager
def building_on(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Create tensors on ``device`` with floating default ``dtype`` (no fp32 copy on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_denoiser(arch: Arch, tiny: bool, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The denoiser with random weights, built on ``device`` in ``dtype`` and cast as the trainer casts it."""
    import diffusers

    denoiser_class = getattr(diffusers, arch.denoiser_class)
    with building_on(device, dtype):
        model = denoiser_class(**(arch.tiny_config if tiny else arch.config))
    if torch.device(device).type != "meta":
        cast_frozen(model, device, dtype)  # exactly as the trainer casts the frozen base
    return model


def make_spec(arch: Arch, denoiser: nn.Module) -> Any:
    """The family spec around ``denoiser``, with the schedule of the model's own scheduler config."""
    from sdpo.models.base import MediaFormat
    from sdpo.schedules import NoiseSchedule

    if arch.family == "sd":
        from sdpo.models.sd import StableDiffusionSpec as spec_class
    elif arch.family == "sdxl":
        from sdpo.models.sd import StableDiffusionXLSpec as spec_class
    elif arch.family == "cogvideox":
        from sdpo.models.cogvideox import CogVideoXSpec as spec_class
    elif arch.family == "wan":
        from sdpo.models.wan import WanSpec as spec_class
    else:
        raise ValueError(f"unknown family {arch.family!r}")
    height, width, frames = arch.media
    return spec_class(
        NoiseSchedule.from_scheduler(arch.scheduler()),
        denoiser,
        media_format=MediaFormat(height=height, width=width, frames=frames),
    )


def add_lora(spec: Any, model: nn.Module, rank: int) -> int:
    """Rank-``rank`` adapters on the spec's targets, trained in float32 as the trainer does; their size."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=spec.lora_target_modules())
    )
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_batch(arch: Arch, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """One random pair: float32 latents (as the cache stores them) and conditioning in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    latents = arch.tiny_latents if tiny else arch.latents
    tokens, width = arch.tiny_text if tiny else arch.text

    def normal(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator)

    cond = {"encoder_hidden_states": normal(1, tokens, width).to(device, dtype)}
    pooled = arch.tiny_pooled if tiny else arch.pooled
    if pooled:
        height, width_px, _ = arch.media
        cond["text_embeds"] = normal(1, pooled).to(device, dtype)
        cond["time_ids"] = torch.tensor([[height, width_px, 0, 0, height, width_px]], dtype=dtype, device=device)
    from sdpo.data.batch import PairBatch

    return PairBatch(chosen=normal(1, *latents).to(device), rejected=normal(1, *latents).to(device), conditions=cond)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
