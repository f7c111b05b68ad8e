"""The ModelSpec of the toy digits model: a Stable-Diffusion-shaped family without a VAE.

The 8x8 grey pixels in [-1, 1] are the latents themselves (identity encode), so precompute, the
trainer and the sampler treat the toy exactly as they treat Stable Diffusion, only faster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.models.base import MediaFormat, ModelNotFoundError, peft_lora_state_dict, save_denoiser, unwrap
from sdpo.schedules import NoiseSchedule
from sdpo.toy.base_model import ToyModelConfig, check_folder, tokenize
from sdpo.toy.data import IMAGE_SIZE
from sdpo.toy.pretraining import ToyCacheError

TOY_MEDIA_FORMAT = MediaFormat(channels=1, height=IMAGE_SIZE, width=IMAGE_SIZE)
# The projections of diffusers' BasicTransformerBlock: attention (self and cross) and feed-forward.
_LORA_CANDIDATES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class ToySpec:
    """The toy digits model (UNet2DConditionModel + tiny CLIP text encoder) as a ModelSpec.

    Attributes:
        pretrained: the folder it was loaded from.
        unet: the denoiser (also ``denoiser``).
        text_encoder: the CLIP text encoder, or None when loaded without it.
        tokenizer: the word-level fast tokenizer.
        scheduler: the training DDPMScheduler.
        schedule: the NoiseSchedule read from ``scheduler``.
        max_prompt_tokens: the fixed padded prompt length the model was trained with.
    """

    family: ClassVar[str] = "toy"
    media_format: MediaFormat = TOY_MEDIA_FORMAT

    def __init__(
        self,
        pretrained: Path,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        tokenizer: Any,
        scheduler: Any,
        max_prompt_tokens: int,
    ) -> None:
        self.pretrained = pretrained
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.max_prompt_tokens = max_prompt_tokens
        self.schedule = NoiseSchedule.from_scheduler(scheduler)

    @property
    def denoiser(self) -> nn.Module:
        """The network that is fine-tuned: the UNet."""
        return self.unet

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike[str],
        *,
        load_vae: bool = True,
        load_text_encoder: bool = True,
        media_format: MediaFormat | None = None,
        torch_dtype: torch.dtype = torch.float32,
    ) -> ToySpec:
        """Load a folder written by ``pretrain_base``.

        ``load_vae`` is accepted for the common signature and ignored: the toy has no VAE.
        ``media_format`` may only repeat the toy's fixed 1x8x8 format.
        """
        del load_vae  # pixels are the latents
        if media_format is not None and media_format != TOY_MEDIA_FORMAT:
            raise ValueError(f"the toy model only handles {TOY_MEDIA_FORMAT}, got {media_format}")
        folder = Path(pretrained).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"toy model folder not found: {folder} (create one with sdpo.toy.pretrain_base or `sdpo demo`)"
            )
        marker = check_folder(folder)
        try:
            config = ToyModelConfig.from_dict(marker["config"])
        except (TypeError, ValueError) as error:
            raise ToyCacheError(
                f"toy base model folder {folder} is corrupt: invalid config ({error}); delete it and run again"
            ) from error

        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        try:
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch_dtype)
            text_encoder = (
                CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch_dtype) if load_text_encoder else None
            )
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
            scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        except Exception as error:  # noqa: BLE001 - any load failure of a marked folder is damage
            raise ToyCacheError(
                f"toy base model folder {folder} is corrupt: cannot load it ({type(error).__name__}: {error}); "
                f"delete it and run again to retrain it"
            ) from error
        unet.eval()
        if text_encoder is not None:
            text_encoder.eval().requires_grad_(False)
        return cls(folder, unet, text_encoder, tokenizer, scheduler, config.max_prompt_tokens)

    # ---------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids (B, max_prompt_tokens), padded as in pretraining."""
        return tokenize(self.tokenizer, list(prompts), self.max_prompt_tokens)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (B, max_prompt_tokens, D)}`` from the text encoder's last layer."""
        if self.text_encoder is None:
            raise RuntimeError("this ToySpec was loaded with load_text_encoder=False; it cannot encode prompts")
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenize(list(prompts)).to(device)
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}

    def encode_media(self, pixels: Tensor) -> Tensor:
        """The pixels themselves (B, 1, 8, 8): the toy's latent space is its pixel space."""
        expected = (TOY_MEDIA_FORMAT.channels, TOY_MEDIA_FORMAT.height, TOY_MEDIA_FORMAT.width)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"toy media must have shape (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")
        return pixels

    # ---------------------------------------------------------------- the network
    def predict(self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]) -> Tensor:
        """The UNet's prediction (epsilon, or v for a v-prediction config) for noisy 8x8 pixels."""
        return model(noisy_latents, timesteps, encoder_hidden_states=conditions["encoder_hidden_states"]).sample

    def lora_target_modules(self) -> list[str]:
        """Attention (self and cross) and feed-forward projections that exist in this UNet."""
        names = [name for name, _ in unwrap(self.unet).named_modules()]
        return [c for c in _LORA_CANDIDATES if any(name == c or name.endswith("." + c) for name in names)]

    # ---------------------------------------------------------------- saving
    def save_lora(
        self, output_dir: str | os.PathLike[str], model: nn.Module, state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write the adapters as ``pytorch_lora_weights.safetensors``, readable by SD's ``load_lora_weights``.

        The adapter config (rank, alpha, targets) goes into the file's metadata, so a reload restores
        the same scale even when ``lora_alpha != r``.
        """
        from diffusers import StableDiffusionPipeline

        inner = unwrap(model)
        peft_config = getattr(inner, "peft_config", None)
        if not peft_config:
            raise ValueError("the model has no LoRA adapters to save; use save_full for a fully tuned UNet")
        # peft_lora_state_dict reads the adapter named "default", as diffusers' add_adapter names it.
        adapter = "default" if "default" in peft_config else next(iter(peft_config))
        StableDiffusionPipeline.save_lora_weights(
            str(output_dir),
            unet_lora_layers=peft_lora_state_dict(inner, state_dict),
            unet_lora_adapter_metadata=peft_config[adapter].to_dict(),
        )

    def save_full(
        self, output_dir: str | os.PathLike[str], model: nn.Module, state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write the fully fine-tuned UNet to ``output_dir/unet`` (a ``from_pretrained`` folder)."""
        if getattr(unwrap(model), "peft_config", None):
            raise ValueError("the model carries LoRA adapters: save them with save_lora (or fuse them first)")
        save_denoiser(model, Path(output_dir) / "unet", state_dict)
