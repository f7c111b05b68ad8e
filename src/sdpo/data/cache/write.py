"""Writing a cache: :func:`precompute` encodes every pair once and puts the finished folder in place.

A cache is written into a hidden sibling folder and renamed into place only once complete, so a
folder that exists is a finished cache; an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdpo.data.buckets import bucket_for, check_buckets
from sdpo.data.cache.encode import EncodeSettings, MediaEncoder, ShardWriter, encode_all, pair_gap
from sdpo.data.cache.layout import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST_NAME,
    MAX_RECORDED_SKIPS,
    CacheExistsError,
)
from sdpo.data.cache.manifest import BucketEntry, Manifest
from sdpo.data.checks import check_pairs
from sdpo.data.decode import media_size
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
from sdpo.files import fsync_dir, named_for, write_atomic
from sdpo.folders import check_replaceable
from sdpo.models.base import MediaFormat, PosteriorEncoder

logger = logging.getLogger(__name__)


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

    Media are loaded at ``spec.media_format`` (see :func:`sdpo.data.decode.load_media`; ``pad_frames``
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
    (:func:`sdpo.data.buckets.bucket_for`, ties to the earlier bucket); both members are loaded at that
    bucket's size, each resized to cover it (aspect ratio kept) and centre-cropped, so only the sliver
    by which an image's ratio differs from its bucket's is cut, not everything outside one centred
    square. Sides must be positive multiples of the model's spatial factor (VAE downsampling times
    the denoiser's patch size, when the spec tells it): a ValueError names the first bad bucket. The
    trainer then never mixes buckets in a batch. The manifest records ``buckets`` and each shard's
    ``bucket`` (see the module docstring); ``media_format`` stays the spec's (the model's own resolution).

    Before the first encode every pair's media are checked (:func:`sdpo.data.checks.check_pairs`;
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
    check_out_dir(out_dir, overwrite)
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
    with staged_folder(out_dir) as staging:
        writer = ShardWriter(staging, shard_size)
        # Every shard must hold the same tensors, so the gaps are stored only when no pair lacks one.
        with_gaps = all(pair_gap(pair) is not None for pair in pairs)
        with_std = latent_std and isinstance(spec, PosteriorEncoder)
        settings = EncodeSettings(batch_size, progress, pad_frames, num_workers, on_bad_pair, with_gaps, with_std)
        if buckets is None:
            encode_all(pairs, spec, writer, settings)
        else:
            for index, (bucket, group) in enumerate(zip(buckets, _group_by_bucket(pairs, buckets, settings),
                                                        strict=True)):
                writer.start_bucket(index)
                if group:
                    encode_all(group, spec, writer, settings, size=bucket)
        writer.flush(final=True)
        if not writer.shards:
            raise BadPairsError(pairs.problems, "no pair could be encoded")
        manifest = _manifest(spec, writer, pairs, extra, with_std, buckets)
        write_atomic(staging / MANIFEST_NAME, manifest.dumps().encode())
        swap_into_place(staging, out_dir, overwrite)
    return out_dir




def _manifest(spec: MediaEncoder, writer: ShardWriter, pairs: PairList, extra: dict[str, Any], with_std: bool,
              buckets: list[tuple[int, int]] | None) -> Manifest:
    manifest = Manifest(
        format=CACHE_FORMAT,
        version=1 if buckets is None else CACHE_VERSION,  # an unbucketed cache stays readable by older sdpo
        family=spec.family,
        pretrained=pretrained_of(spec),
        media_format=spec.media_format,
        num_pairs=sum(shard.num_pairs for shard in writer.shards),
        shards=writer.shards,
        tensors=writer.tensor_info,
        skipped=[problem.to_json() for problem in pairs.problems[:MAX_RECORDED_SKIPS]],
        skipped_counts=dict(sorted(pairs.skipped.items())),
        extra=extra,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sdpo_version=sdpo_version(),
        latent_std=with_std,
    )
    if buckets is not None:
        counts = [sum(s.num_pairs for s in writer.shards if s.bucket == i) for i in range(len(buckets))]
        manifest.buckets = [BucketEntry(height, width, count, writer.bucket_tensors.get(index, {}))
                            for index, ((height, width), count) in enumerate(zip(buckets, counts, strict=True))]
        manifest.tensors = next(b.tensors for b in manifest.buckets if b.num_pairs)
        kinds = {json.dumps({n: i.dtype for n, i in b.tensors.items()}, sort_keys=True)
                 for b in manifest.buckets if b.num_pairs}  # fmt: skip
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


def _group_by_bucket(pairs: PairList, buckets: list[tuple[int, int]], settings: EncodeSettings) -> list[PairList]:
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




def _check_kinds(pairs: Sequence[PreferencePair], media_format: MediaFormat, family: str) -> None:
    wanted = "image" if media_format.frames is None else "video"
    for number, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            kind = media_kind(getattr(pair, side))
            if kind != wanted:
                raise InputError(f"{pair.where or f'pair {number}'}: {side} is {kind} but {family} takes {wanted}s")


@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out_dir`` that a cache is written into before ``swap_into_place``;
    removed when the block fails, an OSError then named for ``out_dir`` (a full disk says where)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield staging
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise named_for(error, staging, out_dir) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename a finished ``staging`` folder to ``out_dir``; an old cache there goes only once the new one is in."""
    check_out_dir(out_dir, overwrite)  # again: another run may have finished meanwhile
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


def pretrained_of(spec: Any) -> str | None:
    """The spec's ``pretrained`` as the manifest records it (a string, or None)."""
    value = getattr(spec, "pretrained", None)
    return None if value is None else os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def sdpo_version() -> str | None:
    """The installed sdpo's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdpo")
    except PackageNotFoundError:
        return None
