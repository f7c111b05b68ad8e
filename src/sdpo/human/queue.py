"""Which items a rater sees and in what order: fixed by a seed, so a restart shows the same queue.

An item is two candidates of one prompt (paired mode), one candidate (unpaired mode), or for
``sdpo rate`` two models' samples from the same evaluation seed. Its id names what is compared but
never, for ``rate``, which side is which model. The left/right placement is drawn per item from the
same seeded generator and recorded with every answer (:attr:`sdpo.human.answers.Answer.shown`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sdpo.errors import InputError


@dataclass(frozen=True)
class Item:
    """One thing to judge."""

    id: str
    """Stable id: ``p00003-c000-c002`` (paired, candidates in index order), ``p00003-c001`` (unpaired),
    ``s00004-k0`` (rate: sample 4, comparison 0)."""
    prompt: str
    prompt_index: int
    shown: tuple[str, ...]
    """What is shown, left then right: media paths (label) or model names (rate)."""
    files: tuple[str, ...]
    """The media files shown, in the same order, relative to the folder."""
    sample: int | None = None
    """``rate``: the evaluation sample's index."""


def _groups(records: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    groups: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["prompt_index"], []).append(record)
    return {index: sorted(groups[index], key=lambda r: r["candidate_index"]) for index in sorted(groups)}


def label_items(records: Sequence[dict[str, Any]], mode: str = "paired", pairs_per_prompt: int | None = None,
                seed: int = 0) -> list[Item]:
    """The items of a generate folder's candidate ``records``: every candidate pair of each prompt (or
    ``pairs_per_prompt`` of them, drawn), or every candidate (``mode="unpaired"``), shuffled by ``seed``."""
    if pairs_per_prompt is not None and pairs_per_prompt < 1:
        raise InputError(f"--pairs-per-prompt must be at least 1, got {pairs_per_prompt}")
    rng = random.Random(seed)
    items: list[Item] = []
    for index, group in _groups(records).items():
        if mode == "unpaired":
            items += [Item(f"p{index:05d}-c{r['candidate_index']:03d}", r["prompt"], index, (r["path"],), (r["path"],))
                      for r in group]
            continue
        combos = list(itertools.combinations(group, 2))
        if pairs_per_prompt is not None and pairs_per_prompt < len(combos):
            combos = sorted(rng.sample(combos, pairs_per_prompt), key=lambda c: (c[0]["candidate_index"],
                                                                                  c[1]["candidate_index"]))
        for first, second in combos:
            item_id = f"p{index:05d}-c{first['candidate_index']:03d}-c{second['candidate_index']:03d}"
            items.append(Item(item_id, first["prompt"], index, (first["path"], second["path"]),
                              (first["path"], second["path"])))
    if not items:
        raise InputError("nothing to label: every prompt has fewer than two candidates (use --unpaired to rate "
                         "single candidates)")
    rng.shuffle(items)
    return [_placed(item, rng) for item in items]


def _placed(item: Item, rng: random.Random) -> Item:
    """``item`` with its two sides swapped or not, drawn from ``rng`` (one draw per item, even unpaired,
    so the draws of later items do not depend on the mode)."""
    swap = rng.random() < 0.5
    if not swap or len(item.shown) != 2:
        return item
    return Item(item.id, item.prompt, item.prompt_index, item.shown[::-1], item.files[::-1], item.sample)


def rate_items(prompts: Sequence[str], comparisons: Sequence[tuple[str, str]],
               files: dict[tuple[str, int], str], seed: int = 0) -> list[Item]:
    """Blind items of an evaluation: for every sample and every (model A, model B) of ``comparisons``,
    the two models' media from that sample (``files[(model, sample)]``), shuffled and placed by ``seed``."""
    rng = random.Random(seed)
    items = [Item(f"s{sample:05d}-k{k}", prompt, sample, (a, b), (files[(a, sample)], files[(b, sample)]), sample)
             for sample, prompt in enumerate(prompts) for k, (a, b) in enumerate(comparisons)]
    rng.shuffle(items)
    return [_placed(item, rng) for item in items]


__all__ = ["Item", "label_items", "rate_items"]
