"""The digits world's reward (registered as "digits"), and a Fréchet feature distance that guards quality.

The reward is a ``sdpo.rewards.Reward``: ``score(samples, prompts)`` with samples (B, 1, 8, 8) in
[-1, 1], one prompt per sample, returns a float tensor (B,) where higher is better.

Why not the classifier's probability of the prompted digit: it saturates. A base model pretrained
for a few minutes already scores about 0.975 of a possible 1.0, and a fifth of tuned-vs-base
comparisons tie, so preference pairs carry almost no signal. The default reward instead adds two
terms that keep headroom:

* the classifier's log-odds of the prompted digit, ``logit_y - logsumexp_{k != y} logit_k``, which
  keeps growing as a digit becomes more clearly itself, softly capped (``cap * tanh(x / cap)``) so an
  exaggerated prototype cannot outweigh everything else; a wrong digit scores very low;
* a style preference for bolder strokes: the stroke ink (pixels above a quarter of full intensity,
  so a faint background haze does not count) relative to the median of real digits of the same
  class, in units of that class's spread, so about half of the real digits score above zero; the
  default base model meets it about as often (44-50% of its samples).
  It is softly capped and multiplied by the classifier's probability of the prompted digit, and the
  classifier is trained to be unsure of blobs, noise and smeared digits (outlier exposure), so the
  style cannot be hacked by painting the whole square.

Both terms are fixed functions of real data (the train split), computed deterministically at first
use (the classifier trains in about a second) and cached for the process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from sdpo.errors import InputError
from sdpo.rewards.base import MediaKind
from sdpo.toy.digits.data import IMAGE_SIZE, NUM_CLASSES, load_split, parse_digits

REWARD_KINDS = ("default", "log_odds", "log_prob", "probability", "thickness")


# ------------------------------------------------------------------------------------------ classifier
class DigitClassifier(nn.Module):
    """A one-hidden-layer MLP on the 64 pixels; its hidden layer is the feature space of ``feature_distance``."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def features(self, images: Tensor) -> Tensor:
        """Hidden activations (B, hidden) of images (B, 1, 8, 8) in [-1, 1]."""
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, 10)."""
        return self.head(self.body(images))


def _outliers(images: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Non-digits the classifier must be unsure about: noise, flat fields, smeared and overlaid digits.

    Without them the MLP calls a solid blob a confident "1" (log-odds +2), which a thickness
    preference would happily exploit. Four kinds, ``count // 4`` each.
    """
    k = count // 4
    shape = (k, 1, IMAGE_SIZE, IMAGE_SIZE)
    noise = torch.rand(shape, generator=generator) * 2 - 1
    flat = torch.ones(shape) * (torch.rand((k, 1, 1, 1), generator=generator) * 2 - 1)
    picks = torch.randint(0, len(images), (2, k), generator=generator)
    # A 3x3 dilation turns an 8x8 digit into a blob: the far end of "thicker strokes".
    smeared = nn.functional.max_pool2d(images[picks[0]], 3, stride=1, padding=1)
    overlaid = torch.maximum(images[picks[0]], images[picks[1]])
    return torch.cat([noise, flat, smeared, overlaid])


def digit_classifier(seed: int = 0, hidden: int = 64, steps: int = 400, split: str = "train") -> DigitClassifier:
    """The cached classifier for these settings (one cache key however the arguments are spelled)."""
    return _digit_classifier(int(seed), int(hidden), int(steps), str(split))


@lru_cache(maxsize=4)
def _digit_classifier(seed: int, hidden: int, steps: int, split: str) -> DigitClassifier:
    """The classifier trained on one split of the real digits (deterministic, cached, frozen).

    Full-batch AdamW with weight decay. Training digits get small Gaussian pixel noise, and a set of
    non-digits (``_outliers``) is pushed toward the uniform prediction (outlier exposure), so that
    blobs, noise and smeared strokes score about log(1/9) instead of a confident class. About 99.7%
    accurate on the held-out split.

    Trains on one CPU thread (restored afterwards): the matrices are tiny, so a second thread only
    adds OpenMP barriers, which stall badly on a busy machine (seen: 1 s alone, 100 s under load).
    """
    images, labels = load_split(split)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # the first caller may be inside no_grad (e.g. feature_distance)
            _fit(model, optimizer, images, labels, steps, generator)
    finally:
        torch.set_num_threads(threads)
    model.eval().requires_grad_(False)
    return model


def _fit(
    model: DigitClassifier,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    steps: int,
    generator: torch.Generator,
) -> None:
    for _ in range(steps):
        noisy = images + 0.1 * torch.randn(images.shape, generator=generator)
        loss = nn.functional.cross_entropy(model(noisy), labels)
        outliers = _outliers(images, len(images) // 2, generator)
        # Cross-entropy against the uniform distribution (up to a constant).
        loss = loss - 0.5 * model(outliers).log_softmax(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def prompted_log_odds(logits: Tensor, labels: Tensor) -> Tensor:
    """``logit_y - logsumexp_{k != y} logit_k``: log(p / (1 - p)) of the prompted class, unbounded."""
    target = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return target - torch.logsumexp(others, dim=1)


# ------------------------------------------------------------------------------------------ style
INK_THRESHOLD = 0.25
"""Pixel level (on a 0..1 scale; 4 of the data's 16 levels) below which a pixel is not counted as ink."""


def ink(images: Tensor, threshold: float = INK_THRESHOLD) -> Tensor:
    """Stroke ink per image: the mean of ``relu(v - threshold) / (1 - threshold)``, pixels v in [0, 1].

    Real digits have exactly blank backgrounds, while generated ones carry a faint haze (half their
    pixels sit in (0, 0.1)); counting all of it made the base model look bolder than real digits
    and would let a tuned model "thicken" digits by greying the background. The threshold keeps
    the measure continuous (no ties) while only strokes count.
    """
    values = (images.float().clamp(-1, 1) + 1) / 2
    return ((values - threshold).clamp_min(0) / (1 - threshold)).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class InkStatistics:
    """Per-class median and standard deviation of ``ink`` on the real train digits."""

    median: Tensor
    std: Tensor


@lru_cache(maxsize=2)
def ink_statistics(split: str = "train") -> InkStatistics:
    """The real-data reference of the thickness term (of the train split, unless another is named)."""
    images, labels = load_split(split)
    values = ink(images)
    medians = torch.stack([values[labels == c].median() for c in range(NUM_CLASSES)])
    stds = torch.stack([values[labels == c].std() for c in range(NUM_CLASSES)])
    return InkStatistics(medians, stds)


def thickness_score(images: Tensor, labels: Tensor, split: str = "train") -> Tensor:
    """Stroke ink relative to the real median of the prompted class, in that class's standard deviations.

    About half of the real digits score above zero (the median is the centre), so it is a style
    preference a faithful base model meets only half the time: room for preference tuning.
    """
    stats = ink_statistics(split)
    return (ink(images) - stats.median[labels]) / stats.std[labels]


# ------------------------------------------------------------------------------------------ rewards
def soft_cap(values: Tensor, cap: float) -> Tensor:
    """``cap * tanh(values / cap)``: the identity near 0, bounded by +-cap, smooth and strictly monotone."""
    return cap * torch.tanh(values / cap)


class DigitReward:
    """A reward for digits (see ``digit_reward``); calling it is ``score``."""

    media: MediaKind = "image"

    def __init__(self, kind: str, classifier_weight: float, style_weight: float, log_odds_cap: float,
                 style_cap: float, seed: int, split: str = "train", hidden: int = 64) -> None:
        if kind not in REWARD_KINDS:
            raise InputError(f"unknown reward kind {kind!r}; expected one of {REWARD_KINDS}")
        if log_odds_cap <= 0 or style_cap <= 0:
            raise InputError("log_odds_cap and style_cap must be positive")
        self.name = "digits" if kind == "default" else f"digits-{kind}"
        if split != "train":
            self.name += f"@{split}"
        self.split = split
        self.kind, self.classifier_weight, self.style_weight = kind, classifier_weight, style_weight
        self.log_odds_cap, self.style_cap = log_odds_cap, style_cap
        self.classifier = digit_classifier(seed, hidden, split=split)
        ink_statistics(split)  # build the reference now, not inside the first call

    @torch.no_grad()
    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """One score per digit (B,), higher is better."""
        if media.ndim != 4 or tuple(media.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise InputError(f"samples must have shape (B, 1, 8, 8), got {tuple(media.shape)}")
        if len(prompts) != media.shape[0]:
            raise InputError(f"got {media.shape[0]} samples but {len(prompts)} prompts")
        images = media.detach().float().cpu().clamp(-1, 1)
        labels = parse_digits(prompts)
        if self.kind == "thickness":
            return thickness_score(images, labels, self.split)
        logits = self.classifier(images)
        if self.kind == "log_prob":
            return logits.log_softmax(dim=1).gather(1, labels[:, None])[:, 0]
        if self.kind == "probability":
            return logits.softmax(dim=1).gather(1, labels[:, None])[:, 0]
        log_odds = prompted_log_odds(logits, labels)
        if self.kind == "log_odds":
            return log_odds
        style = soft_cap(thickness_score(images, labels, self.split), self.style_cap)
        return (self.classifier_weight * soft_cap(log_odds, self.log_odds_cap)
                + self.style_weight * torch.sigmoid(log_odds) * style)

    __call__ = score


def digit_reward(
    *,
    kind: str = "default",
    classifier_weight: float = 0.5,
    style_weight: float = 1.0,
    log_odds_cap: float = 10.0,
    style_cap: float = 3.0,
    seed: int = 0,
    split: str = "train",
    hidden: int = 64,
) -> DigitReward:
    """The reward for digits (registry name "digits"), ``score(samples (B,1,8,8) in [-1,1], prompts) -> (B,)``.

    Kinds:
        ``"default"``: ``classifier_weight * soft_cap(log_odds, log_odds_cap)
        + style_weight * p * soft_cap(thickness, style_cap)``, the headroom reward described above,
        where ``p = sigmoid(log_odds)`` is the classifier's probability of the prompted digit: the
        style only counts for a digit that reads as the one asked for, so a blob gains nothing.
        ``"log_odds"``: the classifier's log-odds of the prompted digit alone.
        ``"log_prob"``: its log-probability (at most 0; saturates for clear digits).
        ``"probability"``: its probability (saturates; kept to reproduce the earlier trial).
        ``"thickness"``: the style term alone (no guard: a blob maximises it).

    ``split="held_out"`` (with another ``seed`` and ``hidden``) builds the same formula on a classifier and
    ink statistics of the held-out split: an independent second scorer that never built pairs or trained
    anything, named ``digits@held_out`` (``sdpo bench methods`` reports it beside the reward).

    The digit asked for is read from each prompt (``parse_digit``); a prompt without one is an error.
    """
    return DigitReward(kind, classifier_weight, style_weight, log_odds_cap, style_cap, seed, split, hidden)


# ------------------------------------------------------------------------------------------ quality
def digit_features(images: Tensor, space: str = "classifier") -> np.ndarray:
    """Feature vectors (B, D) of digits: the classifier's hidden layer, or ``"pixels"`` (64-d)."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if space == "pixels":
        return images.flatten(1).double().numpy()
    if space == "classifier":
        with torch.no_grad():
            return digit_classifier().features(images).double().numpy()
    raise InputError(f"unknown feature space {space!r}; expected 'classifier' or 'pixels'")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two sets of feature rows.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``; the trace of the matrix square
    root is taken from the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)``, which is stabler
    than a general ``sqrtm``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise InputError("each feature set needs at least 2 rows")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
    return max(distance, 0.0)


def feature_distance(samples: Tensor, reference_images: Tensor, space: str = "classifier") -> float:
    """Fréchet distance between digit samples and reference digits in a feature space (lower is closer).

    Computed in the classifier's hidden layer by default. Finite-sample bias makes even two sets
    of real digits score above zero; compare against ``feature_distance`` of held-out vs train
    digits (see the toy README figures) rather than against 0.
    """
    if not math.isfinite(float(samples.float().sum())):
        raise InputError("samples contain NaN or infinite values")
    return frechet_distance(digit_features(samples, space), digit_features(reference_images, space))
