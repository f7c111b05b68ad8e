"""The toy world's data: scikit-learn's 1,797 handwritten 8x8 digits, and prompts that name them.

Everything here ships inside scikit-learn, so it loads offline. Images are brought to the library's
media convention (float32 in [-1, 1], channels first); the raw values are 0..16.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from sdpo.errors import InputError

NUM_CLASSES = 10
IMAGE_SIZE = 8
PROMPT_TEMPLATE = "a handwritten digit {digit}"
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 20240917

Name = TypeVar("Name", int, str)
"""What ``the_one`` shows of a found index in its error: the digit itself, or a direction's word."""

_WORD_TO_DIGIT = {word: digit for digit, word in enumerate(DIGIT_WORDS)}
_TOKEN = re.compile(r"[a-z]+|\d+")


@lru_cache(maxsize=1)
def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    labels = bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digit_images() -> tuple[Tensor, Tensor]:
    """All 1,797 digits: images float32 (N, 1, 8, 8) in [-1, 1] and labels int64 (N,) in 0..9."""
    images, labels = _load_arrays()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    _, labels = _load_arrays()
    rng = np.random.default_rng(SPLIT_SEED)
    train, held_out = [], []
    # Stratified by class so both parts keep the class balance; a fixed seed makes it the same split
    # on every machine and every numpy version that keeps default_rng's stream (PCG64).
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        members = members[rng.permutation(members.size)]
        n_held = int(round(members.size * HELD_OUT_FRACTION))
        held_out.append(members[:n_held])
        train.append(members[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def split_indices() -> tuple[Tensor, Tensor]:
    """Indices (train, held_out) into ``load_digit_images()``: a fixed stratified 80/20 split."""
    train, held_out = _split_indices()
    return torch.from_numpy(train.copy()), torch.from_numpy(held_out.copy())


def load_split(split: str) -> tuple[Tensor, Tensor]:
    """Images and labels of one part of the fixed split: ``"train"``, ``"held_out"`` or ``"all"``."""
    images, labels = load_digit_images()
    if split == "all":
        return images, labels
    train, held_out = split_indices()
    if split == "train":
        return images[train], labels[train]
    if split == "held_out":
        return images[held_out], labels[held_out]
    raise InputError(f"unknown split {split!r}; expected 'train', 'held_out' or 'all'")


def prompt_for(label: int) -> str:
    """The prompt that asks for one digit, e.g. ``"a handwritten digit 7"``."""
    digit = int(label)
    if not 0 <= digit < NUM_CLASSES:
        raise InputError(f"a digit label must be in 0..9, got {label}")
    return PROMPT_TEMPLATE.format(digit=digit)


def prompts_for(labels: Iterable[int] | Tensor) -> list[str]:
    """One prompt per label."""
    if isinstance(labels, Tensor):
        labels = labels.reshape(-1).tolist()
    return [prompt_for(label) for label in labels]


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for: a single digit character ("7") or word ("seven").

    Raises ValueError when the prompt names no digit, or names several different ones.
    """
    found = set()
    for token in _TOKEN.findall(prompt.lower()):
        if token.isdigit():
            if len(token) == 1:
                found.add(int(token))
        elif token in _WORD_TO_DIGIT:
            found.add(_WORD_TO_DIGIT[token])
    return the_one(found, prompt, "digit", int, f"one digit 0-9, e.g. {prompt_for(7)!r}")


def parse_digits(prompts: Sequence[str]) -> Tensor:
    """The digit each prompt asks for, as an int64 tensor."""
    return parse_each(parse_digit, prompts)


def the_one(found: set[int], prompt: str, noun: str, name: Callable[[int], Name], expected: str) -> int:
    """The one index in ``found``, what ``prompt`` names; ValueError when it names none or several."""
    if len(found) != 1:
        what = f"no {noun}" if not found else f"several {noun}s {sorted(name(i) for i in found)}"
        raise InputError(f"prompt {prompt!r} names {what}; expected {expected}")
    return found.pop()


def parse_each(parse: Callable[[str], int], prompts: Sequence[str]) -> Tensor:
    """``parse`` of every prompt, as an int64 tensor."""
    return torch.tensor([parse(prompt) for prompt in prompts], dtype=torch.int64)
