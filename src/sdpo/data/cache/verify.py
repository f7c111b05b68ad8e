"""Checking a cache's shards: sha256 against the manifest, finite tensors, and a record of shards that passed.

Hashing reads the whole cache, so a shard that passed is remembered in ``.verified.json`` (in the cache
folder, or under the user cache folder when the cache is read-only) and not read again until its file changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from sdpo.data.cache.layout import REBUILD, VERIFIED_NAME, CacheError, file_sha256
from sdpo.data.cache.manifest import Manifest, ShardEntry, as_manifest, read_manifest
from sdpo.files import write_atomic


def verify_cache(
    cache_dir: str | os.PathLike[str], manifest: Manifest | Mapping[str, Any] | None = None, *,
    remember: bool = True,
) -> int:
    """Check every shard's sha256 against the manifest and that its tensors are finite; raises CacheError.

    Hashing reads the whole cache, so a shard that passed is remembered (``remember``) by its size,
    modification time, change time and inode, in ``.verified.json`` in the cache folder, or under the
    user cache folder when the cache is read-only; a shard whose file has not changed since is not
    read again. Returns how many shards were hashed now.
    """
    folder = Path(cache_dir)
    layout = as_manifest(read_manifest(folder) if manifest is None else manifest)
    # One process hashes while the others (every rank of a multi-GPU run opens the cache) wait for its record.
    with _verify_lock(folder) if remember else contextlib.nullcontext():
        known = _read_verified(folder) if remember else {}
        passed: dict[str, dict[str, Any]] = {}
        hashed = 0
        for shard in layout.shards:
            path = folder / shard.file
            stamp = _file_stamp(path, shard.sha256)
            if known.get(shard.file) != stamp:
                _verify_shard(folder, shard)
                hashed += 1
            passed[shard.file] = stamp
        if remember and hashed:
            _write_verified(folder, passed)
    return hashed


def _verify_shard(folder: Path, shard: ShardEntry) -> None:
    path = folder / shard.file
    if path.stat().st_size != shard.bytes:
        raise CacheError(f"{folder}: shard {shard.file} has {path.stat().st_size} bytes, the manifest says "
                         f"{shard.bytes} (truncated?): {REBUILD}")  # fmt: skip
    if file_sha256(path) != shard.sha256:
        raise CacheError(f"{folder}: shard {shard.file} does not match its checksum (corrupt): {REBUILD}")
    _check_finite(path, shard.file, folder)


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
                    raise CacheError(f"{folder}: shard {name} holds non-finite values in {key}: {REBUILD}")
    except CacheError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise CacheError(f"{folder}: shard {name} is not a readable safetensors file ({error}): {REBUILD}") from None


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
