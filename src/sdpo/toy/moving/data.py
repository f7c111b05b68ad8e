"""The video toy world's data: the real 8x8 digits of the image toy, moving across a small canvas.

A clip shows one handwritten digit (from ``sdpo.toy.digits.data``, same fixed train / held-out split)
sliding ``speed`` pixels per frame left, right, up or down over a ``canvas`` x ``canvas`` background
of -1. The digit stays whole inside the canvas on every frame, so its ink centre of mass moves by
exactly ``speed`` pixels per frame: the motion the video reward checks. The prompt names both, e.g.
"a handwritten digit 7 moving right".

Clips follow the library's video convention: float32 (N, F, 1, H, W) in [-1, 1].
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from sdpo.errors import InputError
from sdpo.toy.digits.data import (
    IMAGE_SIZE,
    load_digit_images,
    load_split,
    parse_digit,
    parse_each,
    prompt_for,
    split_indices,
    the_one,
)

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
"""Motion directions; a direction is referred to by its index into this tuple."""
DIRECTION_VECTORS: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))
"""(dx, dy) unit steps of each direction in image coordinates (y grows downwards)."""
VIDEO_PROMPT_TEMPLATE = "{image_prompt} moving {direction}"
DEFAULT_FRAMES = 5
DEFAULT_CANVAS = 12
DEFAULT_SPEED = 1
DIRECTION_SEED = 20241105

_DIRECTION_INDEX = {name: index for index, name in enumerate(DIRECTIONS)}
_WORD = re.compile(r"[a-z]+")


def check_geometry(frames: int, canvas: int, speed: int) -> None:
    """Raise ValueError unless a digit moving ``speed`` px per frame stays inside the canvas for ``frames`` frames."""
    if frames < 2:
        raise InputError(f"a clip needs at least 2 frames to show motion, got {frames}")
    if speed < 1:
        raise InputError(f"speed must be at least 1 pixel per frame, got {speed}")
    travel = (frames - 1) * speed
    if canvas < IMAGE_SIZE + travel:
        raise InputError(
            f"a {IMAGE_SIZE}x{IMAGE_SIZE} digit moving {speed} px/frame for {frames} frames travels {travel} px and "
            f"needs a canvas of at least {IMAGE_SIZE + travel}, got {canvas}"
        )


def digit_positions(direction: int, frames: int, canvas: int, speed: int) -> list[tuple[int, int]]:
    """(top, left) of the 8x8 digit on each frame: centred across the motion, the path centred along it."""
    check_geometry(frames, canvas, speed)
    dx, dy = DIRECTION_VECTORS[direction]
    free = canvas - IMAGE_SIZE
    travel = (frames - 1) * speed
    start = (free - travel) // 2  # where the path begins along the axis of motion
    middle = free // 2
    positions = []
    for frame in range(frames):
        along = start + frame * speed
        if dx:
            left = along if dx > 0 else free - along
            positions.append((middle, left))
        else:
            top = along if dy > 0 else free - along
            positions.append((top, middle))
    return positions


def render_clips(
    images: Tensor,
    directions: Tensor | Sequence[int],
    frames: int = DEFAULT_FRAMES,
    canvas: int = DEFAULT_CANVAS,
    speed: int = DEFAULT_SPEED,
) -> Tensor:
    """Clips (N, F, 1, canvas, canvas) in [-1, 1] of digits (N, 1, 8, 8) moving in ``directions`` (N,)."""
    directions = torch.as_tensor(directions, dtype=torch.int64).reshape(-1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"images must have shape (N, 1, 8, 8), got {tuple(images.shape)}")
    if directions.numel() != images.shape[0]:
        raise InputError(f"got {images.shape[0]} images but {directions.numel()} directions")
    if directions.numel() and (int(directions.min()) < 0 or int(directions.max()) >= len(DIRECTIONS)):
        raise InputError(f"directions must be indices 0..{len(DIRECTIONS) - 1} into {DIRECTIONS}")
    check_geometry(frames, canvas, speed)
    clips = images.new_full((images.shape[0], frames, 1, canvas, canvas), -1.0)
    for direction in range(len(DIRECTIONS)):
        members = torch.nonzero(directions == direction).reshape(-1)
        if not members.numel():
            continue
        for frame, (top, left) in enumerate(digit_positions(direction, frames, canvas, speed)):
            clips[members, frame, :, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE] = images[members]
    return clips


@lru_cache(maxsize=1)
def _all_directions() -> np.ndarray:
    count = load_digit_images()[1].shape[0]
    # Balanced (each direction a quarter of the digits) and fixed per digit of the whole dataset, so a
    # digit moves the same way in every split and on every machine.
    directions = np.random.default_rng(DIRECTION_SEED).permutation(np.arange(count) % len(DIRECTIONS))
    directions.setflags(write=False)
    return directions


def clip_directions(split: str) -> Tensor:
    """The direction index of each clip of ``load_video_clips(split)`` (int64, same order)."""
    directions = torch.from_numpy(_all_directions().copy())
    if split == "all":
        return directions
    train, held_out = split_indices()
    if split == "train":
        return directions[train]
    if split == "held_out":
        return directions[held_out]
    raise InputError(f"unknown split {split!r}; expected 'train', 'held_out' or 'all'")


def load_video_clips(
    split: str,
    frames: int = DEFAULT_FRAMES,
    canvas: int = DEFAULT_CANVAS,
    speed: int = DEFAULT_SPEED,
) -> tuple[Tensor, Tensor]:
    """Real clips of one split: clips float32 (N, F, 1, canvas, canvas) in [-1, 1] and digit labels (N,).

    Each digit of the image toy's split (``"train"``, ``"held_out"`` or ``"all"``) moves in a fixed
    direction derived from its index in the dataset (``clip_directions(split)``); the prompt of clip
    ``i`` is ``video_prompt_for(labels[i], clip_directions(split)[i])``.
    """
    images, labels = load_split(split)
    return render_clips(images, clip_directions(split), frames, canvas, speed), labels


# ------------------------------------------------------------------------------------------ prompts
def direction_index(direction: int | str) -> int:
    """The index of a direction given as an index or a name ("left", "right", "up", "down")."""
    if isinstance(direction, str):
        if direction not in _DIRECTION_INDEX:
            raise InputError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
        return _DIRECTION_INDEX[direction]
    index = int(direction)
    if not 0 <= index < len(DIRECTIONS):
        raise InputError(f"a direction index must be in 0..{len(DIRECTIONS) - 1}, got {direction}")
    return index


def video_prompt_for(label: int, direction: int | str) -> str:
    """The prompt of a moving digit, e.g. ``"a handwritten digit 7 moving right"``."""
    return VIDEO_PROMPT_TEMPLATE.format(image_prompt=prompt_for(label), direction=DIRECTIONS[direction_index(direction)])


def video_prompts_for(labels: Iterable[int] | Tensor, directions: Iterable[int | str] | Tensor) -> list[str]:
    """One prompt per (label, direction)."""
    labels = labels.reshape(-1).tolist() if isinstance(labels, Tensor) else list(labels)
    directions = directions.reshape(-1).tolist() if isinstance(directions, Tensor) else list(directions)
    if len(labels) != len(directions):
        raise InputError(f"got {len(labels)} labels but {len(directions)} directions")
    return [video_prompt_for(label, direction) for label, direction in zip(labels, directions, strict=True)]


def parse_direction(prompt: str) -> int:
    """The direction index a prompt asks for; ValueError when it names none or several."""
    found = {_DIRECTION_INDEX[word] for word in _WORD.findall(prompt.lower()) if word in _DIRECTION_INDEX}
    return the_one(found, prompt, "direction", DIRECTIONS.__getitem__,
                   f"one of {DIRECTIONS}, e.g. {video_prompt_for(7, 1)!r}")


def parse_directions(prompts: Sequence[str]) -> Tensor:
    """The direction index each prompt asks for, as an int64 tensor."""
    return parse_each(parse_direction, prompts)


def parse_video_prompt(prompt: str) -> tuple[int, int]:
    """(digit, direction index) of a video prompt."""
    return parse_digit(prompt), parse_direction(prompt)
