"""Checking a pair set's media before encoding: the right kind for the model, decodable, clips long enough.

Cheap checks (headers, chunk checksums, demuxing without decoding), so a whole data set is checked
before hours of encoding and every bad pair is reported at once (see :func:`check_pairs`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from sdpo.data.decode import count_video_frames, describe_ref, image_source, one_line_reason, video_indices
from sdpo.data.pairs import (
    SKIP_HINT,
    BadPairsError,
    MediaRef,
    OnBadPair,
    PairList,
    PairProblem,
    PreferencePair,
    check_policy,
    file_path,
    frame_files,
    media_kind,
    raise_problems,
    read_pairs,
)
from sdpo.errors import InputError, MissingFileError
from sdpo.models.base import MediaFormat


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
    path = file_path(ref)
    if path.is_dir():
        files = frame_files(path)
        indices = video_indices(path, len(files), frames, pad_frames) if frames else [0, len(files) - 1]
        for index in sorted(set(indices)):
            _check_image(files[index])
        return
    if not path.is_file():
        raise MissingFileError(f"video not found: {path}")
    total = count_video_frames(path)
    if frames:
        video_indices(path, total, frames, pad_frames)


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
            problem = "too few frames" if "frames are needed" in str(error) else "unreadable media"
            return PairProblem(pair.source, line, problem, f"{side}: {error}")
    return None


def _check_image(ref: MediaRef) -> None:
    if isinstance(ref, (Path, str)) and not Path(ref).is_file():
        raise MissingFileError(f"image not found: {ref}")
    try:
        with Image.open(image_source(ref)) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("RGB", (1, 1))  # let libjpeg decode at its smallest scale
                image.load()
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for a broken file
        raise InputError(f"cannot read image {describe_ref(ref)}: {one_line_reason(error)}") from None
