"""The ModelSpec protocol: everything the trainer needs to know about one model family.

The trainer never imports a family. It asks a spec for the denoising network, its noise schedule,
a prediction for noisy latents, and how to save what it trained; precompute asks the same spec to
turn media and prompts into latents and conditioning tensors.

Tensor conventions shared by every spec:
* media (pixels) are float in [-1, 1]: images (B, 3, H, W), videos (B, F, 3, H, W);
* latents are in the family's own layout and already normalised (SD/CogVideoX scale by the VAE's
  ``scaling_factor``, Wan by its per-channel ``latents_mean`` / ``latents_std``); the objective
  averages over every non-batch dimension, so the layout never matters to it;
* conditions are a dict of tensors with a leading batch dimension, stored as they are in the cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sdpo.errors import InputError, MissingFileError
from sdpo.schedules import NoiseSchedule

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""What a hub id looks like ("name" or "owner/name"); ``fullmatch`` it. A string that is neither this nor a
folder cannot be a model, so callers can refuse it before anything loads."""


@dataclass(frozen=True)
class MediaFormat:
    """The shape media must have before ``encode_media``: what loaders resize and sample to."""

    channels: int = 3
    """Colour channels of the pixels (3 for RGB models, 1 for the grey toy digits)."""
    height: int = 512
    """Pixel height."""
    width: int = 512
    """Pixel width."""
    frames: int | None = None
    """Frames per clip for video models, None for image models."""


@runtime_checkable
class ModelSpec(Protocol):
    """One model family, as the trainer and precompute see it."""

    family: ClassVar[str]
    """Short family name used in configs and cache manifests ("sd", "cogvideox", "wan", "toy")."""

    schedule: NoiseSchedule
    """The training noise schedule, built from the model's own diffusers scheduler."""

    denoiser: nn.Module
    """The network that is fine-tuned (UNet or transformer)."""

    media_format: MediaFormat
    """Resolution (and frame count) media are brought to before encoding and sampled at; chosen at
    load time (``load_spec(..., media_format=...)``) and never changed on a loaded spec."""

    pretrained: str | None
    """The folder or hub id ``from_pretrained`` loaded (None for a spec built in code)."""

    default_media_format: ClassVar[MediaFormat | None]
    """The format a spec of this class is loaded at when none is asked for; None where the model folder
    fixes it (the embedded worlds). Read on the class, before any model loads."""

    vae: Any
    """The family's autoencoder (a diffusers ``AutoencoderKL*``, which has ``enable_tiling``), or None: the
    embedded worlds have none, and a spec loaded with ``load_vae=False`` holds none. Typed Any as diffusers'
    models are read: their config and outputs by attribute."""

    denoiser_subfolder: str
    """Pipeline subfolder and argument name of the denoiser: "unet" or "transformer"."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        *,
        load_vae: bool = True,
        load_text_encoder: bool = True,
        media_format: MediaFormat | None = None,
        torch_dtype: torch.dtype = torch.float32,
        denoiser: nn.Module | None = None,
    ) -> ModelSpec:
        """Load a spec from a model folder (or a cached hub id); ``load_vae`` / ``load_text_encoder`` false
        skip those components, ``denoiser`` is used in place of the folder's, which is then not loaded."""
        ...

    @property
    def pipeline_class(self) -> type:
        """The family's diffusers pipeline class (``save_lora_weights`` / ``load_lora_weights`` / sampling)."""
        ...

    @property
    def media_kind(self) -> str:
        """"video" when ``media_format.frames`` is set, else "image"."""
        ...

    @property
    def can_sample(self) -> bool:
        """True when the spec holds every component ``sample`` needs (a spec loaded for training from a
        precompute cache, without its VAE and text encoder, does not)."""
        ...

    @property
    def default_guidance_scale(self) -> float:
        """The classifier-free guidance ``sample`` is given when the user names none (validation samples)."""
        ...

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latents at ``media_format``, in the family's layout (may need the VAE)."""
        ...

    def initial_latents(self, count: int, seed: int) -> Tensor:
        """float32 CPU noise (count, *latent shape at media_format) in the family's layout.

        Sample i depends only on (seed, i) (each drawn from its own seeded generator), so batching and
        the number of processes never change it.
        """
        ...

    def sample(
        self,
        prompts: list[str],
        latents: Tensor,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        model: nn.Module | None = None,
        progress: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """Pixels in [-1, 1], float32 on the CPU (images (B, C, H, W), videos (B, F, C, H, W)), sampled
        from the initial noise ``latents`` by the family's own sampler (diffusers pipeline) with ``model``
        (default: ``self.denoiser``, adapters as they are). ``seeds``: one per sample, for the noise a
        stochastic scheduler adds (a deterministic sampler ignores them)."""
        ...

    def load_lora(self, folder: str | os.PathLike[str]) -> None:
        """Load a LoRA written by ``save_lora`` (a training run folder) onto ``self.denoiser``."""
        ...

    def lora_target_modules(self) -> list[str]:
        """Names of the projections LoRA adapts (attention and feed-forward), present in this model."""
        ...

    def predict(self, model: nn.Module, noisy_latents: Tensor, timesteps: Tensor, conditions: dict[str, Tensor]) -> Tensor:
        """The network's prediction in its native target (eps, v or u) for latents in the family's layout.

        ``model`` is the denoiser, possibly wrapped (DDP, FSDP); ``timesteps`` are
        ``schedule.model_timestep(t)`` values, one per sample.
        """
        ...

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Conditioning tensors for a list of prompts (needs the text encoder(s))."""
        ...

    def encode_media(self, pixels: Tensor) -> Tensor:
        """Normalised latents for pixels in [-1, 1] (needs the VAE).

        A family whose encoder is a posterior (the VAE families) is also a :class:`PosteriorEncoder`.
        """
        ...

    def save_lora(self, output_dir: str | Path, model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the adapters of ``model`` in the format the family's pipeline ``load_lora_weights`` reads.

        ``state_dict`` is the model's full state gathered from sharded training (FSDP, ZeRO-3);
        None reads the model's own parameters.
        """
        ...

    def save_full(self, output_dir: str | Path, model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the fully fine-tuned denoiser as a ``from_pretrained`` folder (``state_dict`` as in save_lora)."""
        ...


@runtime_checkable
class PosteriorEncoder(Protocol):
    """A spec whose encoder is a posterior (the VAE families); a deterministic encoder (the embedded worlds) is not one.

    Precompute then stores the posterior's std too, so training can draw a fresh latent each step
    (``TrainConfig.latent_sampling``).
    """

    def encode_media_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and std for pixels in [-1, 1], both normalised as ``encode_media``'s latents are."""
        ...


@runtime_checkable
class LatentDecoder(Protocol):
    """A spec that turns its own latents back into media: what online RL (``method: grpo``) needs, as it
    samples latents step by step itself and scores the media. SD, SDXL, CogVideoX and Wan (their VAEs) and the
    embedded worlds (identity) are; a family without it is refused by ``method: grpo`` before any model loads."""

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Media in [-1, 1], float32 on the CPU, for normalised latents in the family's layout."""
        ...


class ModelNotFoundError(MissingFileError):
    """A model folder or hub id that cannot be loaded; the message says which and how to fix it."""


def resolve_pretrained(name_or_path: str | os.PathLike[str]) -> str:
    """A local folder for ``name_or_path``: the folder itself, or the cached snapshot of a hub id.

    Fails at once, with one line naming the problem, instead of diffusers' 30-second retry loop and
    its misleading "does not appear to have a file named config.json".
    """
    text = str(name_or_path)
    if os.path.isdir(text):
        return text
    if not HUB_ID.fullmatch(text):
        raise ModelNotFoundError(f"model folder not found: {text} (check the path)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(text, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not in the local cache"
        if offline:
            raise ModelNotFoundError(
                f"{text!r} is neither a local folder nor a cached hub model, and HF_HUB_OFFLINE=1 forbids a "
                f"download: run `huggingface-cli download {text}` where the hub is reachable, or pass a local folder"
            ) from error
    try:
        return snapshot_download(text)
    except Exception as error:  # noqa: BLE001
        raise ModelNotFoundError(
            f"could not download {text!r} from the model hub ({type(error).__name__}); pass a local folder, "
            f"or check the id and your access to it"
        ) from error


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Parameters that require gradient, detached and on the CPU (what a checkpoint must keep)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def peft_lora_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor] | None = None, adapter: str = "default"
) -> dict[str, Any]:
    """The LoRA A/B weights of a diffusers model in diffusers' key format, read from ``state_dict`` if given.

    Selected by key (``<module>.lora_A.<adapter>.weight`` -> ``<module>.lora_A.weight``, as peft names
    them) rather than by peft's walk over module names: activation-checkpoint wrappers (FSDP) add a
    segment to module names that ``state_dict()`` strips, and the walk then finds nothing.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    inner = unwrap(model)
    if state_dict is None:
        state_dict = inner.state_dict()
    marker = f".{adapter}."
    adapters = {
        key.replace(marker, "."): value
        for key, value in state_dict.items()
        if marker in key and (".lora_A." in key or ".lora_B." in key)
    }
    if not adapters:
        raise InputError(f"the model has no LoRA weights of adapter {adapter!r} to save")
    return convert_state_dict_to_diffusers(adapters)


def save_denoiser(model: nn.Module, folder: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
    """``model.save_pretrained(folder)``, or its config plus ``state_dict`` in the same sharded layout.

    diffusers' ``save_pretrained`` always reads the model's own parameters, which after sharded
    training hold only this process's shard; the gathered ``state_dict`` is written instead.
    """
    inner: Any = unwrap(model)  # a diffusers ModelMixin: nn.Module declares neither save_pretrained nor save_config
    if state_dict is None:
        inner.save_pretrained(str(folder))
        return
    from huggingface_hub import save_torch_state_dict

    os.makedirs(folder, exist_ok=True)
    inner.save_config(str(folder))
    save_torch_state_dict(
        {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()},
        str(folder),
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size="10GB",
    )


def move_encoders(spec: ModelSpec, device: torch.device | str) -> None:
    """Move every network of ``spec`` except its denoiser (VAE, text encoders) to ``device``.

    Precompute runs only the encoders, so the denoiser stays where it was loaded.
    """
    for value in vars(spec).values():
        if isinstance(value, nn.Module) and value is not spec.denoiser:
            value.to(device)
