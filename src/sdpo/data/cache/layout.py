"""The cache's fixed names and its one error type, shared by the writer, the manifest, the verifier and the reader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from sdpo.errors import InputError

CACHE_FORMAT = "sdpo-pair-cache"
"""The ``format`` field of every cache manifest."""
CACHE_VERSION = 2
"""The newest layout (2: aspect-ratio buckets), bumped whenever the layout changes. A cache without
buckets is still written as version 1, which older sdpo releases read too; a bucketed one is version 2,
so an sdpo that cannot group batches by bucket refuses it instead of failing on its shapes."""
READABLE_VERSIONS = (1, 2)
"""The cache versions this sdpo reads; a cache of any other must be rebuilt."""
MANIFEST_NAME = "manifest.json"
VERIFIED_NAME = ".verified.json"
"""Beside the manifest: the shards already verified, so later runs need not hash them again."""
LATENT_KEYS = ("latents_chosen", "latents_rejected")
STD_KEYS = ("latents_chosen_std", "latents_rejected_std")
"""The posterior stds of LATENT_KEYS, in a cache whose manifest says ``latent_std: true``."""
SAMPLE_LATENT_KEY = "latents"
"""A samples cache's latents, one sample per row (manifest ``kind: "samples"``)."""
LABEL_KEY = "desirable"
"""A samples cache's per-row label, bool: desirable (True) or undesirable (False)."""
SCORE_KEY = "score"
"""A samples cache's per-row score, float64 (optional: only when every sample had one)."""
CACHE_KINDS = ("pairs", "samples")
"""What a cache's rows are: preference pairs (the default, no ``kind`` in the manifest) or labelled samples."""
COND_PREFIX = "cond."
GAP_KEY = "gap"
"""The per-pair score gap in a shard (optional: only when every pair of the cache had one)."""
MAX_RECORDED_SKIPS = 10_000
"""At most this many skipped pairs are listed in a manifest (``skipped_counts`` counts them all)."""

REBUILD = "delete the folder and rerun `sdpo precompute`"
"""The end of every CacheError about a damaged cache: what the user does about it."""
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
"""safetensors' dtype codes as the manifest names them."""


class CacheError(InputError):
    """A cache folder that is missing, damaged, or made for another model; the message says which.

    A user mistake (an ``InputError``, so a ValueError), printed by the command line as one line."""


class CacheExistsError(CacheError, FileExistsError):
    """The output folder of precompute already holds something."""


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as the manifest writes it (``float32``, ``bfloat16``, ...)."""
    return str(dtype).removeprefix("torch.")


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read a megabyte at a time (shards can be many gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
