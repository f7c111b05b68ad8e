"""Loading the parts of a diffusers pipeline folder: one component, the scheduler, the dtype keyword.

Nothing here imports diffusers or transformers at module level, so importing a spec module (and the
registry) stays cheap; the heavy libraries are imported when a model is actually loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from sdpo.errors import InputError
from sdpo.models.base import ModelNotFoundError


def load_component(
    loader: Any,
    folder: str,
    subfolder: str,
    *,
    enabled: bool = True,
    torch_dtype: torch.dtype | None = None,
    frozen: bool = False,
) -> Any:
    """``loader.from_pretrained(folder, subfolder=...)``, or None when ``enabled`` is false.

    ``torch_dtype`` is left out for tokenizers (pass None). ``frozen`` puts a network in eval mode
    with gradients off (encoders are never trained). A missing subfolder is reported as a
    ``ModelNotFoundError`` naming it, rather than diffusers' generic "no file named config.json".
    """
    if not enabled:
        return None
    if not os.path.isdir(os.path.join(folder, subfolder)):
        raise ModelNotFoundError(
            f"model folder {folder} has no {subfolder}/ component (is it a diffusers pipeline folder?)"
        )
    kwargs: dict[str, Any] = {"subfolder": subfolder}
    if torch_dtype is not None:
        kwargs[_dtype_keyword(loader)] = torch_dtype
    component = loader.from_pretrained(folder, **kwargs)
    if frozen and isinstance(component, nn.Module):
        component.requires_grad_(False).eval()
    return component


def _dtype_keyword(loader: Any) -> str:
    """The ``from_pretrained`` keyword for the dtype: ``dtype`` where ``torch_dtype`` is deprecated
    (transformers >= 5, diffusers >= 0.42), else ``torch_dtype``."""
    module = getattr(loader, "__module__", "")
    if module.startswith("transformers"):
        import transformers

        return "dtype" if _version(transformers.__version__) >= (5, 0) else "torch_dtype"
    return diffusers_dtype_keyword()


def diffusers_dtype_keyword() -> str:
    """``dtype`` for diffusers >= 0.42 (which deprecates ``torch_dtype``), else ``torch_dtype``."""
    import diffusers

    return "dtype" if _version(diffusers.__version__) >= (0, 42) else "torch_dtype"


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def load_scheduler(folder: str, subfolder: str = "scheduler") -> Any:
    """The pipeline's scheduler, of the class named in its ``scheduler_config.json``."""
    import diffusers

    config_path = os.path.join(folder, subfolder, "scheduler_config.json")
    if not os.path.isfile(config_path):
        raise ModelNotFoundError(f"model folder {folder} has no {subfolder}/scheduler_config.json")
    with open(config_path, encoding="utf-8") as handle:
        class_name = json.load(handle)["_class_name"]
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise InputError(f"{config_path} names {class_name!r}, which this diffusers version does not provide")
    return scheduler_class.from_pretrained(folder, subfolder=subfolder)
