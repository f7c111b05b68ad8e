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
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sdpo.data.pairs import (
    SKIP_HINT,
    BadPairsError,
    MediaRef,
    OnBadPair,
    PairList,
    PairProblem,
    ParquetImage,
    PreferencePair,
    check_policy,
    frame_files,
    media_kind,
    raise_problems,
    read_pairs,
)
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


def open_image(ref: MediaRef) -> Image.Image:
    """Open an image file, a Pick-a-Pic parquet cell or encoded bytes, applying EXIF orientation."""
    if isinstance(ref, ParquetImage):
        source: Any = io.BytesIO(_parquet_bytes(ref))
    elif isinstance(ref, (bytes, bytearray)):
        source = io.BytesIO(ref)
    else:
        source = Path(ref)
        if not source.is_file():
            raise MissingFileError(f"image not found: {source}")
    try:
        image = Image.open(source)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise InputError(f"cannot read image {_describe(ref)}: {_one_line(error)}") from None
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

    ``ref`` is a video file (mp4, webm, gif; read with imageio) or a folder of frame images.
    """
    if media_format.frames is None:
        raise InputError(f"{_describe(ref)} is a video but the model takes images (media_format.frames is None)")
    height, width = size or (media_format.height, media_format.width)
    channels = media_format.channels
    path = Path(ref)
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
    except Exception as error:  # noqa: BLE001 - imageio/ffmpeg raise OSError, RuntimeError, ...
        raise InputError(f"cannot read video {path}: {_one_line(error)}") from None
    indices = _video_indices(path, total, media_format.frames, pad_frames)
    decoded, seen = _decode_frames(path, set(indices), height, width, channels)
    if len(decoded) < len(set(indices)):
        # The counted and the decoded frame counts disagree (a damaged stream): sample again from
        # the frames that really decode rather than return a clip with holes.
        if seen == 0:
            raise InputError(f"cannot decode video {path}: no frames")
        indices = _video_indices(path, seen, media_format.frames, pad_frames)
        decoded, _ = _decode_frames(path, set(indices), height, width, channels)
    return torch.stack([decoded[i] for i in indices])


def _frame_tensor(image: Image.Image, height: int, width: int, channels: int) -> Tensor:
    return image_to_tensor(resize_center_crop(image, height, width), channels)


def _count_frames(path: Path) -> int:
    import imageio.v3 as iio

    if path.suffix.lower() == ".gif":
        return int(iio.improps(path).shape[0])
    import imageio_ffmpeg

    # Container metadata often lacks a frame count (imageio reports inf), so ffmpeg counts by decoding.
    return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])


def _video_indices(path: Path, total: int, frames: int, pad_frames: bool) -> list[int]:
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
        for number, frame in enumerate(iio.imiter(path)):
            seen = number + 1
            if number in wanted:
                decoded[number] = _frame_tensor(Image.fromarray(np.asarray(frame)), height, width, channels)
                if len(decoded) == len(wanted):
                    break  # closing the iterator stops ffmpeg without decoding the rest
    except Exception as error:  # noqa: BLE001
        raise InputError(f"cannot decode video {path}: {_one_line(error)}") from None
    return decoded, seen


# --------------------------------------------------------------------------------------------- dispatch


def load_media(
    ref: MediaRef, media_format: MediaFormat, *, size: tuple[int, int] | None = None, pad_frames: bool = False
) -> Tensor:
    """An image ``(C, H, W)`` for an image model or a clip ``(F, C, H, W)`` for a video model (``frames`` set)."""
    kind = media_kind(ref)
    if media_format.frames is None:
        if kind != "image":
            raise InputError(f"{_describe(ref)} is a video but the model takes images")
        return load_image(ref, media_format, size=size)
    if kind != "video":
        raise InputError(f"{_describe(ref)} is an image but the model takes {media_format.frames}-frame clips")
    return load_video(ref, media_format, size=size, pad_frames=pad_frames)


def media_size(ref: MediaRef) -> tuple[int, int]:
    """``(height, width)`` of an image or a clip's frames, reading as little as possible (for bucketing)."""
    if media_kind(ref) == "image":
        # Image.open reads the header only; the pixels are decoded on load().
        if isinstance(ref, ParquetImage):
            source: Any = io.BytesIO(_parquet_bytes(ref))
        elif isinstance(ref, (bytes, bytearray)):
            source = io.BytesIO(ref)
        else:
            source = Path(ref)
        with Image.open(source) as image:
            width, height = image.size
            # EXIF orientations 5-8 are quarter turns: open_image transposes them, swapping the sides.
            if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
        return height, width
    path = Path(ref)
    if path.is_dir():
        with Image.open(frame_files(path)[0]) as image:
            return image.size[1], image.size[0]
    import imageio.v3 as iio

    shape = iio.improps(path).shape
    return int(shape[-3]), int(shape[-2])


# --------------------------------------------------------------------------------------------- checks


def check_media(ref: MediaRef, frames: int | None = None, *, pad_frames: bool = False) -> None:
    """Raise ValueError (FileNotFoundError for a missing file), one line, when ``ref`` cannot be read.

    Cheap, so a whole data set can be checked before hours of encoding: an image's header is read
    and its data checked (PNG: every chunk's checksum, without inflating; JPEG: decoded at 1/8 scale;
    other formats: decoded); a video file is demuxed without decoding to count its frames (one
    ffmpeg run, ~20 ms); a frame folder's sampled frames are checked as images. ``frames`` (a video
    model's clip length) also checks that a clip is long enough, unless ``pad_frames``.
    """
    if media_kind(ref) == "image":
        _check_image(ref)
        return
    path = Path(ref)
    if path.is_dir():
        files = frame_files(path)
        indices = _video_indices(path, len(files), frames, pad_frames) if frames else [0, len(files) - 1]
        for index in sorted(set(indices)):
            _check_image(files[index])
        return
    if not path.is_file():
        raise MissingFileError(f"video not found: {path}")
    total = count_video_frames(path)
    if frames:
        _video_indices(path, total, frames, pad_frames)


def check_pairs(
    pairs: Iterable[PreferencePair],
    media_format: MediaFormat,
    *,
    pad_frames: bool = False,
    on_bad_pair: OnBadPair = "fail",
    num_workers: int = 4,
    model: str = "the model",
    progress: bool = False,
    fail_on_skipped: bool = False,
) -> PairList:
    """Check every pair's media before any encoding: the right kind for ``media_format``, decodable
    (see :func:`check_media`) and, for clips, long enough.

    All pairs are checked before anything is raised. ``on_bad_pair="fail"``: raise BadPairsError
    listing every bad pair (file and line); ``"skip"``: return the good ones, with each skipped pair
    and why added to ``problems`` (a PairList's own problems, such as ties, are kept). ``model``
    names the model in messages. ``num_workers`` threads check files in parallel; ``progress`` shows a bar.
    ``fail_on_skipped``: the "fail" policy also refuses the bad lines a reader skipped (listed with the rest).
    """
    from tqdm.auto import tqdm

    check_policy(on_bad_pair)
    pairs = pairs if isinstance(pairs, PairList) else PairList(pairs)

    def one(item: tuple[int, PreferencePair]) -> PairProblem | None:
        return _pair_problem(*item, media_format, pad_frames, model)

    with tqdm(total=len(pairs), desc="check media", unit="pair", disable=not progress) as bar:
        if num_workers > 0 and len(pairs) > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                results = [bar.update(1) or found for found in pool.map(one, enumerate(pairs))]
        else:
            results = [bar.update(1) or one(item) for item in enumerate(pairs)]
    problems = [problem for problem in results if problem is not None]
    if on_bad_pair == "fail":
        # Bad lines a reader skipped (read_checked_pairs) are reported with these, all in one error.
        everything = sorted([*(p for p in pairs.problems if p.bad and fail_on_skipped), *problems],
                            key=lambda p: (p.source or "", p.line if p.line is not None else -1))  # fmt: skip
        hint = SKIP_HINT
        if any(problem.kind == "too few frames" for problem in problems):
            hint += "; --pad-frames repeats a short clip's last frame"
        raise_problems(everything, hint)
    checked = PairList([pair for pair, problem in zip(pairs, results, strict=True) if problem is None],
                       skipped=pairs.skipped,
                       problems=pairs.problems)  # fmt: skip
    for problem in problems:
        checked.skip(problem)
    if not checked:
        raise BadPairsError(problems, "no usable pair is left")
    return checked


def read_checked_pairs(
    source: str | os.PathLike[str],
    media_format: MediaFormat,
    *,
    on_bad_pair: OnBadPair = "fail",
    pad_frames: bool = False,
    skip_ties: bool = True,
    skip_empty_prompts: bool = False,
    num_workers: int = 4,
    model: str = "the model",
    progress: bool = False,
) -> PairList:
    """:func:`read_pairs` then :func:`check_pairs`, reporting the bad lines of the source and the
    undecodable media of the rest together: one error lists every problem (``on_bad_pair="fail"``)."""
    check_policy(on_bad_pair)
    try:
        pairs = read_pairs(source, skip_ties=skip_ties, skip_empty_prompts=skip_empty_prompts, on_bad_pair="skip")
    except ValueError:
        if on_bad_pair == "fail":  # nothing usable: the failing read lists every bad line, if there are any
            read_pairs(source, skip_ties=skip_ties, skip_empty_prompts=skip_empty_prompts, on_bad_pair="fail")
        raise
    return check_pairs(pairs, media_format, pad_frames=pad_frames, on_bad_pair=on_bad_pair,
                       num_workers=num_workers, model=model, progress=progress, fail_on_skipped=True)  # fmt: skip


def _pair_problem(
    number: int, pair: PreferencePair, media_format: MediaFormat, pad_frames: bool, model: str
) -> PairProblem | None:
    wanted = "image" if media_format.frames is None else "video"
    line = pair.line if pair.source is not None else number  # a pair made in code is named by its position
    for side in ("chosen", "rejected"):
        ref = getattr(pair, side)
        try:
            kind = media_kind(ref)
            if kind != wanted:
                return PairProblem(pair.source, line, "wrong media", f"{side} is {kind} but {model} takes {wanted}s")
            check_media(ref, media_format.frames, pad_frames=pad_frames)
        except FileNotFoundError as error:
            return PairProblem(pair.source, line, "missing file", f"{side}: {error}")
        except (OSError, ValueError) as error:
            kind = "too few frames" if "frames are needed" in str(error) else "unreadable media"
            return PairProblem(pair.source, line, kind, f"{side}: {error}")
    return None


def _check_image(ref: MediaRef) -> None:
    if isinstance(ref, (Path, str)) and not Path(ref).is_file():
        raise MissingFileError(f"image not found: {ref}")
    try:
        source: Any = io.BytesIO(_parquet_bytes(ref)) if isinstance(ref, ParquetImage) else (
            io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else Path(ref))  # fmt: skip
        with Image.open(source) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("RGB", (1, 1))  # let libjpeg decode at its smallest scale
                image.load()
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise InputError(f"cannot read image {_describe(ref)}: {_one_line(error)}") from None


def count_video_frames(path: str | os.PathLike[str]) -> int:
    """The frames of a video file, counted without decoding (ffmpeg demuxes its packets; GIFs are read).

    A file that cannot be opened raises ValueError with ffmpeg's reason on one line.
    """
    path = Path(path)
    if path.suffix.lower() == ".gif":
        import imageio.v3 as iio

        try:
            return int(iio.improps(path).shape[0])
        except Exception as error:  # noqa: BLE001
            raise InputError(f"cannot read video {path}: {_one_line(error)}") from None
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
               "-c", "copy", "-f", "null", "-", "-progress", "pipe:1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        raise InputError(f"cannot read video {path}: {ffmpeg_reason(result.stderr.decode(errors='replace'))}")
    counts = [line for line in result.stdout.decode(errors="replace").splitlines() if line.startswith("frame=")]
    if not counts or not counts[-1].removeprefix("frame=").strip().isdigit():
        raise InputError(f"cannot read video {path}: ffmpeg reported no frame count")
    return int(counts[-1].removeprefix("frame=").strip())


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


def _one_line(error: BaseException) -> str:
    text = str(error)
    if "ffmpeg" in text.lower():
        return ffmpeg_reason(text)  # imageio puts ffmpeg's whole banner in its messages
    return " ".join(text.split())[:300] or type(error).__name__


# --------------------------------------------------------------------------------------------- buckets


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


def check_buckets(buckets: Sequence[tuple[int, int]], multiple: int | None = None) -> list[tuple[int, int]]:
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
    best = None
    for bucket in buckets:
        if bucket[0] <= 0 or bucket[1] <= 0:
            raise InputError(f"bucket sizes must be positive, got {bucket[0]}x{bucket[1]}")
        distance = abs(math.log(bucket[0] / bucket[1]) - target)
        if best is None or distance < best[0]:
            best = (distance, (int(bucket[0]), int(bucket[1])))
    return best[1]


# --------------------------------------------------------------------------------------------- parquet


@lru_cache(maxsize=4)
def _parquet_column(path: Path, modified_ns: int, row_group: int, column: str) -> Any:
    # Pick-a-Pic is read in order, so the chosen and the rejected column of the current row group
    # are the only ones needed at a time; caching them avoids rereading a row group per image.
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0)


def _parquet_bytes(ref: ParquetImage) -> bytes:
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


def _describe(ref: MediaRef) -> str:
    if isinstance(ref, (bytes, bytearray)):
        return f"<{len(ref)} image bytes>"
    return str(ref)
