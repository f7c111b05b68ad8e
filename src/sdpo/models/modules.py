"""Facts about torch modules the specs ask for: device, dtype, a diffusers model's config, timesteps as networks take them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sdpo.models.base import unwrap


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a parameterless module)."""
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 if it has none)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def model_timesteps(timesteps: Tensor, device: torch.device) -> Tensor:
    """Timesteps as the networks want them: float32, one per sample, on the latents' device.

    The schedule hands out float64 values (t for DDPM, sigma * 1000 for flow). float64 is not
    supported everywhere (MPS), and bf16/fp16 cannot represent them (999 rounds to 1000 in bf16),
    so float32 is the one safe dtype: every family's sinusoidal embedding upcasts to float32 anyway.
    """
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim == 0:
        timesteps = timesteps[None]
    return timesteps.to(device=device, dtype=torch.float32)


def diffusers_config(model: nn.Module) -> Any:
    """The config of a diffusers model (through DDP / compile wrappers): a FrozenDict read by attribute,
    whose fields no static type describes."""
    return unwrap(model).config
