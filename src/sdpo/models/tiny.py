"""Tiny, randomly initialised diffusers pipelines of every family, saved as real model folders.

They have the same components, configs and on-disk layout as the real models (only much smaller),
so tests and offline demos exercise exactly the code paths a real checkpoint takes: ``load_spec``
on the folder, the family pipeline's ``from_pretrained`` and ``load_lora_weights``. Weights are
seeded, so a given builder always writes the same model. Nothing is downloaded.

Sizes (latent/pixel): SD and SDXL use a 2-level VAE (x2 downsampling: 16x16 pixels -> 8x8 latents);
CogVideoX and Wan use their VAEs' real x8 spatial / x4 temporal compression (5 frames of 32x32 ->
2 latent frames of 4x4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_SEED = 0


def _seeded(build: Callable[[], Any], offset: int) -> Any:
    """``build()`` under a fixed seed, leaving the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED + offset)
        return build()


def _saved(pipe: Any, folder: str | Path) -> Path:
    """``pipe.save_pretrained(folder)``; ``pipe`` is Any because mypy cannot see DiffusionPipeline's
    ``save_pretrained`` through the family pipelines' mixin bases."""
    pipe.save_pretrained(str(folder))
    return Path(folder)


# ---------------------------------------------------------------------- tokenizers
def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes, in a fixed order."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIP tokenizer over single bytes (no merges): every text tokenises, offline.

    Vocabulary: the two special tokens, each byte symbol, and each byte symbol with CLIP's
    end-of-word marker ``</w>`` (514 entries).
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(symbol + "</w>" for symbol in alphabet)]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int) -> Any:
    """A T5-style (Unigram) tokenizer over characters; ids 0/1/2 are pad, eos and unk as in T5.

    ``transformers``' T5Tokenizer is built from a vocabulary list directly, so no sentencepiece
    model (and no sentencepiece package) is needed.
    """
    import string

    from transformers import T5Tokenizer

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -3.5) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _t5_config(vocab_size: int, umt5: bool = False) -> Any:
    from transformers import T5Config, UMT5Config

    config_class = UMT5Config if umt5 else T5Config
    return config_class(
        vocab_size=vocab_size,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        # A PreTrainedConfig keyword (kept in config.json) that transformers' typed T5Config signature leaves out.
        decoder_start_token_id=0,  # type: ignore[call-arg]
    )


def _clip_text_config(vocab_size: int, hidden_size: int, projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


# ---------------------------------------------------------------------- SD / SDXL
def tiny_unet(cross_attention_dim: int, **extra: Any) -> Any:
    """A randomly initialised two-level UNet2DConditionModel of SD's layout (``extra``: SDXL's added conditioning)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,  # the number of heads, in this class's legacy naming
        norm_num_groups=8,
        **extra,
    )


def _tiny_vae_2d() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def _ddpm_kwargs() -> dict[str, Any]:
    """The SD-family training betas ("scaled_linear" from 0.00085 to 0.012)."""
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
    }


def build_tiny_sd(folder: str | Path, *, prediction_type: str = "epsilon") -> Path:
    """A tiny StableDiffusionPipeline (DDIM scheduler, ``prediction_type`` epsilon or v) saved to ``folder``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_seeded(_tiny_vae_2d, 1),
        text_encoder=_seeded(lambda: CLIPTextModel(_clip_text_config(len(tokenizer), 32)), 2),
        tokenizer=tokenizer,
        unet=_seeded(lambda: tiny_unet(32), 3),
        scheduler=DDIMScheduler(
            **_ddpm_kwargs(),
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _saved(pipe, folder)


def build_tiny_sdxl(folder: str | Path) -> Path:
    """A tiny StableDiffusionXLPipeline (two CLIP encoders of width 16, Euler scheduler) saved to ``folder``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    time_embed_dim, pooled_dim = 8, 16
    pipe = StableDiffusionXLPipeline(
        vae=_seeded(_tiny_vae_2d, 11),
        text_encoder=_seeded(lambda: CLIPTextModel(_clip_text_config(len(tokenizer), 16)), 12),
        text_encoder_2=_seeded(
            lambda: CLIPTextModelWithProjection(
                _clip_text_config(len(tokenizer), 16, projection_dim=pooled_dim)
            ),
            13,
        ),
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=_seeded(
            lambda: tiny_unet(
                32,  # the two encoders' hidden states, concatenated (16 + 16)
                addition_embed_type="text_time",
                addition_time_embed_dim=time_embed_dim,
                projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
            ),
            14,
        ),
        scheduler=EulerDiscreteScheduler(**_ddpm_kwargs(), steps_offset=1, timestep_spacing="leading"),
    )
    return _saved(pipe, folder)


# ---------------------------------------------------------------------- CogVideoX
def build_tiny_cogvideox(folder: str | Path, rotary: bool = False) -> Path:
    """A tiny CogVideoXPipeline saved to ``folder``.

    ``rotary=False`` mirrors CogVideoX-2B (sinusoidal positions, DDIM scheduler with SNR shift 3);
    ``rotary=True`` mirrors CogVideoX-5B (3-D rotary embeddings, DPM scheduler). Rotary needs a head
    width the 3-D split (1/4 time, 3/8 height, 3/8 width, each even) can divide, so its heads are
    16 wide instead of 8. Text is padded to 16 tokens (``max_text_seq_length``).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5EncoderModel

    text_length = 16
    tokenizer = tiny_t5_tokenizer(text_length)
    scheduler_class = CogVideoXDPMScheduler if rotary else CogVideoXDDIMScheduler
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(lambda: T5EncoderModel(_t5_config(len(tokenizer))), 21),
        vae=_seeded(
            lambda: AutoencoderKLCogVideoX(
                block_out_channels=(8, 8, 8, 8),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=2,
                temporal_compression_ratio=4,
            ),
            22,
        ),
        transformer=_seeded(
            lambda: CogVideoXTransformer3DModel(
                num_attention_heads=2,
                attention_head_dim=16 if rotary else 8,
                in_channels=4,
                out_channels=4,
                time_embed_dim=16,
                text_embed_dim=16,
                num_layers=1,
                sample_width=8,
                sample_height=8,
                sample_frames=9,
                patch_size=2,
                temporal_compression_ratio=4,
                max_text_seq_length=text_length,
                use_rotary_positional_embeddings=rotary,
            ),
            23,
        ),
        scheduler=scheduler_class(
            **_ddpm_kwargs(),
            clip_sample=False,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
            snr_shift_scale=1.0 if rotary else 3.0,
        ),
    )
    return _saved(pipe, folder)


# ---------------------------------------------------------------------- Wan
def build_tiny_wan(folder: str | Path) -> Path:
    """A tiny WanPipeline saved to ``folder``, scheduler configured as in the Wan 2.1 diffusers folders.

    The VAE has 4 latent channels with non-trivial ``latents_mean`` / ``latents_std`` so that the
    per-channel normalisation is actually exercised.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    tokenizer = tiny_t5_tokenizer(512)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(lambda: UMT5EncoderModel(_t5_config(len(tokenizer), umt5=True)), 31),
        vae=_seeded(
            lambda: AutoencoderKLWan(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, -0.4],
                latents_std=[1.5, 0.5, 2.0, 1.0],
            ),
            32,
        ),
        transformer=_seeded(
            lambda: WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=12,
                in_channels=4,
                out_channels=4,
                text_dim=16,
                freq_dim=32,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ),
            33,
        ),
        # As in Wan-AI/Wan2.1-T2V-*-Diffusers: UniPC over shifted flow sigmas (shift 3 for 480p).
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        ),
    )
    return _saved(pipe, folder)
