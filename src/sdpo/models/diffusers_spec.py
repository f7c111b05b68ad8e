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
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.models.base import MediaFormat, resolve_pretrained, unwrap
from sdpo.models.loading import load_component, load_scheduler
from sdpo.models.lora import checked_lora_folder
from sdpo.models.modules import module_device, module_dtype
from sdpo.models.spec_base import SpecBase
from sdpo.schedules import NoiseSchedule

_Spec = TypeVar("_Spec", bound="DiffusersSpec")


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


class DiffusersSpec(SpecBase):
    """Base of the diffusers-backed specs: attributes, sampling and the save / LoRA plumbing they share.

    Subclasses set the class attributes and implement ``predict``, ``encode_prompts``,
    ``encode_media`` and ``latent_shape``. Sampling (``sample``) and ``load_lora`` go through the
    family's own diffusers pipeline, assembled from the components this spec loaded (nothing is read
    from disk again), with the pipeline's own scheduler from the model folder.
    """

    family: ClassVar[str] = ""
    default_media_format: ClassVar[MediaFormat | None] = MediaFormat()
    """The format a spec is loaded at when none is asked for (every family sets its own)."""

    vae: Any
    """The autoencoder (a diffusers ``AutoencoderKL*``), None when loaded with ``load_vae=False``."""
    text_encoder: Any
    """The (first) text encoder, None when loaded with ``load_text_encoder=False``."""
    tokenizer: Any
    """The (first) tokenizer, None when loaded with ``load_text_encoder=False``."""

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
        chosen = media_format or self.default_media_format
        if chosen is None:
            raise TypeError(f"{type(self).__name__} sets no default_media_format: pass a media_format")
        self.media_format: MediaFormat = chosen
        self.pretrained: str | None = pretrained
        self.scheduler = scheduler
        self.vae = components.get("vae")
        for name in names:
            setattr(self, name, components.get(name))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls: type[_Spec],
        pretrained: str | Path,
        *,
        load_vae: bool = True,
        load_text_encoder: bool = True,
        media_format: MediaFormat | None = None,
        torch_dtype: torch.dtype = torch.float32,
        denoiser: nn.Module | None = None,
    ) -> _Spec:
        """Load the spec from a diffusers pipeline folder or a cached hub id.

        ``load_vae`` / ``load_text_encoder`` false skip those components (training from a precompute
        cache needs neither); encoders are frozen and in eval mode. ``denoiser``: a network to use in
        place of the folder's, which is then not loaded (validation samples with the one in training).
        """
        folder = resolve_pretrained(pretrained)
        enabled = {"denoiser": denoiser is None, "vae": load_vae, "text": load_text_encoder}
        loaded: dict[str, Any] = {}
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
        if denoiser is not None:
            loaded["denoiser"] = denoiser
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
    @property
    def default_guidance_scale(self) -> float:
        """The guidance the family's pipeline samples with when given none (its ``__call__`` default)."""
        return float(inspect.signature(self.pipeline_class.__call__).parameters["guidance_scale"].default)

    @property
    def can_sample(self) -> bool:
        """True when every component ``sample`` needs is loaded (VAE, text encoders and tokenizers)."""
        return all(getattr(self, c.name) is not None for c in self.components if c.role != "denoiser")

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
        self._require(self.text_encoder, "text encoder", "load_text_encoder")
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

    def load_lora(self, folder: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Load a LoRA written by ``save_lora`` (a run folder) onto ``self.denoiser``, through the pipeline's
        own ``load_lora_weights``. ``adapter_name`` names the adapter (diffusers picks one when None)."""
        path = checked_lora_folder(folder)
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

    def _require_vae(self) -> Any:
        return self._require(self.vae, "VAE", "load_vae")
