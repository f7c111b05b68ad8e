"""CogVideoX (2B, 5B, 1.5): CogVideoXTransformer3DModel + AutoencoderKLCogVideoX + T5 text encoder.

v-prediction on a zero-terminal-SNR DDPM schedule. Latents are (B, F, C, H, W) (frames before
channels, unlike the VAE, which works in (B, C, F, H, W)), scaled by the VAE's ``scaling_factor``.
Models with ``use_rotary_positional_embeddings`` (5B, 1.5) need 3-D rotary embeddings for every
forward pass; :meth:`CogVideoXSpec.predict` builds them from the latent shape.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.models.base import MediaFormat
from sdpo.models.diffusers_spec import Component, DiffusersSpec
from sdpo.models.modules import diffusers_config, model_timesteps, module_device, module_dtype

# Self-attention over the joint text+video sequence, and the feed-forward of each block.
_COGVIDEOX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def centered_fit(grid: tuple[int, int], base: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (h, w) grid lands when scaled to fit inside a (base_h, base_w) grid, centred.

    Returns ((top, left), (bottom, right)) in base-grid coordinates. CogVideoX 1.0 spreads the
    rotary positions of any resolution over this region of its training grid, so positions keep the
    scale they were trained at.
    """
    height, width = grid
    base_height, base_width = base
    if height * base_width > base_height * width:  # relatively taller than the base: fill its height
        fit_height, fit_width = base_height, int(round(base_height * width / height))
    else:  # relatively wider (or the same aspect): fill its width
        fit_height, fit_width = int(round(base_width * height / width)), base_width
    top = int(round((base_height - fit_height) / 2.0))
    left = int(round((base_width - fit_width) / 2.0))
    return (top, left), (top + fit_height, left + fit_width)


def rotary_embedding(
    config: Any, latent_frames: int, latent_height: int, latent_width: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The (cos, sin) 3-D rotary tables a CogVideoX transformer expects for a latent video shape.

    ``config`` is the transformer's config. ``latent_frames`` must already be a multiple of
    ``patch_size_t`` when the model has one (CogVideoX 1.5). Each table is (tokens, head_dim), float32.
    """
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    patch = config.patch_size
    grid = (latent_height // patch, latent_width // patch)
    base = (config.sample_height // patch, config.sample_width // patch)
    if config.patch_size_t is None:
        # CogVideoX 1.0: positions interpolated over the training grid (see centered_fit).
        cos, sin = get_3d_rotary_pos_embed(
            embed_dim=config.attention_head_dim,
            crops_coords=centered_fit(grid, base),
            grid_size=grid,
            temporal_size=latent_frames,
            device=device,
        )  # (cos, sin): use_real defaults to true
        return cos, sin
    # CogVideoX 1.5: integer positions ("slice" of a table sized for the training grid), one per
    # temporal patch.
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=config.attention_head_dim,
        crops_coords=None,
        grid_size=grid,
        temporal_size=latent_frames // config.patch_size_t,
        grid_type="slice",
        max_size=base,
        device=device,
    )
    return cos, sin


class CogVideoXSpec(DiffusersSpec):
    """CogVideoX text-to-video.

    Conditions: ``{"encoder_hidden_states": (B, L, D)}``, the T5 last hidden state for prompts padded
    to the transformer's ``max_text_seq_length`` (226): the model's positional embeddings assume
    exactly that many text tokens.
    """

    family: ClassVar[str] = "cogvideox"
    denoiser_subfolder = "transformer"
    lora_candidates = _COGVIDEOX_LORA_TARGETS
    default_media_format: ClassVar[MediaFormat | None] = MediaFormat(height=480, width=720, frames=49)

    components: ClassVar[tuple[Component, ...]] = (
        Component("denoiser", "transformer", "diffusers", "CogVideoXTransformer3DModel", "denoiser"),
        Component("vae", "vae", "diffusers", "AutoencoderKLCogVideoX", "vae"),
        Component("text_encoder", "text_encoder", "transformers", "T5EncoderModel", "text"),
        Component("tokenizer", "tokenizer", "transformers", "AutoTokenizer", "text"),
    )

    @classmethod
    def pipeline_name(cls) -> str:
        return "CogVideoXPipeline"

    def latent_shape(self) -> tuple[int, ...]:
        """(F', C, H/8, W/8), F' = (F-1)/4+1 latent frames, padded to a multiple of ``patch_size_t``
        (CogVideoX 1.5) as the pipeline pads them."""
        vae_config = self._require_vae().config
        config = diffusers_config(self.denoiser)
        scale = 2 ** (len(vae_config.block_out_channels) - 1)
        fmt = self.media_format
        frames = (int(fmt.frames or 1) - 1) // int(vae_config.temporal_compression_ratio) + 1
        if config.patch_size_t is not None and frames % config.patch_size_t:
            frames += config.patch_size_t - frames % config.patch_size_t
        return (frames, int(config.in_channels), fmt.height // scale, fmt.width // scale)

    def sample_kwargs(self) -> dict[str, Any]:
        """Size, frames and the text length the transformer was built for."""
        return {**super().sample_kwargs(), "max_sequence_length": self.max_sequence_length}

    # ------------------------------------------------------------------ the network
    def predict(
        self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]
    ) -> Tensor:
        """The transformer's v prediction for latents (B, F, C, h, w).

        CogVideoX 1.5 patches time in pairs (``patch_size_t``); an odd latent frame count is padded
        at the front with copies of the first frame and the padding is cut from the prediction, as
        the pipeline puts its extra frames first and drops them.
        """
        config = diffusers_config(model)
        frames = noisy_latents.shape[1]
        pad = 0
        if config.patch_size_t is not None and frames % config.patch_size_t:
            pad = config.patch_size_t - frames % config.patch_size_t
            noisy_latents = torch.cat(
                [noisy_latents[:, :1].expand(-1, pad, -1, -1, -1), noisy_latents], dim=1
            )
        rotary = None
        if config.use_rotary_positional_embeddings:
            _, latent_frames, _, height, width = noisy_latents.shape
            rotary = rotary_embedding(config, latent_frames, height, width, noisy_latents.device)
        prediction = model(
            hidden_states=noisy_latents,
            encoder_hidden_states=conditions["encoder_hidden_states"],
            timestep=model_timesteps(timesteps, noisy_latents.device),
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return prediction[:, pad:]

    # ------------------------------------------------------------------ encoders
    @property
    def max_sequence_length(self) -> int:
        """Text tokens per prompt: the transformer's ``max_text_seq_length``."""
        return int(diffusers_config(self.denoiser).max_text_seq_length)

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (B, max_text_seq_length, D)}`` from the T5 encoder."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        encoder = self._require(self.text_encoder, "text encoder", "load_text_encoder")
        tokenizer = self._require(self.tokenizer, "tokenizer", "load_text_encoder")
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        # CogVideoX was trained on unmasked T5 states (padding tokens included), so no attention mask.
        with torch.no_grad():
            hidden = encoder(ids.to(module_device(encoder)))[0]
        return {"encoder_hidden_states": hidden}

    def encode_media(
        self, pixels: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scaled latents (B, (F-1)/4+1, C, H/8, W/8), float32, for videos (B, F, 3, H, W) in [-1, 1].

        Uses the posterior mean unless ``sample`` is true.
        """
        posterior = self._posterior(pixels)
        return self._scaled(posterior.sample(generator) if sample else posterior.mode())

    def encode_media_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and std in the layout and scale of ``encode_media`` (both times ``scaling_factor``)."""
        posterior = self._posterior(pixels)
        return self._scaled(posterior.mean), self._scaled(posterior.std)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Videos (B, F, 3, H, W) in [-1, 1], float32 on the CPU, for scaled latents (B, F', C, h, w)."""
        vae = self._require_vae()
        raw = latents.float().permute(0, 2, 1, 3, 4) / vae.config.scaling_factor  # the VAE wants (B, C, F, H, W)
        with torch.no_grad():
            video = vae.decode(raw.to(module_device(vae), module_dtype(vae))).sample
        return video.float().permute(0, 2, 1, 3, 4).clamp(-1.0, 1.0).cpu().contiguous()

    def _posterior(self, pixels: Tensor) -> Any:
        vae = self._require_vae()
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise InputError(f"cogvideox expects videos (B, F, 3, H, W), got shape {tuple(pixels.shape)}")
        video = pixels.permute(0, 2, 1, 3, 4)  # the VAE wants (B, C, F, H, W)
        with torch.no_grad():
            return vae.encode(video.to(module_device(vae), module_dtype(vae))).latent_dist

    def _scaled(self, latents: Tensor) -> Tensor:
        latents = latents.float().permute(0, 2, 1, 3, 4)  # the transformer wants (B, F, C, H, W)
        return (latents * self._require_vae().config.scaling_factor).contiguous()
