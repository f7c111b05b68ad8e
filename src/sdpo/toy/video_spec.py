"""The ModelSpec of the video toy: a CogVideoX- or Wan-shaped family without a VAE.

The clips' grey pixels in [-1, 1] are the latents themselves (identity encode), put in the layout
of the arch's transformer: CogVideoX (B, F, C, H, W), Wan (B, C, F, H, W). Precompute, the trainer
and the sampler therefore treat the toy exactly as they treat the real video families; LoRA is saved
through the real ``CogVideoXPipeline`` / ``WanPipeline.save_lora_weights`` (``DiffusersSpec.save_lora``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.models._common import DiffusersSpec, existing_suffixes, module_device
from sdpo.models.base import MediaFormat, ModelNotFoundError, unwrap
from sdpo.models.cogvideox import CogVideoXSpec
from sdpo.models.wan import WanSpec
from sdpo.schedules import NoiseSchedule
from sdpo.toy.base_model import tokenize
from sdpo.toy.pretraining import ToyCacheError
from sdpo.toy.video_model import VideoToyConfig, check_video_folder, from_layout, run_transformer, to_layout

_PIPELINES = {"cogvideox": "CogVideoXPipeline", "wan": "WanPipeline"}


def video_media_format(config: VideoToyConfig) -> MediaFormat:
    """The media format of a video toy config: 1 channel, ``canvas`` x ``canvas``, ``frames`` frames."""
    return MediaFormat(channels=1, height=config.canvas, width=config.canvas, frames=config.frames)


class VideoToySpec(DiffusersSpec):
    """The video toy model (CogVideoX- or Wan-style transformer + tiny CLIP text encoder) as a ModelSpec.

    Conditions: ``{"encoder_hidden_states": (B, max_prompt_tokens, D)}``, the text encoder's last layer
    for prompts padded to the fixed length (for CogVideoX that is its ``max_text_seq_length``).

    Attributes:
        pretrained: the folder it was loaded from.
        config: the VideoToyConfig the folder was trained with.
        arch: "cogvideox" or "wan".
        transformer: the denoiser (also ``denoiser``).
        text_encoder: the CLIP text encoder, or None when loaded without it.
        tokenizer: the word-level fast tokenizer, or None when loaded without the text encoder.
        scheduler: the training scheduler (CogVideoXDDIMScheduler or FlowMatchEulerDiscreteScheduler).
        schedule: the NoiseSchedule read from ``scheduler``.
    """

    family: ClassVar[str] = "toy-video"
    denoiser_subfolder: ClassVar[str] = "transformer"

    def __init__(
        self,
        pretrained: Path,
        config: VideoToyConfig,
        transformer: nn.Module,
        text_encoder: nn.Module | None,
        tokenizer: Any,
        scheduler: Any,
    ) -> None:
        super().__init__(NoiseSchedule.from_scheduler(scheduler), transformer, video_media_format(config))
        self.pretrained = pretrained
        self.config = config
        self.arch = config.arch
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler

    @property
    def transformer(self) -> nn.Module:
        """The denoiser."""
        return self.denoiser

    @property
    def pipeline_class(self) -> type:
        """``CogVideoXPipeline`` or ``WanPipeline``: whose ``save_lora_weights`` / ``load_lora_weights`` the adapters use."""
        import diffusers

        return getattr(diffusers, _PIPELINES[self.arch])

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
    ) -> VideoToySpec:
        """Load a folder written by ``pretrain_video_base``.

        ``load_vae`` is accepted for the common signature and ignored: the toy has no VAE.
        ``media_format`` may only repeat the folder's own format (its frames and canvas).
        """
        del load_vae  # pixels are the latents
        folder = Path(pretrained).expanduser()
        if not folder.is_dir():
            raise ModelNotFoundError(
                f"video toy model folder not found: {folder} "
                f"(create one with sdpo.toy.video.pretrain_video_base or `sdpo demo --world video`)"
            )
        config = VideoToyConfig.from_dict(check_video_folder(folder)["config"])
        if media_format is not None and media_format != video_media_format(config):
            raise ValueError(f"this video toy model only handles {video_media_format(config)}, got {media_format}")

        import diffusers
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        transformer_class = getattr(diffusers, "CogVideoXTransformer3DModel" if config.arch == "cogvideox"
                                    else "WanTransformer3DModel")
        scheduler_class = getattr(diffusers, "CogVideoXDDIMScheduler" if config.arch == "cogvideox"
                                  else "FlowMatchEulerDiscreteScheduler")
        try:
            transformer = transformer_class.from_pretrained(folder / "transformer", torch_dtype=torch_dtype)
            text_encoder = tokenizer = None
            if load_text_encoder:
                text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch_dtype)
                tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
            scheduler = scheduler_class.from_pretrained(folder / "scheduler")
        except Exception as error:  # noqa: BLE001 - any load failure of a marked folder is damage
            raise ToyCacheError(
                f"toy base model folder {folder} is corrupt: cannot load it ({type(error).__name__}: {error}); "
                f"delete it and run again to retrain it"
            ) from error
        transformer.eval()
        if text_encoder is not None:
            text_encoder.eval().requires_grad_(False)
        return cls(folder, config, transformer, text_encoder, tokenizer, scheduler)

    # ---------------------------------------------------------------- encoding
    @property
    def max_prompt_tokens(self) -> int:
        """The fixed padded prompt length the model was trained with."""
        return self.config.max_prompt_tokens

    def tokenize(self, prompts: list[str]) -> Tensor:
        """Token ids (B, max_prompt_tokens), padded as in pretraining."""
        tokenizer = self._require(self.tokenizer, "tokenizer", "load_text_encoder")
        return tokenize(tokenizer, list(prompts), self.max_prompt_tokens)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (B, max_prompt_tokens, D)}`` from the text encoder's last layer."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not one string")
        encoder = self._require(self.text_encoder, "text encoder", "load_text_encoder")
        ids = self.tokenize(list(prompts)).to(module_device(encoder))
        return {"encoder_hidden_states": encoder(ids).last_hidden_state}

    def _check_clips(self, clips: Tensor, what: str) -> None:
        fmt = self.media_format
        expected = (fmt.frames, fmt.channels, fmt.height, fmt.width)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(f"{what} must have shape (B, {', '.join(map(str, expected))}), got {tuple(clips.shape)}")

    def encode_media(self, pixels: Tensor) -> Tensor:
        """Latents for clips (B, F, 1, H, W) in [-1, 1]: the pixels themselves, in the arch's layout."""
        self._check_clips(pixels, "video toy media")
        return to_layout(pixels, self.arch).contiguous()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Clips (B, F, 1, H, W) from latents in the arch's layout (the inverse of ``encode_media``)."""
        clips = from_layout(latents, self.arch)
        self._check_clips(clips, "decoded latents")
        return clips

    # ---------------------------------------------------------------- the network
    def predict(self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]) -> Tensor:
        """The transformer's prediction (v for CogVideoX, eps - x_0 for Wan) for latents in the arch's layout.

        CogVideoX adds its sinusoidal position table to the joint [text; video] sequence, so the
        latents must have the frames and size it was built for and the text exactly
        ``max_text_seq_length`` tokens; anything else is a clear error here rather than a shape
        mismatch (or a silently rebuilt table) inside diffusers.
        """
        hidden = conditions["encoder_hidden_states"]
        self._check_clips(from_layout(noisy_latents, self.arch), "noisy latents (in clip layout)")
        if self.arch == "cogvideox":
            config = unwrap(model).config
            if hidden.ndim != 3 or hidden.shape[1] != config.max_text_seq_length:
                raise ValueError(f"CogVideoX needs exactly max_text_seq_length={config.max_text_seq_length} text "
                                 f"tokens, got encoder_hidden_states of shape {tuple(hidden.shape)}")
            frames, _, height, width = noisy_latents.shape[1:]
            if (frames, height, width) != (config.sample_frames, config.sample_height, config.sample_width):
                raise ValueError(f"CogVideoX's position table is for {config.sample_frames} frames of "
                                 f"{config.sample_height}x{config.sample_width}, got {frames} of {height}x{width}")
        timesteps = torch.as_tensor(timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(noisy_latents.shape[0])
        return run_transformer(model, self.arch, noisy_latents, timesteps, hidden)

    # ---------------------------------------------------------------- saving and LoRA
    def save_full(
        self, output_dir: str | os.PathLike[str], model: nn.Module, state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write the fully fine-tuned transformer to ``output_dir/transformer`` (a ``from_pretrained`` folder)."""
        if getattr(unwrap(model), "peft_config", None):
            raise ValueError("the model carries LoRA adapters: save them with save_lora (or fuse them first)")
        super().save_full(output_dir, model, state_dict)

    def lora_target_modules(self) -> list[str]:
        """Attention q/k/v/out and feed-forward projections, named as in the real family's spec."""
        candidates = CogVideoXSpec.lora_candidates if self.arch == "cogvideox" else WanSpec.lora_candidates
        return existing_suffixes(self.denoiser, candidates)

    def load_lora(self, lora_dir: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
        """Load adapters written by ``save_lora`` into ``model`` (default: the denoiser) and return it.

        Goes through the family pipeline's ``lora_state_dict`` / ``load_lora_into_transformer``, the
        same path ``load_lora_weights`` takes on a real pipeline.
        """
        model = self.denoiser if model is None else model
        state_dict, metadata = self.pipeline_class.lora_state_dict(str(lora_dir), return_lora_metadata=True)
        self.pipeline_class.load_lora_into_transformer(state_dict, transformer=unwrap(model), metadata=metadata)
        return model
