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

from sdpo.models._common import diffusers_dtype_keyword
from sdpo.models.base import unwrap


def write_validation_samples(
    spec: Any,
    model: nn.Module,
    prompts: list[str],
    folder: str | Path,
    num_inference_steps: int = 25,
    seed: int = 0,
    write: bool = True,
) -> list[Path]:
    """Sample one image or clip per prompt with the current weights and save them under ``folder``.

    ``write=False`` samples without saving: the other processes of a sharded model, whose forward
    passes the main process needs.
    """
    pipeline_class = getattr(spec, "pipeline_class", None)
    pretrained = getattr(spec, "pretrained", None)
    if pipeline_class is None or pretrained is None:
        raise ValueError(f"the {spec.family} spec has no diffusers pipeline to sample validation prompts with")
    denoiser = unwrap(model)
    parameter = next(denoiser.parameters())
    pipe = pipeline_class.from_pretrained(str(pretrained), **{spec.denoiser_subfolder: denoiser},
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
                output = pipe(prompt, num_inference_steps=num_inference_steps, generator=generator,
                              output_type="pil", **size)
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
    (folder / "prompts.txt").write_text("".join(f"{i:02d}\t{p}\n" for i, p in enumerate(prompts)))
    return written
