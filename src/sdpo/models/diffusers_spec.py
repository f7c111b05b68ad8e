"""DiffusersSpec: the base of the diffusers-backed specs (SD, SDXL, CogVideoX, Wan).

Nothing here imports diffusers or transformers at module level, so importing a spec module (and the
registry) stays cheap; the heavy libraries are imported when a model is actually loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError, MissingFileError
from sdpo.models.base import MediaFormat, peft_lora_state_dict, resolve_pretrained, save_denoiser, unwrap
from sdpo.models.loading import load_component, load_scheduler
from sdpo.models.lora import existing_suffixes, lora_adapter_metadata
from sdpo.models.modules import module_device, module_dtype
from sdpo.schedules import NoiseSchedule
from sdpo.seeding import derive_seed


@dataclass(frozen=True)
class Component:
    """One entry of a diffusers pipeline folder that a spec loads."""

    name: str
    """Keyword of the spec's constructor and attribute name ("denoiser", "vae", "text_encoder", ...)."""
    subfolder: str
    """Folder inside the pipeline folder ("unet", "transformer", "vae", "tokenizer_2", ...)."""
    library: str
    """Module that provides ``class_name``: "diffusers" or "transformers"."""
    class_name: str
    """Class whose ``from_pretrained`` loads it; a name ending in "Tokenizer" is loaded without a dtype."""
    role: str
    """"denoiser", "vae" (skipped with ``load_vae=False``) or "text" (skipped with ``load_text_encoder=False``)."""


class DiffusersSpec:
    """Base of the diffusers-backed specs: attributes, sampling and the save / LoRA plumbing they share.

    Subclasses set the class attributes and implement ``predict``, ``encode_prompts`` and
    ``encode_media``. Sampling (``initial_latents`` / ``sample``) and ``load_lora`` go through the
    family's own diffusers pipeline, assembled from the components this spec loaded (nothing is read
    from disk again), with the pipeline's own scheduler from the model folder.
    """

    family: ClassVar[str] = ""
    denoiser_subfolder: ClassVar[str] = "transformer"
    """Pipeline subfolder (and pipeline argument name) of the denoiser: "unet" or "transformer"."""
    lora_candidates: ClassVar[tuple[str, ...]] = ()
    """Module-name suffixes LoRA should adapt, filtered by ``lora_target_modules`` to those present."""
    default_media_format: ClassVar[MediaFormat] = MediaFormat()

    components: ClassVar[tuple[Component, ...]] = ()
    """What ``from_pretrained`` loads from the pipeline folder, besides the scheduler."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        denoiser: nn.Module,
        media_format: MediaFormat | None = None,
        *,
        pretrained: str | None = None,
        scheduler: Any = None,
        **components: Any,
    ) -> None:
        """``components``: the VAE, text encoders and tokenizers by name (see ``components``); missing ones are None.

        ``pretrained``: the folder or hub id the spec was loaded from (None for a spec built in code);
        ``scheduler``: the diffusers scheduler ``sample`` uses (None: the default of the sampling
        pipeline cannot be guessed, so ``sample`` then fails with a message).
        """
        names = {c.name for c in self.components if c.role != "denoiser"}
        unknown = set(components) - names - {"vae"}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no component(s) {', '.join(sorted(unknown))}")
        self.schedule = schedule
        self.denoiser = denoiser
        self.media_format = media_format or self.default_media_format
        self.pretrained = pretrained
        self.scheduler = scheduler
        self.vae = components.get("vae")
        for name in names:
            setattr(self, name, components.get(name))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        *,
        load_vae: bool = True,
        load_text_encoder: bool = True,
        media_format: MediaFormat | None = None,
        torch_dtype: torch.dtype = torch.float32,
    ) -> Any:
        """Load the spec from a diffusers pipeline folder or a cached hub id.

        ``load_vae`` / ``load_text_encoder`` false skip those components (training from a precompute
        cache needs neither); encoders are frozen and in eval mode.
        """
        folder = resolve_pretrained(pretrained)
        enabled = {"denoiser": True, "vae": load_vae, "text": load_text_encoder}
        loaded = {}
        for component in cls.components:
            loader = getattr(importlib.import_module(component.library), component.class_name)
            is_network = not component.class_name.endswith("Tokenizer")
            loaded[component.name] = load_component(
                loader,
                folder,
                component.subfolder,
                enabled=enabled[component.role],
                torch_dtype=cls.component_dtype(folder, component, torch_dtype) if is_network else None,
                frozen=component.role != "denoiser",
            )
        return cls(
            cls.schedule_from_folder(folder),
            media_format=media_format,
            pretrained=str(pretrained),
            scheduler=load_scheduler(folder),
            **loaded,
        )

    @classmethod
    def schedule_from_folder(cls, folder: str) -> NoiseSchedule:
        """The training schedule of the pipeline's scheduler."""
        return NoiseSchedule.from_scheduler(load_scheduler(folder))

    @classmethod
    def component_dtype(cls, folder: str, component: Component, torch_dtype: torch.dtype) -> torch.dtype:
        """The dtype ``component`` is loaded in when ``torch_dtype`` is asked for (a family may keep one in fp32)."""
        return torch_dtype

    # ------------------------------------------------------------------ pipeline class
    @classmethod
    def pipeline_name(cls) -> str:
        """Name of the diffusers pipeline class of this family."""
        raise NotImplementedError

    @property
    def pipeline_class(self) -> type:
        """The diffusers pipeline class (imported on first use: it pulls in transformers)."""
        import diffusers

        return getattr(diffusers, self.pipeline_name())

    @property
    def media_kind(self) -> str:
        """"video" when ``media_format`` has frames, else "image"."""
        return "video" if self.media_format.frames else "image"

    # ------------------------------------------------------------------ sampling
    def pipeline(self, model: nn.Module | None = None, *, progress: bool = False) -> Any:
        """The family's diffusers pipeline around this spec's components, ``model`` (default: the denoiser)
        in the denoiser's place and a fresh copy of the folder's scheduler (schedulers keep state)."""
        if self.scheduler is None:
            raise RuntimeError(f"the {self.family} spec has no sampling scheduler: load it with from_pretrained")
        parts: dict[str, Any] = {c.name: getattr(self, c.name) for c in self.components if c.role != "denoiser"}
        parts[self.denoiser_subfolder] = unwrap(model if model is not None else self.denoiser)
        parts["scheduler"] = type(self.scheduler).from_config(self.scheduler.config)
        parameters = inspect.signature(self.pipeline_class.__init__).parameters
        for name, parameter in parameters.items():
            if name != "self" and name not in parts and parameter.default is inspect.Parameter.empty:
                parts[name] = None  # optional components (safety checker, feature extractor) are left out
        if "requires_safety_checker" in parameters:
            parts["requires_safety_checker"] = False
        pipe = self.pipeline_class(**parts)
        pipe.set_progress_bar_config(disable=not progress)
        return pipe

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's initial noise at ``media_format``, as the pipeline lays it out."""
        raise NotImplementedError

    def initial_latents(self, count: int, seed: int) -> Tensor:
        """float32 CPU noise (count, *latent_shape()); sample i is drawn from its own generator seeded
        ``derive_seed(seed, i)``, so batching and process count never change it."""
        shape = self.latent_shape()
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, i)))
                 for i in range(count)]
        return torch.stack(noise) if noise else torch.zeros((0, *shape))

    def sample_kwargs(self) -> dict[str, Any]:
        """Pipeline call arguments fixed by the spec: the size (and frames) of ``media_format``."""
        fmt = self.media_format
        kwargs: dict[str, Any] = {"height": fmt.height, "width": fmt.width}
        if fmt.frames is not None:
            kwargs["num_frames"] = fmt.frames
        return kwargs

    def pipeline_latents(self, latents: Tensor, model: nn.Module) -> Tensor:
        """Initial noise as the pipeline is handed it: in the denoiser's dtype (SD, CogVideoX feed it straight in)."""
        return latents.to(module_device(model), module_dtype(model))

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
        """Pixels in [-1, 1], float32 on the CPU (images (B, C, H, W), videos (B, F, C, H, W)), sampled by
        the family's pipeline from the initial noise ``latents`` (B, *latent_shape()).

        ``seeds``: one per sample for the randomness of stochastic schedulers (CogVideoX's DPM); each
        sample gets its own generator, so a sample never depends on the others in its batch.
        """
        if isinstance(prompts, str):
            raise TypeError("sample takes a list of prompts, not a single string")
        if latents.shape[0] != len(prompts) or tuple(latents.shape[1:]) != self.latent_shape():
            raise InputError(f"latents {tuple(latents.shape)} do not fit {len(prompts)} prompt(s) of latent shape "
                             f"{self.latent_shape()} (media format {self.media_format})")
        self._require_vae()
        self._require(getattr(self, "text_encoder", None), "text encoder", "load_text_encoder")
        denoiser = unwrap(model if model is not None else self.denoiser)
        pipe = self.pipeline(denoiser, progress=progress)
        seeds = list(seeds) if seeds is not None else [0] * len(prompts)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        dtype = module_dtype(denoiser)
        # Under accelerate's mixed precision the denoiser's forward returns float32; autocast lets the
        # pipeline hand those latents to a half-precision VAE.
        autocast = (torch.autocast(module_device(denoiser).type, dtype=dtype)
                    if dtype in (torch.float16, torch.bfloat16) else contextlib.nullcontext())
        was_training = denoiser.training
        denoiser.eval()
        try:
            with torch.no_grad(), autocast:
                output = pipe(prompt=list(prompts), latents=self.pipeline_latents(latents, denoiser),
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=generators, output_type="pt", **self.sample_kwargs())
        finally:
            denoiser.train(was_training)
        media = output.images if hasattr(output, "images") else output.frames
        return (media.float().cpu() * 2 - 1).clamp_(-1, 1)

    def load_lora(self, folder: str | Path, adapter_name: str | None = None) -> None:
        """Load a LoRA written by ``save_lora`` (a run folder) onto ``self.denoiser``, through the pipeline's
        own ``load_lora_weights``. ``adapter_name`` names the adapter (diffusers picks one when None)."""
        path = Path(folder)
        if not path.exists():
            raise MissingFileError(f"LoRA folder not found: {path}")
        if path.is_dir() and not any(path.glob("*.safetensors")):
            raise MissingFileError(f"no LoRA weights (*.safetensors) in {path}: is it a finished training run?")
        pipe = self.pipeline(self.denoiser) if self.scheduler is not None else None
        if pipe is None:
            raise RuntimeError(f"the {self.family} spec has no pipeline to load a LoRA with: load it with from_pretrained")
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)

    # ------------------------------------------------------------------ checks
    def _require(self, component: Any, what: str, flag: str) -> Any:
        if component is None:
            raise RuntimeError(
                f"the {self.family} spec was loaded without its {what}: load it with {flag}=True, "
                f"or read the precomputed tensors from the precompute cache instead"
            )
        return component

    def _require_vae(self) -> nn.Module:
        return self._require(self.vae, "VAE", "load_vae")

    # ------------------------------------------------------------------ LoRA and saving
    def lora_target_modules(self) -> list[str]:
        """Attention q/k/v/out and feed-forward projections present in this denoiser."""
        return existing_suffixes(self.denoiser, self.lora_candidates)

    def save_lora(self, output_dir: str | Path, model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write ``model``'s adapters where the family pipeline's ``load_lora_weights`` finds them.

        ``state_dict``: the full state gathered from sharded training; None reads ``model``.
        """
        name = self.denoiser_subfolder
        kwargs: dict[str, Any] = {f"{name}_lora_layers": peft_lora_state_dict(model, state_dict)}
        metadata = lora_adapter_metadata(model)
        if metadata is not None:
            kwargs[f"{name}_lora_adapter_metadata"] = metadata
        os.makedirs(output_dir, exist_ok=True)
        self.pipeline_class.save_lora_weights(str(output_dir), **kwargs)

    def save_full(self, output_dir: str | Path, model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> None:
        """Save the fine-tuned denoiser to ``output_dir/<unet|transformer>`` (a ``from_pretrained`` folder)."""
        save_denoiser(model, os.path.join(str(output_dir), self.denoiser_subfolder), state_dict)
