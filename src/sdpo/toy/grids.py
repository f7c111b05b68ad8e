"""Sample grids of both worlds: digits side by side, clips as rows of their frames."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sdpo.errors import InputError


def media_grid(samples: Tensor, nrow: int | None = None, scale: int = 8, padding: int = 1) -> Any:
    """A PIL grey image of grey media in [-1, 1], ink white on black: images (B, 1, H, W) or clips (B, F, 1, H, W).

    ``nrow`` samples are placed side by side (default: a square grid of images, one clip per row); a
    clip is shown as the row of its frames. Each pixel becomes a ``scale`` x ``scale`` block (nearest
    neighbour); ``padding`` grey pixels (before scaling) separate frames and images, and three times
    that separates clips.
    """
    from PIL import Image

    video = samples.ndim == 5
    if not (samples.ndim == 4 or video) or samples.shape[-3] != 1:
        raise InputError(f"samples must have shape (B, 1, H, W) or (B, F, 1, H, W), got {tuple(samples.shape)}")
    clips = samples if video else samples[:, None]
    count, frames, _, height, width = clips.shape
    nrow = max(1, nrow or (1 if video else math.ceil(math.sqrt(count))))
    rows = max(1, math.ceil(count / nrow))
    gap = 2 * padding if video else 0  # extra space between clips, beyond the frames' own padding
    strip = frames * (width + padding) + gap  # one sample's columns, with what follows it
    canvas = torch.full((rows * (height + padding) + padding, padding + nrow * strip - gap), 0.5)
    values = ((clips.detach().float().cpu().clamp(-1, 1) + 1) / 2)[:, :, 0]
    for index in range(count):
        row, col = divmod(index, nrow)
        top = padding + row * (height + padding)
        for frame in range(frames):
            left = padding + col * strip + frame * (width + padding)
            canvas[top : top + height, left : left + width] = values[index, frame]
    pixels = (canvas * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)  # 2-D uint8 is mode "L"
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
