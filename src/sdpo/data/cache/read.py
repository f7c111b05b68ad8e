"""Reading a cache: :class:`CachedPairs`, a Dataset of ``Pair`` over memory-mapped shards."""

from __future__ import annotations

import os
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sdpo.data.batch import Pair, PairBatch
from sdpo.data.buckets import format_buckets
from sdpo.data.cache.layout import (
    COND_PREFIX,
    GAP_KEY,
    LATENT_KEYS,
    REBUILD,
    SAFETENSORS_DTYPES,
    STD_KEYS,
    CacheError,
)
from sdpo.data.cache.manifest import Manifest, read_manifest
from sdpo.data.cache.verify import verify_cache
from sdpo.models.base import MediaFormat


class CachedPairs(Dataset):
    """A precomputed cache as a Dataset of ``Pair`` (chosen and rejected latents, conditions), one per pair.

    Shards are opened lazily (memory-mapped) and each item reads only its own rows, so sequential
    and shuffled access are both cheap and memory stays small whatever the cache size; at most
    ``max_open_shards`` shards are kept open. ``verify`` (the default) checks every shard's sha256
    and that its tensors are finite up front (see :func:`verify_cache`: a shard unchanged since it
    last passed is not read again). Safe to pass to a DataLoader with workers (open shards are not pickled).

    When the cache stores posterior stds (``has_latent_std``), each Pair carries them in
    ``chosen_std`` / ``rejected_std`` (its ``chosen`` / ``rejected`` are then the posterior means).

    A bucketed cache's pairs have their bucket's shape: ``buckets`` lists the sizes and
    ``bucket_ids()`` each pair's bucket, which the trainer's batch order groups by (a cache without
    buckets is one bucket at its ``media_format``).

    A cache of labelled samples (manifest ``kind: "samples"``) is refused: ``CachedSamples`` reads it.
    """

    row_name = "pairs"
    """What one row is, in the trainer's announcement and in errors."""

    kind = "pairs"
    """The manifest ``kind`` this reader takes."""

    def __init__(self, cache_dir: str | os.PathLike[str], *, verify: bool = True, max_open_shards: int = 2) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest: dict[str, Any] = read_manifest(self.cache_dir)
        """The manifest's JSON object, as :func:`read_manifest` returns it."""
        self.layout: Manifest = Manifest.from_json(self.manifest)
        """The same manifest, typed."""
        if self.layout.kind != self.kind:
            train = "train with method kto" if self.layout.kind == "samples" else "train a pair method"
            raise CacheError(f"{self.cache_dir} holds {self.layout.kind}, not {self.kind}: {train}")
        if verify:
            verify_cache(self.cache_dir, self.layout)
        self.max_open_shards = max(1, max_open_shards)
        self.cond_keys: list[str] = self.layout.cond_keys
        self.has_gaps: bool = GAP_KEY in self.layout.tensors
        self.has_latent_std: bool = self.layout.latent_std
        """Whether the cache stores the posterior std of every latent (older caches and toy worlds: no)."""
        self._ends: list[int] = []
        end = 0
        for shard in self.layout.shards:
            end += shard.num_pairs
            self._ends.append(end)
        self._open: OrderedDict[int, Any] = OrderedDict()
        listed = self.layout.buckets
        self._bucketed = listed is not None
        self.buckets: list[tuple[int, int]] = (
            format_buckets(self.media_format) if listed is None else [(b.height, b.width) for b in listed])
        """The (height, width) pixel size of each bucket (a cache without buckets: its media format's)."""

    def bucket_ids(self) -> Tensor:
        """Each pair's bucket (an index into ``buckets``) in cache order, (N,) int64."""
        counts = [shard.num_pairs for shard in self.layout.shards]
        ids = [(shard.bucket or 0) if self._bucketed else 0 for shard in self.layout.shards]
        return torch.repeat_interleave(torch.tensor(ids, dtype=torch.long), torch.tensor(counts, dtype=torch.long))

    @property
    def family(self) -> str:
        """The model family the cache was made for."""
        return self.layout.family

    @property
    def media_format(self) -> MediaFormat:
        """The media format the pairs were loaded at."""
        return self.layout.media_format

    def __len__(self) -> int:
        return self.layout.num_pairs

    def __getitem__(self, index: int) -> Pair:
        shard, local = self.locate(index)
        handle = self._shard(shard)
        try:
            chosen, rejected = (handle.get_slice(name)[local] for name in LATENT_KEYS)
            item = Pair(chosen, rejected, {key: handle.get_slice(COND_PREFIX + key)[local] for key in self.cond_keys},
                        handle.get_slice(GAP_KEY)[local] if self.has_gaps else None)
            if self.has_latent_std:
                item.chosen_std, item.rejected_std = (handle.get_slice(name)[local] for name in STD_KEYS)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
            raise CacheError(f"{self._shard_path(shard)}: cannot read pair {local} ({error}): {REBUILD}") from None
        return item

    def locate(self, index: int) -> tuple[int, int]:
        """The shard holding row ``index`` (negative counts from the end) and the row within it."""
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"row {index} out of range for a cache of {length} {self.row_name}")
        shard = bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def gaps(self) -> Tensor | None:
        """Every pair's score gap in cache order, (N,) float64, or None for a cache that stores none."""
        if not self.has_gaps:
            return None
        parts = []
        for shard in range(len(self._ends)):
            try:
                parts.append(self._shard(shard).get_tensor(GAP_KEY))
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
                raise CacheError(f"{self._shard_path(shard)}: cannot read {GAP_KEY} ({error}): {REBUILD}") from None
        return torch.cat(parts).double()

    def _shard_path(self, shard: int) -> Path:
        return self.cache_dir / self.layout.shards[shard].file

    def _shard(self, shard: int) -> Any:
        handle = self._open.get(shard)
        if handle is not None:
            self._open.move_to_end(shard)
            return handle
        from safetensors import safe_open

        path = self._shard_path(shard)
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as error:  # noqa: BLE001
            raise CacheError(f"{path} is not a readable safetensors file ({error}): {REBUILD}") from None
        self._check_shard(handle, shard, path)
        self._open[shard] = handle
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return handle

    def _check_shard(self, handle: Any, shard: int, path: Path) -> None:
        expected = self.layout.tensors_of_shard(shard)
        names = set(handle.keys())
        if names != set(expected):
            raise CacheError(f"{path} holds tensors {sorted(names)}, the manifest lists {sorted(expected)}: {REBUILD}")
        count = self.layout.shards[shard].num_pairs
        for name, info in expected.items():
            tensor = handle.get_slice(name)
            shape = list(tensor.get_shape())
            if shape != [count, *info.shape]:
                raise CacheError(f"{path}: {name} has shape {shape}, expected {[count, *info.shape]}: {REBUILD}")
            dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype())
            if dtype is not None and dtype != info.dtype:
                raise CacheError(f"{path}: {name} is {dtype}, the manifest says {info.dtype}: {REBUILD}")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # memory maps do not survive pickling; workers reopen them
        return state


def collate_pairs(items: Sequence[Pair]) -> PairBatch:
    """Stack CachedPairs items into a PairBatch (a DataLoader ``collate_fn``): ``PairBatch.collate``."""
    return PairBatch.collate(items)
