"""Stable Diffusion 1.x/2.x and SDXL: UNet2DConditionModel + AutoencoderKL + CLIP text encoder(s).

Latents are (B, 4, H/8, W/8), scaled by the VAE's ``scaling_factor``. The prediction type
(epsilon or v) is whatever the pipeline's scheduler config says.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.models.base import MediaFormat
from sdpo.models.diffusers_spec import Component, DiffusersSpec
from sdpo.models.modules import diffusers_config, model_timesteps, module_device, module_dtype

# Attention projections (self and cross) and the GEGLU feed-forward of every transformer block.
_UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _clip_token_ids(tokenizer: Any, prompts: list[str]) -> Tensor:
    """Token ids padded / truncated to the tokenizer's own length (77 for CLIP), as the pipelines do."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a list of prompts, not a single string")
    return list(prompts)


class StableDiffusionSpec(DiffusersSpec):
    """Stable Diffusion 1.5 (and 2.x): epsilon- or v-prediction UNet, one CLIP text encoder.

    Conditions: ``{"encoder_hidden_states": (B, 77, D)}`` (the text encoder's last hidden state).
    """

    family: ClassVar[str] = "sd"
    denoiser_subfolder = "unet"
    lora_candidates = _UNET_LORA_TARGETS
    default_media_format: ClassVar[MediaFormat | None] = MediaFormat(height=512, width=512)

    components: ClassVar[tuple[Component, ...]] = (
        Component("denoiser", "unet", "diffusers", "UNet2DConditionModel", "denoiser"),
        Component("vae", "vae", "diffusers", "AutoencoderKL", "vae"),
        Component("text_encoder", "text_encoder", "transformers", "CLIPTextModel", "text"),
        Component("tokenizer", "tokenizer", "transformers", "AutoTokenizer", "text"),
    )

    @classmethod
    def pipeline_name(cls) -> str:
        return "StableDiffusionPipeline"

    def latent_shape(self) -> tuple[int, ...]:
        """(C, H/s, W/s) with the VAE's downsampling s (8 for the real models), as the pipeline draws noise."""
        scale = 2 ** (len(self._require_vae().config.block_out_channels) - 1)
        fmt = self.media_format
        return (int(diffusers_config(self.denoiser).in_channels), fmt.height // scale, fmt.width // scale)

    @classmethod
    def component_dtype(cls, folder: str, component: Component, torch_dtype: torch.dtype) -> torch.dtype:
        """fp16 overflows in a VAE whose config says ``force_upcast`` (SDXL's): such a VAE loads in float32."""
        if component.role == "vae" and torch_dtype == torch.float16:
            config_path = os.path.join(folder, component.subfolder, "config.json")
            if os.path.isfile(config_path):
                with open(config_path, encoding="utf-8") as handle:
                    if json.load(handle).get("force_upcast", False):
                        return torch.float32
        return torch_dtype

    # ------------------------------------------------------------------ the network
    def predict(
        self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]
    ) -> Tensor:
        """The UNet's eps (or v) prediction for latents (B, 4, h, w)."""
        return model(
            noisy_latents,
            model_timesteps(timesteps, noisy_latents.device),
            encoder_hidden_states=conditions["encoder_hidden_states"],
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ encoders
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (B, 77, D)}`` from the CLIP text encoder."""
        prompts = _check_prompts(prompts)
        encoder = self._require(self.text_encoder, "text encoder", "load_text_encoder")
        tokenizer = self._require(self.tokenizer, "tokenizer", "load_text_encoder")
        ids = _clip_token_ids(tokenizer, prompts).to(module_device(encoder))
        # SD-era CLIP checkpoints are trained without an attention mask; a few configs ask for one.
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (ids != tokenizer.pad_token_id).long()
        with torch.no_grad():
            hidden = encoder(ids, attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden}

    def encode_media(
        self, pixels: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scaled latents (B, 4, H/8, W/8), float32, for images (B, 3, H, W) in [-1, 1].

        By default the posterior mean is used (deterministic, so a precompute cache is
        reproducible); ``sample=True`` draws from the posterior as the reference Diffusion-DPO code does.
        """
        posterior = self._posterior(pixels)
        return self._scaled(posterior.sample(generator) if sample else posterior.mode())

    def encode_media_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and std, both in the scaled latent space of ``encode_media`` (float32).

        ``mean + std * eps`` (eps standard normal) is distributed as ``encode_media(pixels, sample=True)``:
        the std is multiplied by ``scaling_factor`` as the latents are (the shift moves only the mean).
        """
        posterior = self._posterior(pixels)
        return self._scaled(posterior.mean), posterior.std.float() * self._require_vae().config.scaling_factor

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1], float32 on the CPU, for scaled latents (the inverse of ``_scaled``)."""
        vae = self._require_vae()
        config = vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        raw = latents.float() / config.scaling_factor + shift
        with torch.no_grad():
            pixels = vae.decode(raw.to(module_device(vae), module_dtype(vae))).sample
        return pixels.float().clamp(-1.0, 1.0).cpu()

    def _posterior(self, pixels: Tensor) -> Any:
        vae = self._require_vae()
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise InputError(f"{self.family} expects images (B, 3, H, W), got shape {tuple(pixels.shape)}")
        with torch.no_grad():
            return vae.encode(pixels.to(module_device(vae), module_dtype(vae))).latent_dist

    def _scaled(self, latents: Tensor) -> Tensor:
        config = self._require_vae().config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents.float() - shift) * config.scaling_factor


class StableDiffusionXLSpec(StableDiffusionSpec):
    """SDXL: two CLIP text encoders, pooled text embeddings and size/crop micro-conditioning.

    Conditions: ``encoder_hidden_states`` (B, 77, D1 + D2) (penultimate hidden states of both
    encoders, concatenated), ``text_embeds`` (B, P) (the pooled, projected output of the second
    encoder) and ``time_ids`` (B, 6) = (original H, W, crop top, left, target H, W). ``time_ids``
    come from ``media_format`` at encode time (no crop, original size = target size); a loader that
    knows the true original size and crop can overwrite them with :meth:`time_ids`.
    """

    family: ClassVar[str] = "sdxl"
    default_media_format: ClassVar[MediaFormat | None] = MediaFormat(height=1024, width=1024)
    text_encoder_2: Any
    """The second CLIP text encoder (with projection), None when loaded with ``load_text_encoder=False``."""
    tokenizer_2: Any
    """The second tokenizer, None when loaded with ``load_text_encoder=False``."""

    components: ClassVar[tuple[Component, ...]] = (
        *StableDiffusionSpec.components,
        Component("text_encoder_2", "text_encoder_2", "transformers", "CLIPTextModelWithProjection", "text"),
        Component("tokenizer_2", "tokenizer_2", "transformers", "AutoTokenizer", "text"),
    )

    @classmethod
    def pipeline_name(cls) -> str:
        return "StableDiffusionXLPipeline"

    @staticmethod
    def time_ids(
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        batch_size: int = 1,
    ) -> Tensor:
        """SDXL micro-conditioning (B, 6): original (H, W), crop (top, left), target (H, W), float32."""
        target_size = target_size or original_size
        row = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)
        return row.expand(batch_size, 6).clone()

    def predict(
        self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]
    ) -> Tensor:
        """The UNet's prediction, with the pooled text and size conditioning as ``added_cond_kwargs``."""
        time_ids = conditions.get("time_ids")
        if time_ids is None:  # conditions from an older cache: fall back to the configured media size
            size = (self.media_format.height, self.media_format.width)
            time_ids = self.time_ids(size, batch_size=noisy_latents.shape[0])
        added = {
            "text_embeds": conditions["text_embeds"],
            "time_ids": time_ids.to(device=noisy_latents.device, dtype=conditions["text_embeds"].dtype),
        }
        return model(
            noisy_latents,
            model_timesteps(timesteps, noisy_latents.device),
            encoder_hidden_states=conditions["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``encoder_hidden_states``, pooled ``text_embeds`` and ``time_ids`` for each prompt."""
        prompts = _check_prompts(prompts)
        pairs = [
            (self._require(self.text_encoder, "text encoder", "load_text_encoder"), self.tokenizer),
            (
                self._require(self.text_encoder_2, "second text encoder", "load_text_encoder"),
                self.tokenizer_2,
            ),
        ]
        hidden_states, pooled = [], None
        with torch.no_grad():
            for encoder, tokenizer in pairs:
                self._require(tokenizer, "tokenizers", "load_text_encoder")
                ids = _clip_token_ids(tokenizer, prompts).to(module_device(encoder))
                output = encoder(ids, output_hidden_states=True)
                # SDXL conditions on the penultimate layer of both encoders (no final layer norm).
                hidden_states.append(output.hidden_states[-2])
                pooled = getattr(output, "text_embeds", None)
        if pooled is None:
            raise RuntimeError(
                "the second SDXL text encoder must be a CLIPTextModelWithProjection (pooled output)"
            )
        size = (self.media_format.height, self.media_format.width)
        return {
            "encoder_hidden_states": torch.cat(hidden_states, dim=-1),
            "text_embeds": pooled,
            "time_ids": self.time_ids(size, batch_size=len(prompts)).to(pooled.device),
        }
