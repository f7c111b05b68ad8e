"""The precompute cache: latents and prompt conditioning of every pair, encoded once, in safetensors shards.

Layout of a cache folder::

    manifest.json
    shard-00000.safetensors   # pairs 0 .. shard_size-1
    shard-00001.safetensors
    ...
    .verified.json            # written by readers: shards whose sha256 passed (see verify_cache)

Each shard holds, for its N pairs, ``latents_chosen`` (N, ...), ``latents_rejected`` (N, ...) and one
``cond.<key>`` (N, ...) per conditioning tensor of ``spec.encode_prompts``, and ``gap`` (N,) float64,
each pair's score gap, when every pair came with a numeric ``gap`` (as `sdpo pairs` writes it; a cache
without it reads as before, its pairs with no gap). For a VAE family the
latents are the posterior means and ``latents_chosen_std`` / ``latents_rejected_std`` (same shapes)
hold the posterior stds, scaled like the latents (manifest ``latent_std: true``); caches made before
the std was stored, and caches of a deterministic encoder (the toy worlds), have neither. ``manifest.json`` says
what made the cache and how to check it (see :func:`precompute`). A cache is written into a hidden
sibling folder and renamed into place only once complete, so a folder that exists is a finished
cache; an interrupted run leaves nothing behind.

A cache made with aspect-ratio ``buckets`` (version 2) groups its pairs by bucket: the pairs of bucket 0
come first (in the order given), then those of bucket 1, and so on, and a shard never holds two buckets,
so each shard's latents have one shape. The manifest lists ``buckets`` (``height``, ``width``,
``num_pairs`` and the bucket's ``tensors`` each) and each shard's ``bucket`` (an index into that list);
``tensors`` is then the first non-empty bucket's. A cache without buckets is written as version 1,
exactly as before, and reads as one bucket at its ``media_format``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sdpo.data.batch import Pair, PairBatch
from sdpo.data.media import bucket_for, check_buckets, check_pairs, format_buckets, load_media, media_size
from sdpo.data.pairs import (
    SKIP_HINT,
    BadPairsError,
    OnBadPair,
    PairList,
    PairProblem,
    PreferencePair,
    check_policy,
    media_kind,
)
from sdpo.errors import InputError
from sdpo.files import atomic_output, fsync_dir, named_for, write_atomic
from sdpo.folders import check_replaceable
from sdpo.models.base import MediaFormat

logger = logging.getLogger(__name__)

CACHE_FORMAT = "sdpo-pair-cache"
"""The ``format`` field of every cache manifest."""
CACHE_VERSION = 2
"""The newest layout (2: aspect-ratio buckets), bumped whenever the layout changes. A cache without
buckets is still written as version 1, which older sdpo releases read too; a bucketed one is version 2,
so an sdpo that cannot group batches by bucket refuses it instead of failing on its shapes."""
READABLE_VERSIONS = (1, 2)
"""The cache versions this sdpo reads; a cache of any other must be rebuilt."""
MANIFEST_NAME = "manifest.json"
LATENT_KEYS = ("latents_chosen", "latents_rejected")
STD_KEYS = ("latents_chosen_std", "latents_rejected_std")
"""The posterior stds of LATENT_KEYS, in a cache whose manifest says ``latent_std: true``."""
COND_PREFIX = "cond."
GAP_KEY = "gap"
"""The per-pair score gap in a shard (optional: only when every pair of the cache had one)."""

_REBUILD = "delete the folder and rerun `sdpo precompute`"
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


class CacheError(InputError):
    """A cache folder that is missing, damaged, or made for another model; the message says which."""


class MediaEncoder(Protocol):
    """What precompute needs of a ModelSpec (the full protocol is :class:`sdpo.models.base.ModelSpec`).

    Optionally also ``encode_media_moments(pixels) -> (mean, std)`` (the VAE families): see ``precompute``.
    """

    family: str
    media_format: MediaFormat

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]: ...

    def encode_media(self, pixels: Tensor) -> Tensor: ...


# --------------------------------------------------------------------------------------------- writing


def precompute(
    pairs: Iterable[PreferencePair],
    spec: MediaEncoder,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    pad_frames: bool = False,
    num_workers: int = 4,
    on_bad_pair: OnBadPair = "fail",
    check_media: bool = True,
    latent_std: bool = True,
    buckets: Sequence[tuple[int, int] | str] | None = None,
) -> Path:
    """Encode every pair once through ``spec`` and write the cache to ``out_dir``; returns ``out_dir``.

    Media are loaded at ``spec.media_format`` (see :func:`sdpo.data.media.load_media`; ``pad_frames``
    lets short clips repeat their last frame), encoded ``batch_size`` pairs at a time with
    ``spec.encode_media`` (chosen and rejected separately) and ``spec.encode_prompts`` (each distinct
    prompt of a batch once), under ``torch.no_grad``. The spec moves pixels to its own device and
    dtype; results are stored on the CPU in the dtype the spec returns. ``num_workers`` threads decode
    the next batch's media while the current one is encoded (0: decode in this thread).

    ``manifest.json`` records: ``format``, ``version``, ``family``, ``pretrained`` (the spec's
    ``pretrained`` attribute, or null), ``media_format``, ``num_pairs``, ``shards`` (``file``,
    ``num_pairs``, ``bytes``, ``sha256`` each), ``tensors`` (name -> per-pair ``shape`` and ``dtype``),
    ``extra`` (``extra_manifest``), ``created``, ``sdpo_version`` and ``latent_std``.

    ``latent_std`` (default true): when the spec has ``encode_media_moments`` (the VAE families), the
    latents stored are the posterior means and the posterior stds are stored beside them (``STD_KEYS``,
    scaled like the latents), so training can draw ``mean + std * eps`` each step
    (``TrainConfig.latent_sampling``); this doubles the latents' bytes. A spec without it (a
    deterministic encoder) stores ``encode_media`` alone; ``latent_std=False`` does so for any spec.

    ``buckets`` (default None: every pair at ``spec.media_format``'s one resolution, a version 1 cache as
    before): aspect-ratio buckets, ``(height, width)`` pixel sizes or ``"HEIGHTxWIDTH"`` strings. Each
    pair goes to the bucket whose aspect ratio is closest to its chosen member's size
    (:func:`sdpo.data.media.bucket_for`, ties to the earlier bucket); both members are loaded at that
    bucket's size, each resized to cover it (aspect ratio kept) and centre-cropped, so only the sliver
    by which an image's ratio differs from its bucket's is cut, not everything outside one centred
    square. Sides must be positive multiples of the model's spatial factor (VAE downsampling times
    the denoiser's patch size, when the spec tells it): a ValueError names the first bad bucket. The
    trainer then never mixes buckets in a batch. The manifest records ``buckets`` and each shard's
    ``bucket`` (see the module docstring); ``media_format`` stays the spec's (the model's own resolution).

    Before the first encode every pair's media are checked (:func:`sdpo.data.media.check_pairs`;
    ``check_media=False`` when the caller already did): ``on_bad_pair="fail"`` raises BadPairsError
    listing every bad pair, ``"skip"`` leaves them out; a pair that still fails to load while
    encoding is handled the same way. Skipped pairs (also those a reader skipped, such as Pick-a-Pic
    ties, when ``pairs`` is a PairList) are recorded in the manifest: ``skipped`` (``source``,
    ``line``, ``kind``, ``reason`` each; the first 10,000) and ``skipped_counts`` (kind -> count).

    An existing non-empty ``out_dir`` is an error unless ``overwrite``; even then it is replaced
    only after the new cache is complete.
    """
    check_policy(on_bad_pair)
    pairs = pairs if isinstance(pairs, PairList) else PairList(pairs)
    out_dir = Path(out_dir)
    if not pairs:
        raise InputError("no pairs to precompute")
    if batch_size < 1 or shard_size < 1:
        raise InputError(f"batch_size and shard_size must be at least 1, got {batch_size} and {shard_size}")
    extra = dict(extra_manifest or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as error:
        raise InputError(f"extra_manifest is not JSON-serialisable: {error}") from None
    _check_out_dir(out_dir, overwrite)
    media_format = spec.media_format
    if buckets is not None:
        buckets = check_buckets(list(buckets), spatial_factor(spec))
    # Fail now, not hours into encoding, when the data does not suit the model or does not decode.
    if check_media:
        pairs = check_pairs(pairs, media_format, pad_frames=pad_frames, on_bad_pair=on_bad_pair,
                            num_workers=num_workers, model=spec.family)  # fmt: skip
    else:
        _check_kinds(pairs, media_format, spec.family)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writer = _ShardWriter(staging, shard_size)
        # Every shard must hold the same tensors, so the gaps are stored only when no pair lacks one.
        with_gaps = all(pair_gap(pair) is not None for pair in pairs)
        with_std = latent_std and callable(getattr(spec, "encode_media_moments", None))
        settings = _EncodeSettings(batch_size, progress, pad_frames, num_workers, on_bad_pair, with_gaps, with_std)
        if buckets is None:
            _encode_all(pairs, spec, writer, settings)
        else:
            for index, (bucket, group) in enumerate(zip(buckets, _group_by_bucket(pairs, buckets, settings),
                                                        strict=True)):
                writer.start_bucket(index)
                if group:
                    _encode_all(group, spec, writer, settings, size=bucket)
        writer.flush(final=True)
        if not writer.shards:
            raise BadPairsError(pairs.problems, "no pair could be encoded")
        manifest = _manifest(spec, writer, pairs, extra, with_std, buckets)
        write_atomic(staging / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
        _swap_into_place(staging, out_dir, overwrite)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise named_for(error, staging, out_dir) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


MAX_RECORDED_SKIPS = 10_000
"""At most this many skipped pairs are listed in a manifest (``skipped_counts`` counts them all)."""


def _manifest(spec: MediaEncoder, writer: _ShardWriter, pairs: PairList, extra: dict[str, Any], with_std: bool,
              buckets: list[tuple[int, int]] | None) -> dict[str, Any]:
    manifest = {
        "format": CACHE_FORMAT,
        "version": 1 if buckets is None else CACHE_VERSION,  # an unbucketed cache stays readable by older sdpo
        "family": spec.family,
        "pretrained": _pretrained_of(spec),
        "media_format": asdict(spec.media_format),
        "num_pairs": sum(shard["num_pairs"] for shard in writer.shards),
        "shards": writer.shards,
        "tensors": writer.tensor_info,
        "skipped": [problem.to_json() for problem in pairs.problems[:MAX_RECORDED_SKIPS]],
        "skipped_counts": dict(sorted(pairs.skipped.items())),
        "extra": extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sdpo_version": _sdpo_version(),
        "latent_std": with_std,
    }
    if buckets is not None:
        counts = [sum(s["num_pairs"] for s in writer.shards if s["bucket"] == i) for i in range(len(buckets))]
        manifest["buckets"] = [{"height": height, "width": width, "num_pairs": count,
                                "tensors": writer.bucket_tensors.get(index, {})}
                               for index, ((height, width), count) in enumerate(zip(buckets, counts, strict=True))]
        manifest["tensors"] = next(b["tensors"] for b in manifest["buckets"] if b["num_pairs"])
        kinds = {json.dumps({n: i["dtype"] for n, i in b["tensors"].items()}, sort_keys=True) for b in manifest["buckets"] if b["num_pairs"]}
        if len(kinds) > 1:  # readers take the tensor names and dtypes of one bucket for all
            raise InputError(f"the spec returned other tensors or dtypes for different buckets: {sorted(kinds)}")
    return manifest


def spatial_factor(spec: Any) -> int | None:
    """Pixels per latent cell along height and width, times the denoiser's spatial patch size (CogVideoX,
    Wan: 2), from ``spec.latent_shape()`` at its media format; None when the spec does not tell."""
    latent_shape = getattr(spec, "latent_shape", None)
    if not callable(latent_shape):
        return None
    try:
        shape = tuple(latent_shape())
    except (AttributeError, NotImplementedError, RuntimeError, TypeError, ValueError):
        return None  # e.g. a spec loaded without the VAE or denoiser it reads the factor from
    height = spec.media_format.height
    if len(shape) < 2 or not shape[-2] or height % shape[-2]:
        return None
    config = getattr(getattr(spec, "denoiser", None), "config", None)
    patch = getattr(config, "patch_size", None) if config is not None else None
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    return height // shape[-2] * (patch if isinstance(patch, int) and patch > 0 else 1)


def _group_by_bucket(pairs: PairList, buckets: list[tuple[int, int]], settings: _EncodeSettings) -> list[PairList]:
    """The pairs of each bucket (closest aspect ratio to the chosen member's size), in their given order;
    a pair whose size cannot be read is handled by ``on_bad_pair``. The groups share ``pairs``' records
    of skipped pairs, so a pair skipped while encoding a group is reported with the rest."""

    def size_of(pair: PreferencePair) -> tuple[int, int] | Exception:
        try:
            return media_size(pair.chosen)
        except (OSError, ValueError) as error:
            return error

    if settings.num_workers > 0 and len(pairs) > 1:
        with ThreadPoolExecutor(max_workers=settings.num_workers) as pool:
            sizes = list(pool.map(size_of, pairs))
    else:
        sizes = [size_of(pair) for pair in pairs]
    groups = [PairList() for _ in buckets]
    for group in groups:
        group.problems, group.skipped = pairs.problems, pairs.skipped
    for pair, size in zip(pairs, sizes, strict=True):
        if isinstance(size, Exception):
            problem = PairProblem(pair.source, pair.line, "unreadable media", f"{size}")
            if settings.on_bad_pair == "fail":
                raise BadPairsError([problem], SKIP_HINT)
            pairs.skip(problem)
            logger.warning("skipped %s", problem.describe())
            continue
        groups[buckets.index(bucket_for(size, buckets))].append(pair)
    return groups


class CacheExistsError(CacheError, FileExistsError):
    """The output folder of precompute already holds something."""


def check_out_dir(out_dir: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Raise CacheExistsError when ``out_dir`` is a file, or a non-empty folder and not ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CacheExistsError(f"cache folder {out_dir} exists and is not a folder")
    if overwrite:  # --overwrite deletes only a cache, never a generate folder, a run, ... (sdpo.folders)
        check_replaceable(out_dir, "cache")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CacheExistsError(
            f"cache folder {out_dir} already exists and is not empty: choose another folder, or replace it "
            f"(overwrite=True; --overwrite on the command line)"
        )


_check_out_dir = check_out_dir


def _check_kinds(pairs: Sequence[PreferencePair], media_format: MediaFormat, family: str) -> None:
    wanted = "image" if media_format.frames is None else "video"
    for number, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            kind = media_kind(getattr(pair, side))
            if kind != wanted:
                raise InputError(f"{pair.where or f'pair {number}'}: {side} is {kind} but {family} takes {wanted}s")


def _swap_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    _check_out_dir(out_dir, overwrite)  # again: another run may have finished meanwhile
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            # Keep the old cache until the new one is in place, so a crash here loses neither.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "cache")
        else:
            out_dir.rmdir()
    os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class _EncodeSettings:
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


def _encode_all(pairs: PairList, spec: MediaEncoder, writer: _ShardWriter, settings: _EncodeSettings,
                size: tuple[int, int] | None = None) -> None:
    """Encode ``pairs`` into ``writer``, media loaded at ``size`` (height, width; None: the spec's format)."""
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


def _encode_batch(spec: MediaEncoder, batch: list[PreferencePair], pixels: list[Tensor], writer: _ShardWriter,
                  with_gaps: bool = False, latent_std: bool = False) -> None:
    tensors = {}
    for name, std_name, media in zip(LATENT_KEYS, STD_KEYS, pixels, strict=True):
        if latent_std:
            mean, std = spec.encode_media_moments(media)  # type: ignore[attr-defined]
            tensors[name] = _checked(mean, len(batch), "encode_media_moments")
            tensors[std_name] = _checked(std, len(batch), "encode_media_moments")
            if tensors[std_name].shape != tensors[name].shape:
                raise InputError(f"encode_media_moments returned a std of shape {tuple(std.shape)} for a mean "
                                 f"of shape {tuple(mean.shape)}")
        else:
            tensors[name] = _checked(spec.encode_media(media), len(batch), "encode_media")
    for key, value in _encode_prompts(spec, [pair.prompt for pair in batch]).items():
        tensors[COND_PREFIX + key] = value
    if with_gaps:
        tensors[GAP_KEY] = torch.tensor([pair_gap(pair) for pair in batch], dtype=torch.float64)
    _check_encoded_finite(tensors, batch)
    writer.add(tensors, len(batch))


def _encode_prompts(spec: MediaEncoder, prompts: list[str]) -> dict[str, Tensor]:
    unique = list(dict.fromkeys(prompts))
    conditions = spec.encode_prompts(unique)
    if not isinstance(conditions, Mapping) or not conditions:
        raise InputError(f"encode_prompts must return a non-empty dict of tensors, got {type(conditions).__name__}")
    index = torch.tensor([unique.index(prompt) for prompt in prompts])
    expanded = {}
    for key, value in conditions.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"encode_prompts returned a non-string key {key!r}")
        value = _checked(value, len(unique), f"encode_prompts[{key!r}]")
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


def _checked(value: Any, batch: int, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise InputError(f"{what} must return a tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[0] != batch:
        raise InputError(f"{what} returned shape {tuple(value.shape)}, expected a leading batch dimension of {batch}")
    return value.detach().to("cpu").contiguous()


class _ShardWriter:
    """Buffers encoded batches and writes them out ``shard_size`` pairs per file.

    With buckets, ``start_bucket`` ends the current shard (a shard holds one bucket, so one shape per
    tensor) and records the finished bucket's tensor shapes in ``bucket_tensors``.
    """

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder = folder
        self.shard_size = shard_size
        self.pending: dict[str, list[Tensor]] = {}
        self.pending_count = 0
        self.shards: list[dict[str, Any]] = []
        self.tensor_info: dict[str, dict[str, Any]] = {}
        self.bucket: int | None = None
        self.bucket_tensors: dict[int, dict[str, dict[str, Any]]] = {}

    def start_bucket(self, bucket: int) -> None:
        self.flush(final=True)
        self.bucket, self.tensor_info = bucket, {}

    def add(self, tensors: dict[str, Tensor], count: int) -> None:
        if not self.tensor_info:
            self.tensor_info = {
                name: {"shape": list(value.shape[1:]), "dtype": _dtype_name(value.dtype)} for name, value in tensors.items()
            }
        elif set(tensors) != set(self.tensor_info):
            raise InputError(f"the spec returned tensors {sorted(tensors)} after {sorted(self.tensor_info)} for earlier batches")
        for name, value in tensors.items():
            info = self.tensor_info[name]
            if list(value.shape[1:]) != info["shape"] or _dtype_name(value.dtype) != info["dtype"]:
                raise InputError(
                    f"{name}: the spec returned per-pair shape {list(value.shape[1:])} {_dtype_name(value.dtype)} "
                    f"after {info['shape']} {info['dtype']} for earlier batches (all pairs must match)"
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
        self.shards.append({"file": name, "num_pairs": count, "bytes": path.stat().st_size, "sha256": _sha256(path)})
        if self.bucket is not None:
            self.shards[-1]["bucket"] = self.bucket
            self.bucket_tensors[self.bucket] = self.tensor_info


# --------------------------------------------------------------------------------------------- reading


def read_manifest(cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of a cache folder; checks that every shard exists with its recorded size.

    Raises CacheError, with one line saying what is wrong, for a missing folder or manifest, bad
    JSON, another format version, missing fields, or a missing or truncated shard.
    """
    folder = Path(cache_dir)
    if not folder.is_dir():
        raise CacheError(f"cache folder not found: {folder} (run `sdpo precompute` first)")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(f"{folder} has no {MANIFEST_NAME}, so it is not a finished cache: {_REBUILD}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheError(f"{path} is not valid JSON ({error}): {_REBUILD}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not an sdpo pair-cache manifest: {_REBUILD}")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise CacheError(
            f"{folder} is a version {manifest.get('version')!r} cache, this sdpo reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: {_REBUILD}"
        )
    _check_fields(manifest, path)
    total = 0
    for shard in manifest["shards"]:
        shard_path = folder / shard["file"]
        if not shard_path.is_file():
            raise CacheError(f"{folder}: shard {shard['file']} is missing: {_REBUILD}")
        size = shard_path.stat().st_size
        if size != shard["bytes"]:
            raise CacheError(
                f"{folder}: shard {shard['file']} has {size} bytes, the manifest says {shard['bytes']} (truncated?): {_REBUILD}"
            )
        total += shard["num_pairs"]
    if total != manifest["num_pairs"]:
        raise CacheError(f"{path}: shards hold {total} pairs but num_pairs is {manifest['num_pairs']}: {_REBUILD}")
    return manifest


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    def bad(what: str) -> CacheError:
        return CacheError(f"{path}: {what}: {_REBUILD}")

    if not isinstance(manifest.get("family"), str):
        raise bad("missing 'family'")
    if manifest.get("pretrained") is not None and not isinstance(manifest["pretrained"], str):
        raise bad("'pretrained' must be a string or null")
    media = manifest.get("media_format")
    if not isinstance(media, dict) or set(media) != {"channels", "height", "width", "frames"}:
        raise bad("missing or malformed 'media_format'")
    if not _is_count(manifest.get("num_pairs")) or manifest["num_pairs"] < 1:
        raise bad("'num_pairs' must be a positive integer")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("missing 'shards'")
    for shard in shards:
        if (
            not isinstance(shard, dict)
            or not isinstance(shard.get("file"), str)
            or Path(shard["file"]).name != shard["file"]  # a shard must live in the cache folder itself
            or not _is_count(shard.get("num_pairs"))
            or not _is_count(shard.get("bytes"))
            or not isinstance(shard.get("sha256"), str)
        ):
            raise bad(f"malformed shard entry {shard!r:.120}")
    tensors = manifest.get("tensors")
    _check_tensors(tensors, bad)
    if manifest["version"] >= 2:
        _check_buckets(manifest, bad)
    if not any(name.startswith(COND_PREFIX) for name in tensors):
        raise bad("no conditioning tensors ('cond.*') listed")
    if manifest.get("latent_std", False) not in (True, False):
        raise bad("'latent_std' must be true or false")
    if manifest.get("latent_std") and any(
        tensors.get(std, {}).get("shape") != tensors[mean]["shape"] for mean, std in zip(LATENT_KEYS, STD_KEYS, strict=True)
    ):
        raise bad("'latent_std' is true but the std tensors are missing or shaped unlike the latents")
    if not isinstance(manifest.get("extra", {}), dict):
        raise bad("'extra' must be an object")
    if not isinstance(manifest.get("skipped", []), list) or not isinstance(manifest.get("skipped_counts", {}), dict):
        raise bad("'skipped' must be a list and 'skipped_counts' an object")


def _check_tensors(tensors: Any, bad: Callable[[str], CacheError], where: str = "") -> None:
    if not isinstance(tensors, dict) or any(key not in tensors for key in LATENT_KEYS):
        raise bad(f"missing {where}'tensors' entries for latents_chosen / latents_rejected")
    for name, info in tensors.items():
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("shape"), list)
            or not all(_is_count(d) for d in info["shape"])
            or not isinstance(info.get("dtype"), str)
        ):
            raise bad(f"malformed {where}tensor entry {name!r}")


def _check_buckets(manifest: dict[str, Any], bad: Callable[[str], CacheError]) -> None:
    """A version 2 manifest: its ``buckets`` list, and a ``bucket`` in range on every shard."""
    buckets = manifest.get("buckets")
    if not isinstance(buckets, list) or not buckets:
        raise bad("a version 2 cache must list its 'buckets'")
    counts = [0] * len(buckets)
    for shard in manifest["shards"]:
        index = shard.get("bucket")
        if not _is_count(index) or index >= len(buckets):
            raise bad(f"shard {shard['file']} has no valid 'bucket' index")
        counts[index] += shard["num_pairs"]
    names = {name: info["dtype"] for name, info in manifest["tensors"].items()}
    for index, bucket in enumerate(buckets):
        if not isinstance(bucket, dict) or not all(_is_count(bucket.get(k)) for k in ("height", "width", "num_pairs")):
            raise bad(f"malformed bucket entry {bucket!r:.120}")
        if bucket["num_pairs"] != counts[index]:
            raise bad(f"bucket {index} lists {bucket['num_pairs']} pairs, its shards hold {counts[index]}")
        if counts[index]:
            _check_tensors(bucket.get("tensors"), bad, f"bucket {index} ")
            if {name: info["dtype"] for name, info in bucket["tensors"].items()} != names:
                raise bad(f"bucket {index} lists other tensors than 'tensors'")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


VERIFIED_NAME = ".verified.json"
"""Beside the manifest: the shards already verified, so later runs need not hash them again."""


def verify_cache(
    cache_dir: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None, *, remember: bool = True
) -> int:
    """Check every shard's sha256 against the manifest and that its tensors are finite; raises CacheError.

    Hashing reads the whole cache, so a shard that passed is remembered (``remember``) by its size,
    modification time, change time and inode, in ``.verified.json`` in the cache folder, or under the
    user cache folder when the cache is read-only; a shard whose file has not changed since is not
    read again. Returns how many shards were hashed now.
    """
    folder = Path(cache_dir)
    manifest = read_manifest(folder) if manifest is None else manifest
    # One process hashes while the others (every rank of a multi-GPU run opens the cache) wait for its record.
    with _verify_lock(folder) if remember else contextlib.nullcontext():
        known = _read_verified(folder) if remember else {}
        passed: dict[str, dict[str, Any]] = {}
        hashed = 0
        for shard in manifest["shards"]:
            path = folder / shard["file"]
            stamp = _file_stamp(path, shard["sha256"])
            if known.get(shard["file"]) != stamp:
                _verify_shard(folder, shard)
                hashed += 1
            passed[shard["file"]] = stamp
        if remember and hashed:
            _write_verified(folder, passed)
    return hashed


def _verify_shard(folder: Path, shard: Mapping[str, Any]) -> None:
    path = folder / shard["file"]
    if path.stat().st_size != shard["bytes"]:
        raise CacheError(f"{folder}: shard {shard['file']} has {path.stat().st_size} bytes, the manifest says "
                         f"{shard['bytes']} (truncated?): {_REBUILD}")  # fmt: skip
    if _sha256(path) != shard["sha256"]:
        raise CacheError(f"{folder}: shard {shard['file']} does not match its checksum (corrupt): {_REBUILD}")
    _check_finite(path, shard["file"], folder)


@contextlib.contextmanager
def _verify_lock(folder: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent processes each hash, which is only slower
        yield
        return
    handle = None
    for record in _verified_paths(folder):
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            handle = open(record.with_name(record.name + ".lock"), "a+b")  # noqa: SIM115 - held across the yield
            break
        except OSError:
            continue
    if handle is None:
        yield
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing releases the lock


def _file_stamp(path: Path, sha256: str) -> dict[str, Any]:
    # ctime and inode as well as mtime: a rewrite that restores the modification time still shows.
    info = path.stat()
    return {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns,
            "inode": info.st_ino, "sha256": sha256}  # fmt: skip


def _check_finite(path: Path, name: str, folder: Path) -> None:
    """Refuse a shard holding a NaN or an infinity (an encoder fault the checksum cannot see)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            tensor = handle.get_slice(key)
            rows = tensor.get_shape()[0] if tensor.get_shape() else 0
            for start in range(0, max(rows, 1), 64):  # 64 rows at a time keeps memory small for video latents
                part = tensor[start : start + 64] if rows else handle.get_tensor(key)
                if part.is_floating_point() and not bool(torch.isfinite(part).all()):
                    raise CacheError(f"{folder}: shard {name} holds non-finite values in {key}: {_REBUILD}")
    except CacheError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise CacheError(f"{folder}: shard {name} is not a readable safetensors file ({error}): {_REBUILD}") from None


def _verified_paths(folder: Path) -> list[Path]:
    """Where the verified record may live: in the cache folder, else under the user cache folder."""
    resolved = folder.resolve()
    user = Path(os.environ.get("SDPO_CACHE_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdpo")
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:20]
    return [resolved / VERIFIED_NAME, user / "verified" / f"{digest}.json"]


def _read_verified(folder: Path) -> dict[str, Any]:
    for path in _verified_paths(folder):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # absent, unreadable or torn: hashing again is always safe
        if isinstance(record, dict) and isinstance(record.get("shards"), dict):
            return record["shards"]
    return {}


def _write_verified(folder: Path, shards: dict[str, dict[str, Any]]) -> None:
    data = (json.dumps({"shards": shards}, indent=1) + "\n").encode()
    for path in _verified_paths(folder):
        try:
            write_atomic(path, data)
            return
        except OSError:
            continue  # a read-only cache folder: try the user cache folder; failing both only costs a re-hash


def check_cache_matches(
    manifest: Mapping[str, Any],
    family: str,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    media_format: MediaFormat | None = None,
) -> None:
    """Raise CacheError when a cache was made for another model family, model or resolution.

    ``pretrained`` is compared when both it and the manifest's are given (the same string, or paths
    to the same folder); ``media_format`` when given.
    """
    made_for = manifest.get("family")
    if made_for != family:
        raise CacheError(
            f"the cache was made for model family {made_for!r}, this run uses {family!r}: "
            f"rerun `sdpo precompute` for this model (into another folder, or delete the old one)"
        )
    cached = manifest.get("pretrained")
    if pretrained is not None and cached is not None and not _same_model(str(cached), os.fspath(pretrained)):
        raise CacheError(
            f"the cache was made with model {cached!r}, this run uses {os.fspath(pretrained)!r}: "
            f"rerun `sdpo precompute` for this model (into another folder, or delete the old one)"
        )
    if media_format is not None and manifest.get("media_format") != asdict(media_format):
        raise CacheError(
            f"the cache holds media at {manifest.get('media_format')}, this run needs {asdict(media_format)}: "
            f"rerun `sdpo precompute` for this model (into another folder, or delete the old one)"
        )


def _same_model(first: str, second: str) -> bool:
    """Whether two ``pretrained`` values name one model: equal, one folder, or a hub id and its cached snapshot."""
    if first.rstrip("/") == second.rstrip("/"):
        return True
    if os.path.exists(first) and os.path.exists(second):
        return os.path.samefile(first, second)
    first_id, second_id = _hub_id_of(first), _hub_id_of(second)
    return first_id is not None and first_id == second_id


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_id_of(name: str) -> str | None:
    """The hub id ``name`` stands for: itself when it is one, the repo of a hub-cache snapshot folder
    (``.../models--org--name/snapshots/<revision>``), or None for any other folder."""
    path = Path(name)
    if not path.exists():
        return name.rstrip("/").casefold() if _HUB_ID.match(name.rstrip("/")) else None
    parts = Path(os.path.abspath(path)).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        # The hub forbids "--" inside names, so the folder name splits back into org and name.
        return parts[-3].removeprefix("models--").replace("--", "/").casefold()
    return None


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
    """

    def __init__(self, cache_dir: str | os.PathLike[str], *, verify: bool = True, max_open_shards: int = 2) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest: dict[str, Any] = read_manifest(self.cache_dir)
        if verify:
            verify_cache(self.cache_dir, self.manifest)
        self.max_open_shards = max(1, max_open_shards)
        self.cond_keys: list[str] = [n[len(COND_PREFIX) :] for n in self.manifest["tensors"] if n.startswith(COND_PREFIX)]
        self.has_gaps: bool = GAP_KEY in self.manifest["tensors"]
        self.has_latent_std: bool = bool(self.manifest.get("latent_std", False))
        """Whether the cache stores the posterior std of every latent (older caches and toy worlds: no)."""
        self._ends: list[int] = []
        end = 0
        for shard in self.manifest["shards"]:
            end += shard["num_pairs"]
            self._ends.append(end)
        self._open: OrderedDict[int, Any] = OrderedDict()
        listed = self.manifest.get("buckets") if self.manifest["version"] >= 2 else None
        self._bucketed = listed is not None
        self.buckets: list[tuple[int, int]] = (
            format_buckets(self.media_format) if listed is None else [(b["height"], b["width"]) for b in listed])
        """The (height, width) pixel size of each bucket (a cache without buckets: its media format's)."""

    def bucket_ids(self) -> Tensor:
        """Each pair's bucket (an index into ``buckets``) in cache order, (N,) int64."""
        counts = [shard["num_pairs"] for shard in self.manifest["shards"]]
        ids = [shard["bucket"] if self._bucketed else 0 for shard in self.manifest["shards"]]
        return torch.repeat_interleave(torch.tensor(ids, dtype=torch.long), torch.tensor(counts, dtype=torch.long))

    @property
    def family(self) -> str:
        """The model family the cache was made for."""
        return self.manifest["family"]

    @property
    def media_format(self) -> MediaFormat:
        """The media format the pairs were loaded at."""
        return MediaFormat(**self.manifest["media_format"])

    def __len__(self) -> int:
        return self.manifest["num_pairs"]

    def __getitem__(self, index: int) -> Pair:
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError(f"pair {index} out of range for a cache of {length}")
        shard = bisect_right(self._ends, index)
        local = index - (self._ends[shard - 1] if shard else 0)
        handle = self._shard(shard)
        try:
            chosen, rejected = (handle.get_slice(name)[local] for name in LATENT_KEYS)
            item = Pair(chosen, rejected, {key: handle.get_slice(COND_PREFIX + key)[local] for key in self.cond_keys},
                        handle.get_slice(GAP_KEY)[local] if self.has_gaps else None)
            if self.has_latent_std:
                item.chosen_std, item.rejected_std = (handle.get_slice(name)[local] for name in STD_KEYS)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
            raise CacheError(f"{self._shard_path(shard)}: cannot read pair {local} ({error}): {_REBUILD}") from None
        return item

    def gaps(self) -> Tensor | None:
        """Every pair's score gap in cache order, (N,) float64, or None for a cache that stores none."""
        if not self.has_gaps:
            return None
        parts = []
        for shard in range(len(self._ends)):
            try:
                parts.append(self._shard(shard).get_tensor(GAP_KEY))
            except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
                raise CacheError(f"{self._shard_path(shard)}: cannot read {GAP_KEY} ({error}): {_REBUILD}") from None
        return torch.cat(parts).double()

    def _shard_path(self, shard: int) -> Path:
        return self.cache_dir / self.manifest["shards"][shard]["file"]

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
            raise CacheError(f"{path} is not a readable safetensors file ({error}): {_REBUILD}") from None
        self._check_shard(handle, shard, path)
        self._open[shard] = handle
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return handle

    def _check_shard(self, handle: Any, shard: int, path: Path) -> None:
        expected = self.manifest["tensors"]
        if self._bucketed:
            expected = self.manifest["buckets"][self.manifest["shards"][shard]["bucket"]]["tensors"]
        names = set(handle.keys())
        if names != set(expected):
            raise CacheError(f"{path} holds tensors {sorted(names)}, the manifest lists {sorted(expected)}: {_REBUILD}")
        count = self.manifest["shards"][shard]["num_pairs"]
        for name, info in expected.items():
            tensor = handle.get_slice(name)
            shape = list(tensor.get_shape())
            if shape != [count, *info["shape"]]:
                raise CacheError(f"{path}: {name} has shape {shape}, expected {[count, *info['shape']]}: {_REBUILD}")
            dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype())
            if dtype is not None and dtype != info["dtype"]:
                raise CacheError(f"{path}: {name} is {dtype}, the manifest says {info['dtype']}: {_REBUILD}")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # memory maps do not survive pickling; workers reopen them
        return state


def collate_pairs(items: Sequence[Pair]) -> PairBatch:
    """Stack CachedPairs items into a PairBatch (a DataLoader ``collate_fn``): ``PairBatch.collate``."""
    return PairBatch.collate(items)


# --------------------------------------------------------------------------------------------- helpers


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pretrained_of(spec: Any) -> str | None:
    value = getattr(spec, "pretrained", None)
    return None if value is None else os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _sdpo_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdpo")
    except PackageNotFoundError:
        return None
