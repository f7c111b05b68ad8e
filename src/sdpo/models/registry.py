"""Family name -> spec class, and ``load_spec`` to build a spec from a model folder or hub id."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from sdpo.errors import InputError
from sdpo.models.base import MediaFormat, ModelSpec
from sdpo.models.cogvideox import CogVideoXSpec
from sdpo.models.sd import StableDiffusionSpec, StableDiffusionXLSpec
from sdpo.models.wan import WanSpec

SPECS: dict[str, type[ModelSpec]] = {
    "sd": StableDiffusionSpec,
    "sdxl": StableDiffusionXLSpec,
    "cogvideox": CogVideoXSpec,
    "wan": WanSpec,
}
"""Families whose spec class is imported already. Lazy families move here on first use."""

LAZY_SPECS: dict[str, str] = {
    # The embedded worlds live in their own package and are imported only when asked for; one spec
    # class serves both (the folder says which world, and so which family, it holds).
    "toy": "sdpo.toy.spec:ToySpec",
    "toy-video": "sdpo.toy.spec:ToySpec",
}
"""Families registered as ``"module:Class"``, imported on first use (keeps ``import`` of this module light)."""


def known_families() -> list[str]:
    """Every registered family name, sorted."""
    return sorted({*SPECS, *LAZY_SPECS})


def spec_class(family: str) -> type[ModelSpec]:
    """The spec class of ``family``, importing it if it is registered lazily."""
    if family in SPECS:
        return SPECS[family]
    if family not in LAZY_SPECS:
        raise InputError(f"unknown model family {family!r}; known families: {', '.join(known_families())}")
    module_name, _, class_name = LAZY_SPECS[family].partition(":")
    cls: type[ModelSpec] = getattr(importlib.import_module(module_name), class_name)
    SPECS[family] = cls
    return cls


def load_spec(
    family: str,
    pretrained: str | Path,
    *,
    load_vae: bool = True,
    load_text_encoder: bool = True,
    media_format: MediaFormat | None = None,
    torch_dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> ModelSpec:
    """Build the ``family`` spec from ``pretrained`` (a local folder or a cached hub id).

    ``load_vae`` / ``load_text_encoder`` false skip those components (training from a precompute
    cache needs neither). Extra keyword arguments go to the family's ``from_pretrained``.
    """
    cls = spec_class(family)
    return cls.from_pretrained(
        pretrained,
        load_vae=load_vae,
        load_text_encoder=load_text_encoder,
        media_format=media_format,
        torch_dtype=torch_dtype,
        **kwargs,
    )  # from_pretrained records ``pretrained`` and ``media_format`` itself: the spec is not mutated here
