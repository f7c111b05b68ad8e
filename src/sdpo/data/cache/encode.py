"""Encoding pairs for the cache: decoding media in threads, running the spec's encoders, writing shards."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from sdpo.data.cache.layout import (
    CACHE_FORMAT,
    CACHE_VERSION,
    COND_PREFIX,
    GAP_KEY,
    LATENT_KEYS,
    STD_KEYS,
    dtype_name,
    file_sha256,
)
from sdpo.data.cache.manifest import ShardEntry, TensorInfo
from sdpo.data.decode import load_media
from sdpo.data.pairs import SKIP_HINT, BadPairsError, OnBadPair, PairList, PairProblem, PreferencePair
from sdpo.errors import InputError
from sdpo.files import atomic_output
from sdpo.models.base import MediaFormat

logger = logging.getLogger(__name__)


class MediaEncoder(Protocol):
    """What precompute needs of a ModelSpec (the full protocol is :class:`sdpo.models.base.ModelSpec`).

    Optionally also ``encode_media_moments(pixels) -> (mean, std)`` (the VAE families): see ``precompute``.
    """

    @property
    def family(self) -> str: ...  # read-only: a spec's family is a class attribute

    media_format: MediaFormat

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]: ...

    def encode_media(self, pixels: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class EncodeSettings:
    """How precompute encodes: batch size, progress bar, clip padding, decode threads, the bad-pair policy, and
    whether to store each pair's gap and the latents' posterior std."""

    batch_size: int
    progress: bool
    pad_frames: bool
    num_workers: int
    on_bad_pair: OnBadPair
    with_gaps: bool = False
    latent_std: bool = False


def pair_gap(pair: PreferencePair) -> float | None:
    """The pair's ``gap`` metadata as a float, or None when it has none or it is not a finite number."""
    value = pair.metadata.get("gap")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def encode_all(pairs: PairList, spec: MediaEncoder, writer: ShardWriter, settings: EncodeSettings,
                size: tuple[int, int] | None = None) -> None:
    """Encode ``pairs`` into ``writer``, media loaded at ``size`` (height, width; None: the spec's format).

    A pair whose media fail to load is handled by ``settings.on_bad_pair`` (recorded in ``pairs``' skips)."""
    from tqdm.auto import tqdm

    media_format = spec.media_format
    count = settings.batch_size
    batches = [pairs[start : start + count] for start in range(0, len(pairs), count)]

    def load(ref: Any) -> Tensor:
        return load_media(ref, media_format, size=size, pad_frames=settings.pad_frames)

    def load_pair(pair: PreferencePair) -> tuple[Tensor, Tensor]:
        return load(pair.chosen), load(pair.rejected)

    pool = ThreadPoolExecutor(max_workers=settings.num_workers) if settings.num_workers > 0 else None

    def submit(batch: list[PreferencePair]) -> list[Any]:
        return list(batch) if pool is None else [pool.submit(load_pair, pair) for pair in batch]

    def collect(pending: list[Any], batch: list[PreferencePair]) -> tuple[list[PreferencePair], list[Tensor]]:
        kept, chosen, rejected = [], [], []
        for pair, job in zip(batch, pending, strict=True):
            try:
                first, second = load_pair(job) if pool is None else job.result()
            except (OSError, ValueError) as error:
                # Missed by the cheap check (a stream damaged past its headers): the policy decides.
                problem = PairProblem(pair.source, pair.line, "unreadable media", f"{error}")
                if settings.on_bad_pair == "fail":
                    raise BadPairsError([problem], SKIP_HINT) from None
                pairs.skip(problem)
                logger.warning("skipped %s", problem.describe())
                continue
            kept.append(pair)
            chosen.append(first)
            rejected.append(second)
        return kept, [torch.stack(chosen), torch.stack(rejected)] if kept else []

    try:
        pending = submit(batches[0])
        desc = "precompute" if size is None else f"precompute {size[0]}x{size[1]}"
        with torch.no_grad(), tqdm(total=len(batches), desc=desc, unit="batch",
                                   disable=not settings.progress) as bar:  # fmt: skip
            for number, batch in enumerate(batches):
                kept, pixels = collect(pending, batch)
                if number + 1 < len(batches):
                    pending = submit(batches[number + 1])  # decoded while this batch is encoded
                if kept:
                    _encode_batch(spec, kept, pixels, writer, settings.with_gaps, settings.latent_std)
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _encode_batch(spec: MediaEncoder, batch: list[PreferencePair], pixels: list[Tensor], writer: ShardWriter,
                  with_gaps: bool = False, latent_std: bool = False) -> None:
    tensors = {}
    for name, std_name, media in zip(LATENT_KEYS, STD_KEYS, pixels, strict=True):
        if latent_std:
            mean, std = spec.encode_media_moments(media)  # type: ignore[attr-defined]
            tensors[name] = checked_rows(mean, len(batch), "encode_media_moments")
            tensors[std_name] = checked_rows(std, len(batch), "encode_media_moments")
            if tensors[std_name].shape != tensors[name].shape:
                raise InputError(f"encode_media_moments returned a std of shape {tuple(std.shape)} for a mean "
                                 f"of shape {tuple(mean.shape)}")
        else:
            tensors[name] = checked_rows(spec.encode_media(media), len(batch), "encode_media")
    for key, value in encode_prompt_rows(spec, [pair.prompt for pair in batch]).items():
        tensors[COND_PREFIX + key] = value
    if with_gaps:
        tensors[GAP_KEY] = torch.tensor([pair_gap(pair) for pair in batch], dtype=torch.float64)
    _check_encoded_finite(tensors, batch)
    writer.add(tensors, len(batch))


def encode_prompt_rows(spec: MediaEncoder, prompts: list[str]) -> dict[str, Tensor]:
    """The spec's conditioning of each row's prompt, each distinct prompt encoded once, on the CPU."""
    unique = list(dict.fromkeys(prompts))
    conditions = spec.encode_prompts(unique)
    if not isinstance(conditions, Mapping) or not conditions:
        raise InputError(f"encode_prompts must return a non-empty dict of tensors, got {type(conditions).__name__}")
    index = torch.tensor([unique.index(prompt) for prompt in prompts])
    expanded = {}
    for key, value in conditions.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"encode_prompts returned a non-string key {key!r}")
        value = checked_rows(value, len(unique), f"encode_prompts[{key!r}]")
        expanded[key] = value.index_select(0, index)
    return expanded


def _check_encoded_finite(tensors: Mapping[str, Tensor], batch: Sequence[PreferencePair]) -> None:
    # A NaN written into the cache would surface days later as a diverging loss; refuse it at the source.
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = sorted({int(i) for i in (~torch.isfinite(value)).reshape(len(batch), -1).any(1).nonzero()[:, 0]})
            where = ", ".join(_pair_where(batch[i]) for i in bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise InputError(
                f"the encoder returned non-finite values (NaN/inf) in {name} for {where}: an fp16 VAE can "
                f"overflow, try --dtype fp32 or bf16"
            )


def _pair_where(pair: PreferencePair) -> str:
    return pair.where or f"prompt {pair.prompt!r:.60}"


def checked_rows(value: Any, batch: int, what: str) -> Tensor:
    """``value`` checked to be a tensor with ``batch`` rows, detached, on the CPU, contiguous."""
    if not isinstance(value, Tensor):
        raise InputError(f"{what} must return a tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[0] != batch:
        raise InputError(f"{what} returned shape {tuple(value.shape)}, expected a leading batch dimension of {batch}")
    return value.detach().to("cpu").contiguous()


class ShardWriter:
    """Buffers encoded batches and writes them out ``shard_size`` pairs per file.

    With buckets, ``start_bucket`` ends the current shard (a shard holds one bucket, so one shape per
    tensor) and records the finished bucket's tensor shapes in ``bucket_tensors``.
    """

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder = folder
        self.shard_size = shard_size
        self.pending: dict[str, list[Tensor]] = {}
        self.pending_count = 0
        self.shards: list[ShardEntry] = []
        self.tensor_info: dict[str, TensorInfo] = {}
        self.bucket: int | None = None
        self.bucket_tensors: dict[int, dict[str, TensorInfo]] = {}

    def start_bucket(self, bucket: int) -> None:
        self.flush(final=True)
        self.bucket, self.tensor_info = bucket, {}

    def add(self, tensors: dict[str, Tensor], count: int) -> None:
        if not self.tensor_info:
            self.tensor_info = {
                name: TensorInfo(list(value.shape[1:]), dtype_name(value.dtype)) for name, value in tensors.items()
            }
        elif set(tensors) != set(self.tensor_info):
            raise InputError(f"the spec returned tensors {sorted(tensors)} after {sorted(self.tensor_info)} for earlier batches")
        for name, value in tensors.items():
            info = self.tensor_info[name]
            if list(value.shape[1:]) != info.shape or dtype_name(value.dtype) != info.dtype:
                raise InputError(
                    f"{name}: the spec returned per-pair shape {list(value.shape[1:])} {dtype_name(value.dtype)} "
                    f"after {info.shape} {info.dtype} for earlier batches (all pairs must match)"
                )
            self.pending.setdefault(name, []).append(value)
        self.pending_count += count
        self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        while self.pending_count >= self.shard_size or (final and self.pending_count > 0):
            size = min(self.shard_size, self.pending_count)
            shard, rest = {}, {}
            for name, parts in self.pending.items():
                joined = torch.cat(parts) if len(parts) > 1 else parts[0]
                # clone(): safetensors must not see views sharing storage with the kept remainder.
                shard[name] = joined[:size].clone()
                rest[name] = [joined[size:]] if joined.shape[0] > size else []
            self.pending = rest
            self.pending_count -= size
            self._write(shard, size)

    def _write(self, tensors: dict[str, Tensor], count: int) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.folder / name
        with atomic_output(path) as temporary:  # a full disk leaves no torn shard (sdpo.files)
            save_file(tensors, str(temporary),
                      metadata={"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "num_pairs": str(count)})
            with temporary.open("rb+") as handle:
                os.fsync(handle.fileno())
        self.shards.append(ShardEntry(name, count, path.stat().st_size, file_sha256(path), self.bucket))
        if self.bucket is not None:
            self.bucket_tensors[self.bucket] = self.tensor_info
