"""Loading images and clips into the pixel tensors a model's ``encode_media`` expects.

Images become float32 ``(C, H, W)`` and clips ``(F, C, H, W)``, in [-1, 1]. Every image or frame is
scaled (bicubic, aspect ratio kept) to the smallest size that covers the target, so the side that is
shorter relative to the target fits exactly, and then centre-cropped: nothing is stretched. A clip gives ``frames`` frames evenly spaced from its first to its last frame; a clip with
fewer frames than that is an error unless ``pad_frames=True``, which repeats its last frame: silently
padding would train on frozen tails that the model never generates, so it has to be asked for.
"""

from __future__ import annotations

import io
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sdpo.data import video
from sdpo.data.pairs import MediaRef, ParquetImage, file_path, frame_files, media_kind
from sdpo.errors import InputError, MissingFileError
from sdpo.models.base import MediaFormat

_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------- images


def resize_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (bicubic, keeping the aspect ratio) so the image covers ``height`` x ``width``, then crop the centre."""
    if height < 1 or width < 1:
        raise InputError(f"target size must be positive, got {height}x{width}")
    src_w, src_h = image.size
    if (src_w, src_h) != (width, height):
        scale = max(height / src_h, width / src_w)
        # max() guards against rounding a side to one pixel short of the target.
        new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return image


def image_to_tensor(image: Image.Image, channels: int = 3) -> Tensor:
    """A PIL image as float32 ``(channels, H, W)`` in [-1, 1]; transparency is composited onto white."""
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Dropping alpha would turn transparent areas into whatever colour the pixels hold (often
        # black); generated images with alpha are meant to be seen on a light background.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def image_source(ref: MediaRef) -> Path | io.BytesIO:
    """What ``Image.open`` reads for an image reference: its file, or its encoded bytes in memory."""
    if isinstance(ref, ParquetImage):
        return io.BytesIO(parquet_bytes(ref))
    if isinstance(ref, (bytes, bytearray)):
        return io.BytesIO(ref)
    return Path(ref)


def open_image(ref: MediaRef) -> Image.Image:
    """Open an image file, a Pick-a-Pic parquet cell or encoded bytes, applying EXIF orientation."""
    source = image_source(ref)
    if isinstance(source, Path) and not source.is_file():
        raise MissingFileError(f"image not found: {source}")
    try:
        image: Image.Image = Image.open(source)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise InputError(f"cannot read image {describe_ref(ref)}: {one_line_reason(error)}") from None
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow's 16/32-bit to 8-bit conversion clips instead of scaling: 16-bit PNGs would turn white.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image


def load_image(ref: MediaRef, media_format: MediaFormat, *, size: tuple[int, int] | None = None) -> Tensor:
    """One image as float32 ``(C, H, W)`` in [-1, 1], resized and centre-cropped.

    ``size`` is ``(height, width)`` and overrides the format's resolution (for a bucket).
    """
    height, width = size or (media_format.height, media_format.width)
    return image_to_tensor(resize_center_crop(open_image(ref), height, width), media_format.channels)


# --------------------------------------------------------------------------------------------- videos


def sample_frame_indices(total: int, frames: int, *, pad_frames: bool = False) -> list[int]:
    """``frames`` indices evenly spaced from the first (0) to the last (``total - 1``) frame of a clip.

    A clip shorter than ``frames`` raises ValueError unless ``pad_frames``, which takes every frame
    and repeats the last one.
    """
    if frames < 1:
        raise InputError(f"frames must be at least 1, got {frames}")
    if total < 1:
        raise InputError("the clip has no frames")
    if total < frames:
        if not pad_frames:
            raise InputError(
                f"the clip has {total} frames but {frames} are needed (pad_frames=True, --pad-frames on the command line, repeats its last frame)"
            )
        return list(range(total)) + [total - 1] * (frames - total)
    if frames == 1:
        return [0]
    step = (total - 1) / (frames - 1)
    # floor(x + 0.5) rather than round(): Python's round() sends halves to the even neighbour.
    return [math.floor(i * step + 0.5) for i in range(frames)]


def load_video(
    ref: MediaRef, media_format: MediaFormat, *, size: tuple[int, int] | None = None, pad_frames: bool = False
) -> Tensor:
    """One clip as float32 ``(F, C, H, W)`` in [-1, 1]: ``media_format.frames`` frames, each resized and cropped.

    ``ref`` is a video file (mp4 or webm, decoded in process with PyAV; gif, with imageio) or a folder of
    frame images.
    """
    if media_format.frames is None:
        raise InputError(f"{describe_ref(ref)} is a video but the model takes images (media_format.frames is None)")
    height, width = size or (media_format.height, media_format.width)
    channels = media_format.channels
    path = file_path(ref)
    if path.is_dir():
        files = frame_files(path)
        try:
            indices = sample_frame_indices(len(files), media_format.frames, pad_frames=pad_frames)
        except ValueError as error:
            raise InputError(f"{path}: {error}") from None
        # A repeated index (padding) is decoded once.
        decoded = {i: _frame_tensor(open_image(files[i]), height, width, channels) for i in set(indices)}
        return torch.stack([decoded[i] for i in indices])
    if not path.is_file():
        raise MissingFileError(f"video not found: {path}")
    try:
        total = _count_frames(path)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - imageio raises OSError, RuntimeError, ... for a GIF
        raise InputError(f"cannot read video {path}: {one_line_reason(error)}") from None
    indices = video_indices(path, total, media_format.frames, pad_frames)
    decoded, seen = _decode_frames(path, set(indices), height, width, channels)
    if len(decoded) < len(set(indices)):
        # The counted and the decoded frame counts disagree (a damaged stream): sample again from
        # the frames that really decode rather than return a clip with holes.
        if seen == 0:
            raise InputError(f"cannot decode video {path}: no frames")
        indices = video_indices(path, seen, media_format.frames, pad_frames)
        decoded, _ = _decode_frames(path, set(indices), height, width, channels)
    return torch.stack([decoded[i] for i in indices])


def _frame_tensor(image: Image.Image, height: int, width: int, channels: int) -> Tensor:
    return image_to_tensor(resize_center_crop(image, height, width), channels)


def _count_frames(path: Path) -> int:
    import imageio.v3 as iio

    if path.suffix.lower() == ".gif":
        return int(iio.improps(path).shape[0])
    return video.count_frames(path)


def video_indices(path: Path, total: int, frames: int, pad_frames: bool) -> list[int]:
    """:func:`sample_frame_indices` for the clip at ``path``, its error naming the clip."""
    try:
        return sample_frame_indices(total, frames, pad_frames=pad_frames)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


def _decode_frames(
    path: Path, wanted: set[int], height: int, width: int, channels: int
) -> tuple[dict[int, Tensor], int]:
    """The wanted frames of a video file, and how many frames were decoded to get them."""
    import imageio.v3 as iio

    decoded: dict[int, Tensor] = {}
    seen = 0
    try:
        frames = iio.imiter(path) if path.suffix.lower() == ".gif" else video.iter_frames(path)
        for number, frame in enumerate(frames):
            seen = number + 1
            if number in wanted:
                decoded[number] = _frame_tensor(Image.fromarray(np.asarray(frame)), height, width, channels)
                if len(decoded) == len(wanted):
                    break  # closing the iterator stops decoding the rest
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001
        raise InputError(f"cannot decode video {path}: {one_line_reason(error)}") from None
    return decoded, seen


# --------------------------------------------------------------------------------------------- dispatch


def load_media(
    ref: MediaRef, media_format: MediaFormat, *, size: tuple[int, int] | None = None, pad_frames: bool = False
) -> Tensor:
    """An image ``(C, H, W)`` for an image model or a clip ``(F, C, H, W)`` for a video model (``frames`` set)."""
    kind = media_kind(ref)
    if media_format.frames is None:
        if kind != "image":
            raise InputError(f"{describe_ref(ref)} is a video but the model takes images")
        return load_image(ref, media_format, size=size)
    if kind != "video":
        raise InputError(f"{describe_ref(ref)} is an image but the model takes {media_format.frames}-frame clips")
    return load_video(ref, media_format, size=size, pad_frames=pad_frames)


def media_size(ref: MediaRef) -> tuple[int, int]:
    """``(height, width)`` of an image or a clip's frames, reading as little as possible (for bucketing)."""
    if media_kind(ref) == "image":
        # Image.open reads the header only; the pixels are decoded on load().
        with Image.open(image_source(ref)) as image:
            width, height = image.size
            # EXIF orientations 5-8 are quarter turns: open_image transposes them, swapping the sides.
            if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
        return height, width
    path = file_path(ref)
    if path.is_dir():
        with Image.open(frame_files(path)[0]) as image:
            return image.size[1], image.size[0]
    if path.suffix.lower() != ".gif":
        return video.frame_size(path)
    import imageio.v3 as iio

    shape = iio.improps(path).shape
    return int(shape[-3]), int(shape[-2])


# --------------------------------------------------------------------------------------------- checks


def count_video_frames(path: str | os.PathLike[str]) -> int:
    """The frames of a video file, counted without decoding (its packets are demuxed; GIFs are read).

    A file that cannot be opened raises InputError with FFmpeg's reason on one line.
    """
    path = Path(path)
    if path.suffix.lower() == ".gif":
        import imageio.v3 as iio

        try:
            return int(iio.improps(path).shape[0])
        except Exception as error:  # noqa: BLE001
            raise InputError(f"cannot read video {path}: {one_line_reason(error)}") from None
    return video.count_frames(path)


_FFMPEG_BANNER = ("ffmpeg version", "built with", "configuration:", "lib", "input #", "metadata", "duration",
                  "stream #", "ffmpeg call failed", "major_brand", "minor_version", "compatible_brands", "encoder",
                  "output #", "press [q]")  # fmt: skip


def ffmpeg_reason(text: str) -> str:
    """The first line of ffmpeg's output that says what went wrong, without its banner and ``[x @ 0x..]`` tags."""
    for line in text.splitlines():
        line = re.sub(r"^\s*(\[[^\]]*\]\s*)+", "", line).strip()
        if line and not line.lower().startswith(_FFMPEG_BANNER):
            return line[:200]
    return "ffmpeg could not read it"


def one_line_reason(error: BaseException) -> str:
    """An exception's message on one line (ffmpeg's banner stripped), for a user-facing error."""
    text = str(error)
    if "ffmpeg" in text.lower():
        return ffmpeg_reason(text)  # imageio puts ffmpeg's whole banner in its messages
    return " ".join(text.split())[:300] or type(error).__name__


# --------------------------------------------------------------------------------------------- parquet


@lru_cache(maxsize=4)
def _parquet_column(path: Path, modified_ns: int, row_group: int, column: str) -> Any:
    # Pick-a-Pic is read in order, so the chosen and the rejected column of the current row group
    # are the only ones needed at a time; caching them avoids rereading a row group per image.
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0)


def parquet_bytes(ref: ParquetImage) -> bytes:
    """The encoded image bytes a Pick-a-Pic parquet cell holds; ValueError, one line, when there are none."""
    try:
        # The modification time is part of the key so a rewritten file is never served from the cache.
        modified = ref.path.stat().st_mtime_ns
        value = _parquet_column(ref.path, modified, ref.row_group, ref.column)[ref.index].as_py()
    except Exception as error:  # noqa: BLE001 - pyarrow errors for a missing or broken file
        raise InputError(f"cannot read {ref}: {error}") from None
    if not value:
        raise InputError(f"{ref}: no image bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise InputError(f"{ref}: holds {type(value).__name__}, not encoded image bytes")
    return bytes(value)


def describe_ref(ref: MediaRef) -> str:
    """How a message names a media reference (raw bytes by their length)."""
    if isinstance(ref, (bytes, bytearray)):
        return f"<{len(ref)} image bytes>"
    return str(ref)
