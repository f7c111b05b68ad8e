"""Validation samples during training: the spec's own ``sample`` around the current denoiser.

A spec trained from a precompute cache holds no VAE or text encoder; validation loads them once per
spec (the training denoiser in the folder's denoiser's place, so no second copy of it loads) and keeps
them on the CPU between calls, on the denoiser's device only while it samples, so training keeps the
accelerator's memory. What is saved is what ``sdpo generate`` and a user of the exported weights
would see: the family's diffusers pipeline (the embedded worlds: their own sampler). Images are
written as PNG, videos as animated GIF (no video codec needed).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from sdpo.models.base import ModelSpec, move_encoders, unwrap

GIF_FRAME_MS = 125
"""Milliseconds each frame of a validation GIF is shown (8 frames a second)."""

_SAMPLERS: weakref.WeakKeyDictionary[ModelSpec, ModelSpec] = weakref.WeakKeyDictionary()
"""Training spec -> the spec loaded with its encoders to sample it, loaded on the first validation."""


@contextlib.contextmanager
def sampling_spec(spec: ModelSpec, denoiser: nn.Module) -> Iterator[ModelSpec]:
    """``spec`` when it can sample; else the same model folder loaded (on the first call) with its
    encoders in the dtype of ``denoiser``, which it uses in place of the folder's, its encoders on the
    denoiser's device until the block ends."""
    if spec.can_sample:
        yield spec
        return
    parameter = next(denoiser.parameters())
    sampler = _SAMPLERS.get(spec)
    if sampler is None:
        if spec.pretrained is None:
            raise RuntimeError(f"the {spec.family} spec has no encoders and no model folder to load them from")
        sampler = type(spec).from_pretrained(spec.pretrained, media_format=spec.media_format,
                                             torch_dtype=parameter.dtype, denoiser=denoiser)
        _SAMPLERS[spec] = sampler
    move_encoders(sampler, parameter.device)
    try:
        yield sampler
    finally:
        move_encoders(sampler, "cpu")


def write_validation_samples(
    spec: ModelSpec,
    model: nn.Module,
    prompts: list[str],
    folder: str | Path,
    num_inference_steps: int = 25,
    seed: int = 0,
    write: bool = True,
    guidance_scale: float | None = None,
) -> list[Path]:
    """Sample one image or clip per prompt with the current weights and save them under ``folder``.

    Prompt i starts from ``initial_latents(len(prompts), seed)[i]``; each prompt is its own ``sample``
    call, so a large video model holds one clip's activations at a time. ``write=False`` samples
    without saving: the other processes of a sharded model, whose forward passes the main process
    needs. ``guidance_scale`` None: the spec's ``default_guidance_scale``.
    """
    denoiser = unwrap(model)
    with sampling_spec(spec, denoiser) as sampler:
        guidance = sampler.default_guidance_scale if guidance_scale is None else guidance_scale
        latents = sampler.initial_latents(len(prompts), seed)
        media = [sampler.sample([prompt], latents[index : index + 1], num_inference_steps=num_inference_steps,
                                guidance_scale=guidance, model=denoiser, seeds=[seed + index])[0]
                 for index, prompt in enumerate(prompts)]
    if not write:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [_write(medium, folder / f"{index:02d}") for index, medium in enumerate(media)]
    (folder / "prompts.txt").write_text("".join(f"{i:02d}\t{p}\n" for i, p in enumerate(prompts)))
    return written


def _write(medium: Tensor, stem: Path) -> Path:
    """An image (C, H, W) as ``stem.png``, a clip (F, C, H, W) as ``stem.gif``; pixels in [-1, 1]."""
    from PIL import Image

    array = ((medium.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
              for a in array.reshape(-1, *array.shape[-3:]).permute(0, 2, 3, 1).numpy()]
    if medium.ndim == 3:
        path = stem.with_suffix(".png")
        frames[0].save(path, format="PNG")
    else:
        path = stem.with_suffix(".gif")
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return path
