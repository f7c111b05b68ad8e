"""Wan 2.1 text-to-video: WanTransformer3DModel + AutoencoderKLWan + UMT5 text encoder.

Rectified flow with shifted sigmas: ``x_t = (1 - s) x_0 + s eps``, target ``eps - x_0``, and the
transformer is given ``s * 1000`` as its timestep (the schedule's ``model_timestep``). Latents are
(B, C, F, H, W), normalised per channel as ``(z - latents_mean) / latents_std`` with the vectors
from the VAE config (not a single scaling factor).
"""

from __future__ import annotations

import html
import re
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.models.base import MediaFormat
from sdpo.models.diffusers_spec import Component, DiffusersSpec
from sdpo.models.loading import load_scheduler
from sdpo.models.modules import diffusers_config, model_timesteps, module_device, module_dtype
from sdpo.schedules import NoiseSchedule

# Self- and cross-attention projections and the feed-forward of each block. ``add_k_proj`` /
# ``add_v_proj`` (image conditioning of the I2V models) are deliberately left out.
_WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def flow_training_scheduler(scheduler: Any) -> Any:
    """A scheduler ``NoiseSchedule.from_scheduler`` reads as the flow schedule ``scheduler`` samples.

    The Wan 2.1 diffusers folders ship a ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True``
    and ``flow_shift``; it also carries (unused) DDPM tables, so reading it directly would give a
    DDPM schedule. Its flow sigmas are the same shifted grid as a ``FlowMatchEulerDiscreteScheduler``
    with ``shift = flow_shift``, which is what is returned. A flow-matching scheduler is returned as is.
    """
    config = scheduler.config
    if not config.get("use_flow_sigmas", False):
        if config.get("prediction_type") == "flow_prediction":
            raise InputError(f"{type(scheduler).__name__} predicts flow but does not use flow sigmas")
        return scheduler
    if config.get("use_dynamic_shifting", False):
        raise InputError(
            "schedulers with use_dynamic_shifting need a resolution-dependent shift; set a fixed flow_shift"
        )
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=int(config["num_train_timesteps"]), shift=float(config.get("flow_shift", 1.0))
    )


def clean_prompt(text: str) -> str:
    """Undo HTML escaping and collapse whitespace, as Wan's pipeline does before tokenising.

    (The pipeline also runs ``ftfy.fix_text`` when ftfy is installed; that repair of mojibake is
    applied here too when ftfy is available, so cached and pipeline embeddings agree.)
    """
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class WanSpec(DiffusersSpec):
    """Wan 2.1 text-to-video (1.3B and 14B; single transformer).

    Conditions: ``{"encoder_hidden_states": (B, 512, D)}``, UMT5 states of the cleaned prompt with
    the positions after the prompt's last token set to zero, exactly as the pipeline builds them.
    """

    family: ClassVar[str] = "wan"
    denoiser_subfolder = "transformer"
    lora_candidates = _WAN_LORA_TARGETS
    default_media_format: ClassVar[MediaFormat | None] = MediaFormat(height=480, width=832, frames=81)
    max_sequence_length: int = 512
    """Text tokens per prompt (the pipeline's default; an instance may change it)."""

    components: ClassVar[tuple[Component, ...]] = (
        Component("denoiser", "transformer", "diffusers", "WanTransformer3DModel", "denoiser"),
        Component("vae", "vae", "diffusers", "AutoencoderKLWan", "vae"),
        Component("text_encoder", "text_encoder", "transformers", "UMT5EncoderModel", "text"),
        Component("tokenizer", "tokenizer", "transformers", "AutoTokenizer", "text"),
    )

    def __init__(
        self, schedule: NoiseSchedule, denoiser: nn.Module, media_format: MediaFormat | None = None, **components: Any
    ) -> None:
        if schedule.prediction_type != "flow":
            raise InputError(
                f"Wan is a flow model, but its scheduler gave a {schedule.prediction_type!r} schedule"
            )
        super().__init__(schedule, denoiser, media_format, **components)

    @classmethod
    def pipeline_name(cls) -> str:
        return "WanPipeline"

    def latent_shape(self) -> tuple[int, ...]:
        """(C, F', H/8, W/8) with the VAE's temporal and spatial scale factors, as the pipeline draws noise."""
        vae_config = self._require_vae().config
        fmt = self.media_format
        frames = (int(fmt.frames or 1) - 1) // int(vae_config.scale_factor_temporal) + 1
        spatial = int(vae_config.scale_factor_spatial)
        return (int(diffusers_config(self.denoiser).in_channels), frames, fmt.height // spatial, fmt.width // spatial)

    def sample_kwargs(self) -> dict[str, Any]:
        """Size, frames and the prompt length."""
        return {**super().sample_kwargs(), "max_sequence_length": self.max_sequence_length}

    def pipeline_latents(self, latents: Tensor, model: nn.Module) -> Tensor:
        """float32: the Wan pipeline keeps its latents in float32 and casts only the transformer's input."""
        return latents.to(module_device(model), torch.float32)

    @classmethod
    def schedule_from_folder(cls, folder: str) -> NoiseSchedule:
        """The shipped UniPC scheduler converted to the flow-matching one it samples (see flow_training_scheduler)."""
        return NoiseSchedule.from_scheduler(flow_training_scheduler(load_scheduler(folder)))

    @classmethod
    def component_dtype(cls, folder: str, component: Component, torch_dtype: torch.dtype) -> torch.dtype:
        """The VAE stays float32: the Wan reference code runs it in float32, and its normalised latents
        are what the cache keeps."""
        return torch.float32 if component.role == "vae" else torch_dtype

    # ------------------------------------------------------------------ the network
    def predict(
        self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]
    ) -> Tensor:
        """The transformer's flow prediction (eps - x_0) for latents (B, C, F, h, w).

        ``timesteps`` are ``schedule.model_timestep(t)``, i.e. sigma * 1000 (not the index t).
        """
        return model(
            hidden_states=noisy_latents,
            timestep=model_timesteps(timesteps, noisy_latents.device),
            encoder_hidden_states=conditions["encoder_hidden_states"],
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ encoders
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (B, max_sequence_length, D)}`` from the UMT5 encoder."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        encoder = self._require(self.text_encoder, "text encoder", "load_text_encoder")
        tokenizer = self._require(self.tokenizer, "tokenizer", "load_text_encoder")
        tokens = tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = module_device(encoder)
        mask = tokens.attention_mask.to(device)
        with torch.no_grad():
            hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state
        # Wan was trained with the padded positions zeroed, not with the encoder's states there.
        return {"encoder_hidden_states": hidden * mask.unsqueeze(-1).to(hidden.dtype)}

    def _latent_stats(self, vae: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std from the VAE config, shaped (1, C, 1, 1, 1), float32."""
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def encode_media(
        self, pixels: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Normalised latents (B, C, (F-1)/4+1, H/8, W/8), float32, for videos (B, F, 3, H, W) in [-1, 1].

        Uses the posterior mean unless ``sample`` is true.
        """
        posterior = self._posterior(pixels)
        latents = (posterior.sample(generator) if sample else posterior.mode()).float()
        mean, std = self._latent_stats(self._require_vae(), latents.device)
        return (latents - mean) / std

    def encode_media_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and std, normalised as ``encode_media`` normalises latents: the mean
        by ``(x - latents_mean) / latents_std``, the std divided by ``latents_std`` (per channel)."""
        posterior = self._posterior(pixels)
        mean, std = self._latent_stats(self._require_vae(), posterior.mean.device)
        return (posterior.mean.float() - mean) / std, posterior.std.float() / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Videos (B, F, 3, H, W) in [-1, 1], float32 on the CPU, for normalised latents (B, C, F', h, w)."""
        vae = self._require_vae()
        mean, std = self._latent_stats(vae, latents.device)
        raw = latents.float() * std + mean
        with torch.no_grad():
            video = vae.decode(raw.to(module_device(vae), module_dtype(vae))).sample
        return video.float().permute(0, 2, 1, 3, 4).clamp(-1.0, 1.0).cpu().contiguous()

    def _posterior(self, pixels: Tensor) -> Any:
        vae = self._require_vae()
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise InputError(f"wan expects videos (B, F, 3, H, W), got shape {tuple(pixels.shape)}")
        video = pixels.permute(0, 2, 1, 3, 4)  # the VAE (and the transformer) work in (B, C, F, H, W)
        with torch.no_grad():
            return vae.encode(video.to(module_device(vae), module_dtype(vae))).latent_dist
