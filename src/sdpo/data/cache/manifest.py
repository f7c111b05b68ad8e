"""The cache's ``manifest.json``: a typed :class:`Manifest` that reads and writes exactly its JSON, and its validation.

:func:`read_manifest` returns the validated JSON object itself (callers and older code index it like
a dict); :func:`load_manifest` returns it as a :class:`Manifest`. A manifest read and written back
through :class:`Manifest` gives the same JSON (keys this sdpo does not know are kept in ``other``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdpo.data.cache.layout import (
    CACHE_FORMAT,
    CACHE_KINDS,
    COND_PREFIX,
    LABEL_KEY,
    LATENT_KEYS,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    REBUILD,
    SAMPLE_LATENT_KEY,
    STD_KEYS,
    CacheError,
)
from sdpo.models.base import MediaFormat


@dataclass
class TensorInfo:
    """One tensor of every pair: its per-pair ``shape`` (without the leading pair dimension) and ``dtype`` name."""

    shape: list[int]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorInfo:
        return cls(list(data["shape"]), data["dtype"])


def tensors_to_json(tensors: Mapping[str, TensorInfo]) -> dict[str, dict[str, Any]]:
    """A name -> TensorInfo mapping as the manifest writes it."""
    return {name: info.to_json() for name, info in tensors.items()}


def tensors_from_json(data: Mapping[str, Any]) -> dict[str, TensorInfo]:
    """The manifest's name -> {shape, dtype} object as TensorInfo values, in its order."""
    return {name: TensorInfo.from_json(info) for name, info in data.items()}


@dataclass
class ShardEntry:
    """One shard file: its name, pair count, byte size, sha256 and (a bucketed cache) its bucket index."""

    file: str
    num_pairs: int
    bytes: int
    sha256: str
    bucket: int | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"file": self.file, "num_pairs": self.num_pairs, "bytes": self.bytes, "sha256": self.sha256}
        if self.bucket is not None:
            data["bucket"] = self.bucket
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardEntry:
        return cls(data["file"], data["num_pairs"], data["bytes"], data["sha256"], data.get("bucket"))


@dataclass
class BucketEntry:
    """One aspect-ratio bucket of a version 2 cache: its pixel size, pair count and per-pair tensors."""

    height: int
    width: int
    num_pairs: int
    tensors: dict[str, TensorInfo]

    def to_json(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "num_pairs": self.num_pairs,
                "tensors": tensors_to_json(self.tensors)}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BucketEntry:
        return cls(data["height"], data["width"], data["num_pairs"], tensors_from_json(data.get("tensors") or {}))


_KNOWN = ("format", "version", "family", "pretrained", "media_format", "num_pairs", "shards", "tensors", "skipped",
          "skipped_counts", "extra", "created", "sdpo_version", "latent_std", "buckets", "kind")  # fmt: skip


@dataclass
class Manifest:
    """What made a cache and how to check it (the fields of ``manifest.json``; see :func:`sdpo.data.precompute`).

    ``tensors`` is every pair's tensors (for a bucketed cache: the first non-empty bucket's);
    ``buckets`` is None for a version 1 cache, which reads as one bucket at ``media_format``.
    """

    family: str
    pretrained: str | None
    media_format: MediaFormat
    num_pairs: int
    shards: list[ShardEntry]
    tensors: dict[str, TensorInfo]
    version: int = 1
    skipped: list[dict[str, Any]] = field(default_factory=list)
    skipped_counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    sdpo_version: str | None = None
    latent_std: bool = False
    buckets: list[BucketEntry] | None = None
    format: str = CACHE_FORMAT
    kind: str = "pairs"
    """"pairs", or "samples" for a cache of labelled samples (one latent and a label per row, ``num_pairs``
    counting rows); written only for samples, so a pair cache's manifest is as before."""
    other: dict[str, Any] = field(default_factory=dict)
    """Fields this sdpo does not know, kept so that writing a read manifest back loses nothing."""

    @property
    def cond_keys(self) -> list[str]:
        """The conditioning keys of every pair (the tensor names after ``cond.``), in manifest order."""
        return [name[len(COND_PREFIX) :] for name in self.tensors if name.startswith(COND_PREFIX)]

    def tensors_of_shard(self, index: int) -> dict[str, TensorInfo]:
        """The tensors shard ``index`` holds (its bucket's, in a bucketed cache)."""
        bucket = self.shards[index].bucket
        if self.buckets is None or bucket is None:
            return self.tensors
        return self.buckets[bucket].tensors

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json``, keys in the order sdpo has always written them."""
        data: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "family": self.family,
            "pretrained": self.pretrained,
            "media_format": asdict(self.media_format),
            "num_pairs": self.num_pairs,
            "shards": [shard.to_json() for shard in self.shards],
            "tensors": tensors_to_json(self.tensors),
            "skipped": list(self.skipped),
            "skipped_counts": dict(self.skipped_counts),
            "extra": dict(self.extra),
            "created": self.created,
            "sdpo_version": self.sdpo_version,
            "latent_std": self.latent_std,
        }
        if self.buckets is not None:
            data["buckets"] = [bucket.to_json() for bucket in self.buckets]
        if self.kind != "pairs":
            data["kind"] = self.kind
        data.update(self.other)
        return data

    def dumps(self) -> str:
        """``manifest.json``'s text (two-space indent, a final newline)."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """A Manifest from a manifest's JSON object (one that :func:`read_manifest` validated)."""
        buckets = data.get("buckets") if data["version"] >= 2 else None
        return cls(
            family=data["family"],
            pretrained=data.get("pretrained"),
            media_format=MediaFormat(**data["media_format"]),
            num_pairs=data["num_pairs"],
            shards=[ShardEntry.from_json(shard) for shard in data["shards"]],
            tensors=tensors_from_json(data["tensors"]),
            version=data["version"],
            skipped=list(data.get("skipped", [])),
            skipped_counts=dict(data.get("skipped_counts", {})),
            extra=dict(data.get("extra", {})),
            created=data.get("created"),
            sdpo_version=data.get("sdpo_version"),
            latent_std=bool(data.get("latent_std", False)),
            buckets=None if buckets is None else [BucketEntry.from_json(bucket) for bucket in buckets],
            format=data["format"],
            kind=data.get("kind", "pairs"),
            other={key: value for key, value in data.items() if key not in _KNOWN},
        )


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
        raise CacheError(f"{folder} has no {MANIFEST_NAME}, so it is not a finished cache: {REBUILD}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheError(f"{path} is not valid JSON ({error}): {REBUILD}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not an sdpo pair-cache manifest: {REBUILD}")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise CacheError(
            f"{folder} is a version {manifest.get('version')!r} cache, this sdpo reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: {REBUILD}"
        )
    _check_fields(manifest, path)
    total = 0
    for shard in manifest["shards"]:
        shard_path = folder / shard["file"]
        if not shard_path.is_file():
            raise CacheError(f"{folder}: shard {shard['file']} is missing: {REBUILD}")
        size = shard_path.stat().st_size
        if size != shard["bytes"]:
            raise CacheError(
                f"{folder}: shard {shard['file']} has {size} bytes, the manifest says {shard['bytes']} (truncated?): {REBUILD}"
            )
        total += shard["num_pairs"]
    if total != manifest["num_pairs"]:
        raise CacheError(f"{path}: shards hold {total} pairs but num_pairs is {manifest['num_pairs']}: {REBUILD}")
    return manifest


def load_manifest(cache_dir: str | os.PathLike[str]) -> Manifest:
    """:func:`read_manifest` as a typed :class:`Manifest`."""
    return Manifest.from_json(read_manifest(cache_dir))


def as_manifest(manifest: Manifest | Mapping[str, Any]) -> Manifest:
    """``manifest`` as a Manifest, whether given as one or as its validated JSON object."""
    return manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest)


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    def bad(what: str) -> CacheError:
        return CacheError(f"{path}: {what}: {REBUILD}")

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
    if manifest.get("kind", "pairs") not in CACHE_KINDS:
        raise bad(f"'kind' must be one of {', '.join(CACHE_KINDS)}, got {manifest.get('kind')!r}")
    tensors: Any = manifest.get("tensors")
    _check_tensors(tensors, bad, required=_required_keys(manifest))
    if manifest["version"] >= 2:
        _check_buckets(manifest, bad)
    if not any(name.startswith(COND_PREFIX) for name in tensors):
        raise bad("no conditioning tensors ('cond.*') listed")
    if manifest.get("latent_std", False) not in (True, False):
        raise bad("'latent_std' must be true or false")
    if manifest.get("latent_std") and manifest.get("kind") == "samples":
        raise bad("a samples cache stores no latent std, but 'latent_std' is true")
    if manifest.get("latent_std") and any(
        tensors.get(std, {}).get("shape") != tensors[mean]["shape"] for mean, std in zip(LATENT_KEYS, STD_KEYS, strict=True)
    ):
        raise bad("'latent_std' is true but the std tensors are missing or shaped unlike the latents")
    if not isinstance(manifest.get("extra", {}), dict):
        raise bad("'extra' must be an object")
    if not isinstance(manifest.get("skipped", []), list) or not isinstance(manifest.get("skipped_counts", {}), dict):
        raise bad("'skipped' must be a list and 'skipped_counts' an object")


def _required_keys(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    return (SAMPLE_LATENT_KEY, LABEL_KEY) if manifest.get("kind") == "samples" else LATENT_KEYS


def _check_tensors(tensors: Any, bad: Callable[[str], CacheError], where: str = "",
                   required: tuple[str, ...] = LATENT_KEYS) -> None:
    if not isinstance(tensors, dict) or any(key not in tensors for key in required):
        raise bad(f"missing {where}'tensors' entries for {' / '.join(required)}")
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
            _check_tensors(bucket.get("tensors"), bad, f"bucket {index} ", _required_keys(manifest))
            if {name: info["dtype"] for name, info in bucket["tensors"].items()} != names:
                raise bad(f"bucket {index} lists other tensors than 'tensors'")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
