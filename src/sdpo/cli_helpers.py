"""What several commands read from their flags alike: media size, device and dtype, a loaded spec."""

from __future__ import annotations

import argparse
from typing import Any

from sdpo.errors import InputError

DTYPES = ("fp32", "bf16", "fp16")
"""Choices of the --dtype flags."""


def media_format_from(args: argparse.Namespace) -> Any:
    """The MediaFormat that --height/--width/--frames ask for, or None when none is given."""
    from sdpo.models.base import MediaFormat

    if not (args.height or args.width or args.frames):
        return None
    if not (args.height and args.width):
        raise InputError("--height and --width go together")
    check_frames_flag(args.family, args.frames)
    return MediaFormat(channels=3, height=args.height, width=args.width, frames=args.frames)


def check_frames_flag(family: str, frames: int | None) -> None:
    """--frames is given exactly for a video family. A mismatch would otherwise load, then fail far away
    ("chosen is image but sd takes videos") or sample a video model as if it made images."""
    from sdpo.models.registry import spec_class

    default = spec_class(family).default_media_format
    if default is None:  # an embedded world checks the size against its own folder
        return
    if frames and default.frames is None:
        raise InputError(f"--frames is for video models; the {family} model makes images: drop --frames")
    if not frames and default.frames is not None:
        raise InputError(f"the {family} model makes videos: give --frames with --height and --width "
                         f"(e.g. --frames {default.frames})")


def load_spec_from(args: argparse.Namespace, media_format: Any, *, encoders_only: bool = False) -> Any:
    """``args.family`` loaded from ``args.pretrained`` on --device in --dtype (bf16 by default on cuda),
    with --vae-tiling applied. ``encoders_only`` leaves the denoiser where it loaded (precompute needs
    only the VAE and text encoders)."""
    import torch

    from sdpo.models.base import move_encoders
    from sdpo.models.registry import load_spec

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    spec = load_spec(args.family, args.pretrained, media_format=media_format, torch_dtype=dtype)
    move_encoders(spec, device)
    if not encoders_only:
        spec.denoiser.to(device)
    if args.vae_tiling:
        if spec.vae is None:
            raise InputError(f"the {args.family} model has no VAE with tiling; drop --vae-tiling")
        spec.vae.enable_tiling()
    return spec
