"""Validation samples during training: the family's own diffusers pipeline around the current denoiser.

The pipeline is loaded from the spec's ``pretrained`` source with the training denoiser swapped in,
so what is saved is exactly what a user of the exported weights would see. Images are written as
PNG, videos as animated GIF (no video codec needed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdpo.models.base import unwrap
from sdpo.models.loading import diffusers_dtype_keyword


def write_validation_samples(
    spec: Any,
    model: nn.Module,
    prompts: list[str],
    folder: str | Path,
    num_inference_steps: int = 25,
    seed: int = 0,
    write: bool = True,
    guidance_scale: float | None = None,
) -> list[Path]:
    """Sample one image or clip per prompt with the current weights and save them under ``folder``.

    ``write=False`` samples without saving: the other processes of a sharded model, whose forward
    passes the main process needs. ``guidance_scale`` None: the pipeline's (or embedded world's) default.
    """
    from sdpo.models.diffusers_spec import DiffusersSpec

    if not isinstance(spec, DiffusersSpec):  # the embedded worlds sample with their own sampler
        return _write_spec_samples(spec, model, prompts, Path(folder), num_inference_steps, seed, write,
                                   guidance_scale)
    denoiser = unwrap(model)
    parameter = next(denoiser.parameters())
    pipe = spec.pipeline_class.from_pretrained(str(spec.pretrained), **{spec.denoiser_subfolder: denoiser},
                                          **{diffusers_dtype_keyword(): parameter.dtype})
    pipe.to(parameter.device)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(folder)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    fmt = spec.media_format
    size = {"height": fmt.height, "width": fmt.width}
    if fmt.frames is not None:
        size["num_frames"] = fmt.frames
    # Under mixed precision accelerate wraps the denoiser's forward to return float32, and pipelines such
    # as SD's hand those latents straight to a bf16 VAE; autocast makes the dtypes meet again.
    autocast = (torch.autocast(parameter.device.type, dtype=parameter.dtype)
                if parameter.dtype in (torch.float16, torch.bfloat16) else contextlib.nullcontext())
    written = []
    was_training = denoiser.training
    denoiser.eval()
    try:
        for index, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(seed + index)
            with torch.no_grad(), autocast:
                guidance = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
                output = pipe(prompt, num_inference_steps=num_inference_steps, generator=generator,
                              output_type="pil", **size, **guidance)
            if not write:
                continue
            if fmt.frames is None:
                path = folder / f"{index:02d}.png"
                output.images[0].save(path)
            else:
                frames = output.frames[0]
                path = folder / f"{index:02d}.gif"
                frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=125, loop=0)
            written.append(path)
    finally:
        denoiser.train(was_training)
    if not write:
        return written
    _write_prompts(folder, prompts)
    return written


def _write_prompts(folder: Path, prompts: list[str]) -> None:
    (folder / "prompts.txt").write_text("".join(f"{i:02d}\t{p}\n" for i, p in enumerate(prompts)))


def _write_spec_samples(spec: Any, model: nn.Module, prompts: list[str], folder: Path, num_inference_steps: int,
                        seed: int, write: bool, guidance_scale: float | None) -> list[Path]:
    """A spec without a diffusers pipeline: sample through its own ``sample`` with a spec loaded with its
    text encoder (training loads none), the training denoiser in place of the loaded one."""
    from sdpo.models.registry import load_spec
    from sdpo.stages.generate import write_media

    sampler = load_spec(spec.family, spec.pretrained, media_format=spec.media_format)
    was_training = model.training
    model.eval()
    try:
        pixels = sampler.sample(prompts, sampler.initial_latents(len(prompts), seed), model=unwrap(model),
                                num_inference_steps=num_inference_steps, guidance_scale=sampler.default_guidance_scale if guidance_scale is None else guidance_scale)
    finally:
        model.train(was_training)
    if not write:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".png" if pixels.ndim == 4 else ".mp4"
    written = [folder / f"{index:02d}{suffix}" for index in range(len(prompts))]
    for medium, path in zip(pixels, written, strict=True):
        write_media(medium, path)
    _write_prompts(folder, prompts)
    return written
