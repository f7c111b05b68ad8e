"""A weighted sum of several rewards (registered as "combine"), each normalised raw or per prompt.

``normalize="zscore"`` standardises each reward over the candidates of one prompt before weighting,
so rewards on different scales (PickScore ~21, aesthetic ~6, CLIP score ~30) weigh as the user says.
A z-score needs the whole group, while a stage may score a prompt's candidates in several batches:

* ``CombinedReward.score(media, prompts)`` groups by the prompt strings *within the call* (right when
  all candidates of a prompt are scored together, e.g. one prompt's K candidates per batch);
* the score stage should instead call ``score_parts`` per batch, concatenate the parts over all
  candidates, and call ``combine_scores(parts, groups)`` once with each candidate's prompt (or prompt
  index) as its group. ``sdpo score`` can record the parts under their own names beside the total.

A group of one candidate, or one whose scores are all equal, z-scores to 0 (no preference signal).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from sdpo.errors import InputError
from sdpo.rewards.base import Reward

Normalize = Literal["raw", "zscore"]
NORMALIZATIONS = ("raw", "zscore")


def zscore_by_group(values: Tensor, groups: Sequence[Hashable]) -> Tensor:
    """``values`` standardised within each group (population std; 0 where a group has no spread)."""
    if len(values) != len(groups):
        raise InputError(f"got {len(values)} scores but {len(groups)} group labels")
    values = values.float()
    out = torch.zeros_like(values)
    index: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        index.setdefault(group, []).append(i)
    for members in index.values():
        rows = torch.tensor(members)
        part = values[rows]
        std = part.std(unbiased=False)
        out[rows] = 0.0 if std <= 1e-12 else (part - part.mean()) / std
    return out


def combine_scores(parts: Mapping[str, Tensor], weights: Mapping[str, float], groups: Sequence[Hashable],
                   normalize: Normalize | Mapping[str, Normalize] = "raw") -> Tensor:
    """``sum_k weights[k] * norm_k(parts[k])`` over every candidate; ``groups`` labels each candidate's prompt."""
    total: Tensor | None = None
    for name, values in parts.items():
        how = normalize[name] if isinstance(normalize, Mapping) else normalize
        if how not in NORMALIZATIONS:
            raise InputError(f"unknown normalization {how!r} for {name!r}; use one of {', '.join(NORMALIZATIONS)}")
        values = values if values.is_floating_point() else values.float()
        term = weights[name] * (zscore_by_group(values, groups) if how == "zscore" else values)
        total = term if total is None else total + term
    if total is None:
        raise InputError("combine needs at least one reward")
    return total


class CombinedReward:
    """Several rewards of one media kind, weighted and normalised (see the module docstring)."""

    name = "combine"

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None,
                 normalize: Normalize | Sequence[Normalize] = "raw") -> None:
        if not rewards:
            raise InputError("combine needs at least one reward")
        names = [reward.name for reward in rewards]
        if len(set(names)) != len(names):
            raise InputError(f"combine got a reward twice: {', '.join(names)}")
        kinds = {reward.media for reward in rewards}
        if len(kinds) != 1:
            raise InputError(f"combine needs rewards of one media kind, got {', '.join(sorted(kinds))}")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        norms = [normalize] * len(rewards) if isinstance(normalize, str) else list(normalize)
        if len(weights) != len(rewards) or len(norms) != len(rewards):
            raise InputError(f"combine got {len(rewards)} rewards, {len(weights)} weights, {len(norms)} normalizations")
        for how in norms:
            if how not in NORMALIZATIONS:
                raise InputError(f"unknown normalization {how!r}; use one of {', '.join(NORMALIZATIONS)}")
        self.rewards, self.media = list(rewards), kinds.pop()
        self.weights = dict(zip(names, weights, strict=True))
        self.normalize: dict[str, Normalize] = dict(zip(names, norms, strict=True))

    def score_parts(self, media: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Each reward's raw scores (B,), keyed by its name."""
        return {reward.name: reward.score(media, prompts).float().cpu() for reward in self.rewards}

    def combine(self, parts: Mapping[str, Tensor], groups: Sequence[Hashable]) -> Tensor:
        """The weighted, normalised sum of ``parts`` (from ``score_parts``, possibly concatenated)."""
        return combine_scores(parts, self.weights, groups, self.normalize)

    def score(self, media: Tensor, prompts: list[str]) -> Tensor:
        """The combined score, z-scores grouped by the prompts of this call."""
        return self.combine(self.score_parts(media, prompts), prompts)


def combine(rewards: Sequence[str | Mapping[str, Any] | Reward], weights: Sequence[float] | None = None,
            normalize: Normalize | Sequence[Normalize] = "raw") -> CombinedReward:
    """Rewards given as registry names, ``{"name": ..., **options}`` dicts, or Reward objects."""
    from sdpo.rewards.registry import load_reward

    built: list[Reward] = []
    for item in rewards:
        if isinstance(item, str):
            built.append(load_reward(item))
        elif isinstance(item, Mapping):
            options = dict(item)
            if "name" not in options:
                raise InputError(f"a combine entry needs a 'name' key, got {sorted(options)}")
            built.append(load_reward(options.pop("name"), **options))
        else:
            built.append(item)
    return CombinedReward(built, weights, normalize)
