"""The moving-digits world's reward (registered as "moving-digits") and quality measures, built on the digits'.

The reward is a ``sdpo.rewards.Reward``: ``score(samples, prompts)`` with samples (B, F, 1, H, W) in
[-1, 1], one prompt per sample ("a handwritten digit 7 moving right"), returns a float tensor (B,),
higher is better.

The default reward has two parts, both with headroom on base samples:

* the digits world's default ``digit_reward`` (prompted-digit log-odds plus a stroke-boldness style term)
  on the digit of every frame, averaged over frames. The digit is cut out of each frame as the 8x8
  window holding the most ink (ties, common because real digits have blank borders, go to the window
  nearest where the ink's centre of mass puts a typical digit), which keeps the classifier about as
  accurate on real clips as on the 8x8 digits (95% vs 98% on held-out digits);
* a motion term from the trajectory of the ink's centre of mass: with ``v`` the least-squares velocity
  (pixels per frame) and ``u`` the prompted direction, ``1 - |v - speed * u| / speed``. It is 1 for
  the exact prompted motion, 0 for a still clip or one twice too fast, and negative for a wrong
  direction (-1 opposite, about -0.41 perpendicular), so exaggerated motion cannot be rewarded.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from sdpo.errors import InputError
from sdpo.rewards.base import MediaKind
from sdpo.toy.digits.data import IMAGE_SIZE, load_split, parse_digits
from sdpo.toy.digits.reward import digit_classifier, digit_reward, feature_distance
from sdpo.toy.moving.data import DEFAULT_SPEED, DIRECTION_VECTORS, parse_directions

VIDEO_REWARD_KINDS = ("default", "digit", "motion")


def _check_clips(samples: Tensor) -> Tensor:
    if samples.ndim != 5 or samples.shape[2] != 1 or min(samples.shape[-2:]) < IMAGE_SIZE:
        raise InputError(f"samples must have shape (B, F, 1, H, W) with H, W >= {IMAGE_SIZE}, got {tuple(samples.shape)}")
    return samples.detach().float().cpu().clamp(-1, 1)


def _ink(clips: Tensor) -> Tensor:
    return (clips + 1) / 2


@lru_cache(maxsize=1)
def typical_centre() -> tuple[float, float]:
    """Mean (x, y) ink centre of mass of the real 8x8 train digits, inside their 8x8 frame."""
    images, _ = load_split("train")
    ink = _ink(images[:, 0])
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    mass = ink.sum(dim=(1, 2))
    x = (ink.sum(dim=1) * coords).sum(dim=1) / mass
    y = (ink.sum(dim=2) * coords).sum(dim=1) / mass
    return float(x.mean()), float(y.mean())


def ink_centres(samples: Tensor) -> Tensor:
    """Ink centre of mass (x, y) of every frame, (B, F, 2) in pixels; the frame centre for a blank frame."""
    clips = _check_clips(samples)
    # A whisker of uniform weight keeps a blank frame's centre defined (the canvas centre).
    ink = _ink(clips[:, :, 0]) + 1e-6
    height, width = ink.shape[-2:]
    mass = ink.sum(dim=(-1, -2))
    x = (ink.sum(dim=-2) * torch.arange(width, dtype=torch.float32)).sum(dim=-1) / mass
    y = (ink.sum(dim=-1) * torch.arange(height, dtype=torch.float32)).sum(dim=-1) / mass
    return torch.stack([x, y], dim=-1)


def digit_crops(samples: Tensor) -> Tensor:
    """The 8x8 digit of every frame, (B * F, 1, 8, 8) in frame order: the window with the most ink."""
    clips = _check_clips(samples)
    frames = clips.reshape(-1, 1, *clips.shape[-2:])
    windows = frames.unfold(2, IMAGE_SIZE, 1).unfold(3, IMAGE_SIZE, 1)[:, 0]  # (N, rows, cols, 8, 8)
    rows, cols = windows.shape[1:3]
    ink = _ink(windows).sum(dim=(-1, -2))
    # Tie-break by the distance to the window a typical digit with this ink centre would sit in.
    centre_x, centre_y = typical_centre()
    centres = ink_centres(samples).reshape(-1, 2)
    top = torch.arange(rows, dtype=torch.float32)[None, :, None] - (centres[:, 1] - centre_y)[:, None, None]
    left = torch.arange(cols, dtype=torch.float32)[None, None, :] - (centres[:, 0] - centre_x)[:, None, None]
    score = ink - 1e-3 * (top**2 + left**2)
    best = score.flatten(1).argmax(dim=1)
    index = torch.arange(frames.shape[0])
    return windows[index, best // cols, best % cols][:, None].contiguous()


def clip_velocity(samples: Tensor) -> Tensor:
    """Least-squares velocity (vx, vy) of the ink centre of mass, pixels per frame, (B, 2)."""
    centres = ink_centres(samples)
    frames = centres.shape[1]
    if frames < 2:
        raise InputError("a velocity needs at least 2 frames")
    f = torch.arange(frames, dtype=torch.float32)
    f = f - f.mean()
    return (f[None, :, None] * (centres - centres.mean(dim=1, keepdim=True))).sum(dim=1) / (f**2).sum()


def motion_score(samples: Tensor, directions: Tensor, speed: float = DEFAULT_SPEED) -> Tensor:
    """``1 - |v - speed * u| / speed`` per clip: 1 for the prompted motion, lower the further from it."""
    target = torch.tensor(DIRECTION_VECTORS, dtype=torch.float32)[directions.long()] * speed
    return 1.0 - (clip_velocity(samples) - target).norm(dim=1) / speed


def moved_direction(samples: Tensor) -> Tensor:
    """The direction index (into DIRECTIONS) each clip moves in most: the largest velocity component."""
    return (clip_velocity(samples) @ torch.tensor(DIRECTION_VECTORS, dtype=torch.float32).T).argmax(dim=1)


class MovingDigitReward:
    """A reward for moving-digit clips (see ``moving_digit_reward``); calling it is ``score``."""

    media: MediaKind = "video"

    def __init__(self, kind: str, motion_weight: float, speed: float, frame_reward: str, seed: int,
                 split: str = "train", hidden: int = 64) -> None:
        if kind not in VIDEO_REWARD_KINDS:
            raise InputError(f"unknown video reward kind {kind!r}; expected one of {VIDEO_REWARD_KINDS}")
        if not speed > 0:
            raise InputError(f"speed must be positive, got {speed}")
        if not math.isfinite(motion_weight):
            raise InputError(f"motion_weight must be finite, got {motion_weight}")
        self.name = ("moving-digits" if kind == "default" else f"moving-digits-{kind}") + (
            "@held_out" if split == "held_out" else "")
        self.kind, self.motion_weight, self.speed = kind, motion_weight, speed
        self.frame_reward = digit_reward(kind=frame_reward, seed=seed, split=split, hidden=hidden)
        typical_centre()  # build the references now, not inside the first call

    @torch.no_grad()
    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """One score per clip (B,), higher is better."""
        clips = _check_clips(media)
        if len(prompts) != clips.shape[0]:
            raise InputError(f"got {clips.shape[0]} samples but {len(prompts)} prompts")
        directions = parse_directions(prompts)
        parse_digits(prompts)  # fail on a prompt without a digit even for the motion-only kind
        motion = motion_score(clips, directions, self.speed)
        if self.kind == "motion":
            return motion
        frames = clips.shape[1]
        per_frame = self.frame_reward(digit_crops(clips), [p for p in prompts for _ in range(frames)])
        digit = per_frame.reshape(-1, frames).mean(dim=1)
        return digit if self.kind == "digit" else digit + self.motion_weight * motion

    __call__ = score


def moving_digit_reward(
    *,
    kind: str = "default",
    motion_weight: float = 2.0,
    speed: float = DEFAULT_SPEED,
    frame_reward: str = "default",
    seed: int = 0,
    split: str = "train",
    hidden: int = 64,
) -> MovingDigitReward:
    """The reward for moving-digit clips (registry name "moving-digits"), ``score(samples (B,F,1,H,W), prompts)``.

    Kinds:
        ``"default"``: mean over frames of ``digit_reward(kind=frame_reward)`` on each frame's digit
        crop, plus ``motion_weight * motion_score``.
        ``"digit"``: the frame term alone.
        ``"motion"``: ``motion_score`` alone (no guard: a moving blob maximises it).

    ``speed`` is the pixels per frame the prompts mean (the base model's ``config.speed``). The digit
    and direction are read from each prompt; a prompt without exactly one of each is an error.
    ``split="held_out"`` (with another ``seed`` and ``hidden``) reads the frames with the digits world's
    held-out classifier: the second scorer of `sdpo bench methods`, named ``moving-digits@held_out``.
    """
    return MovingDigitReward(kind, motion_weight, speed, frame_reward, seed, split, hidden)


def video_metrics(samples: Tensor, prompts: list[str], seed: int = 0) -> dict[str, float]:
    """Sample quality: ``digit_accuracy`` (share of frames whose digit crop the classifier reads as the
    prompted digit) and ``direction_accuracy`` (share of clips moving mostly in the prompted direction)."""
    clips = _check_clips(samples)
    if len(prompts) != clips.shape[0]:
        raise InputError(f"got {clips.shape[0]} samples but {len(prompts)} prompts")
    digits, directions = parse_digits(prompts), parse_directions(prompts)
    classifier = digit_classifier(seed)
    with torch.no_grad():
        predicted = classifier(digit_crops(clips)).argmax(dim=1).reshape(clips.shape[0], -1)
    return {
        "digit_accuracy": (predicted == digits[:, None]).float().mean().item(),
        "direction_accuracy": (moved_direction(clips) == directions).float().mean().item(),
    }


def video_feature_distance(samples: Tensor, real_clips: Tensor, space: str = "classifier") -> float:
    """Fréchet distance between the frames' digit crops of samples and of real clips (lower is closer).

    The image toy's ``feature_distance`` on every frame's crop (classifier hidden layer by default);
    motion is judged by the reward, not here. As there, even real vs real is above zero.
    """
    if not math.isfinite(float(samples.float().sum())):
        raise InputError("samples contain NaN or infinite values")
    return feature_distance(digit_crops(samples), digit_crops(real_clips), space)
