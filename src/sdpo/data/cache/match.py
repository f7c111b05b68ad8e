"""Whether a cache suits a run: made for the same model family, model and resolution."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdpo.data.cache.layout import CacheError
from sdpo.data.cache.manifest import Manifest
from sdpo.models.base import MediaFormat


def check_cache_matches(
    manifest: Manifest | Mapping[str, Any],
    family: str,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    media_format: MediaFormat | None = None,
) -> None:
    """Raise CacheError when a cache was made for another model family, model or resolution.

    ``pretrained`` is compared when both it and the manifest's are given (the same string, or paths
    to the same folder); ``media_format`` when given.
    """
    if isinstance(manifest, Manifest):
        manifest = manifest.to_json()
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
