"""Aspect-ratio buckets: parsing ``HEIGHTxWIDTH`` sizes, checking them against a model, and picking a pair's bucket."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from sdpo.errors import InputError
from sdpo.models.base import MediaFormat


def format_buckets(media_format: MediaFormat) -> list[tuple[int, int]]:
    """The default bucket list for a model: its own resolution only."""
    return [(media_format.height, media_format.width)]


_BUCKET = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_bucket(text: str) -> tuple[int, int]:
    """``(height, width)`` of a bucket written ``HEIGHTxWIDTH`` ("448x576": 448 high, 576 wide)."""
    found = _BUCKET.match(str(text))
    if found is None:
        raise InputError(f"bucket {text!r} is not HEIGHTxWIDTH in pixels (such as 448x576)")
    return int(found.group(1)), int(found.group(2))


def check_buckets(buckets: Sequence[tuple[int, int] | str], multiple: int | None = None) -> list[tuple[int, int]]:
    """The buckets as ``(height, width)`` int pairs; ValueError naming the first bad one.

    Each side must be a positive integer and, when ``multiple`` is given (the model's spatial factor:
    its VAE's downsampling times the denoiser's patch size), a multiple of it, so every bucket's
    latents have whole-numbered sides; a bucket may not appear twice, and the list may not be empty.
    """
    if not buckets:
        raise InputError("buckets must list at least one HEIGHTxWIDTH size")
    checked: list[tuple[int, int]] = []
    for bucket in buckets:
        if isinstance(bucket, str):
            bucket = parse_bucket(bucket)
        if len(bucket) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) for side in bucket):
            raise InputError(f"bucket {bucket!r} must be two integers (height, width)")
        height, width = bucket
        name = f"{height}x{width}"
        if height <= 0 or width <= 0:
            raise InputError(f"bucket {name}: height and width must be positive")
        if multiple and (height % multiple or width % multiple):
            raise InputError(f"bucket {name}: height and width must be multiples of {multiple} (the model's "
                             f"spatial factor)")
        if (height, width) in checked:
            raise InputError(f"bucket {name} is listed twice")
        checked.append((height, width))
    return checked


def bucket_for(size: tuple[int, int], buckets: Sequence[tuple[int, int]] | MediaFormat) -> tuple[int, int]:
    """The bucket ``(height, width)`` whose aspect ratio is closest to ``size`` = ``(height, width)``.

    Ratios are compared in log space, so 2:1 and 1:2 are equally far from 1:1; on a tie the earlier
    bucket wins. ``buckets`` may be a MediaFormat, meaning its single resolution.
    """
    if isinstance(buckets, MediaFormat):
        buckets = format_buckets(buckets)
    if not buckets:
        raise InputError("no buckets to choose from")
    height, width = size
    if height <= 0 or width <= 0:
        raise InputError(f"size must be positive, got {height}x{width}")
    target = math.log(height / width)
    best: tuple[float, tuple[int, int]] | None = None
    for bucket in buckets:
        if bucket[0] <= 0 or bucket[1] <= 0:
            raise InputError(f"bucket sizes must be positive, got {bucket[0]}x{bucket[1]}")
        distance = abs(math.log(bucket[0] / bucket[1]) - target)
        if best is None or distance < best[0]:
            best = (distance, (int(bucket[0]), int(bucket[1])))
    assert best is not None  # buckets is non-empty here
    return best[1]
