"""SpecBase: what every concrete spec shares, whether a diffusers pipeline samples it or its own sampler does.

The diffusers families (:class:`sdpo.models.diffusers_spec.DiffusersSpec`) and the embedded worlds
(:class:`sdpo.toy.spec.ToySpec`) both derive from it, so their seeded noise, LoRA target filter and
save formats are one piece of code. Nothing here imports diffusers at module level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.models.base import MediaFormat, peft_lora_state_dict, save_denoiser
from sdpo.models.lora import existing_suffixes, lora_adapter_metadata
from sdpo.seeding import derive_seed


class SpecBase:
    """Shared members of the concrete specs; a subclass sets the attributes and implements ``latent_shape``
    and ``pipeline_name``."""

    denoiser: nn.Module
    media_format: MediaFormat
    denoiser_subfolder: str = "transformer"
    """Pipeline subfolder (and pipeline argument name) of the denoiser: "unet" or "transformer"."""
    lora_candidates: tuple[str, ...] = ()
    """Module-name suffixes LoRA should adapt, filtered by ``lora_target_modules`` to those present."""

    @property
    def media_kind(self) -> str:
        """"video" when ``media_format`` has frames, else "image"."""
        return "video" if self.media_format.frames else "image"

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's initial noise at ``media_format``, in the family's layout."""
        raise NotImplementedError

    def initial_latents(self, count: int, seed: int) -> Tensor:
        """float32 CPU noise (count, *latent_shape()); sample i is drawn from its own generator seeded
        ``derive_seed(seed, i)``, so batching and process count never change it."""
        shape = self.latent_shape()
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, i)))
                 for i in range(count)]
        return torch.stack(noise) if noise else torch.zeros((0, *shape))

    def pipeline_name(self) -> str:
        """Name of the diffusers pipeline class of this family (whose LoRA loaders the adapters use)."""
        raise NotImplementedError

    @property
    def pipeline_class(self) -> Any:
        """The diffusers pipeline class (imported on first use: it pulls in transformers).

        Typed Any: its LoRA class methods (``save_lora_weights``, ``lora_state_dict``) come from mixins
        picked per family, which no one static type names.
        """
        import diffusers

        return getattr(diffusers, self.pipeline_name())

    def lora_target_modules(self) -> list[str]:
        """Attention q/k/v/out and feed-forward projections of ``lora_candidates`` present in this denoiser."""
        return existing_suffixes(self.denoiser, self.lora_candidates)

    def save_lora(self, output_dir: str | os.PathLike[str], model: nn.Module,
                  state_dict: dict[str, Tensor] | None = None) -> None:
        """Write ``model``'s adapters where the family pipeline's ``load_lora_weights`` finds them, with the
        adapter config (rank, alpha, targets) in the file's metadata so a reload restores the same scale.

        ``state_dict``: the full state gathered from sharded training; None reads ``model``.
        """
        name = self.denoiser_subfolder
        kwargs: dict[str, Any] = {f"{name}_lora_layers": peft_lora_state_dict(model, state_dict)}
        metadata = lora_adapter_metadata(model)
        if metadata is not None:
            kwargs[f"{name}_lora_adapter_metadata"] = metadata
        os.makedirs(output_dir, exist_ok=True)
        self.pipeline_class.save_lora_weights(str(output_dir), **kwargs)

    def save_full(self, output_dir: str | os.PathLike[str], model: nn.Module,
                  state_dict: dict[str, Tensor] | None = None) -> None:
        """Save the fine-tuned denoiser to ``output_dir/<unet|transformer>`` (a ``from_pretrained`` folder)."""
        save_denoiser(model, Path(output_dir) / self.denoiser_subfolder, state_dict)
