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
what made the cache and how to check it (see :func:`precompute` and :class:`Manifest`). A cache is written into a hidden
sibling folder and renamed into place only once complete, so a folder that exists is a finished
cache; an interrupted run leaves nothing behind.

A cache made with aspect-ratio ``buckets`` (version 2) groups its pairs by bucket: the pairs of bucket 0
come first (in the order given), then those of bucket 1, and so on, and a shard never holds two buckets,
so each shard's latents have one shape. The manifest lists ``buckets`` (``height``, ``width``,
``num_pairs`` and the bucket's ``tensors`` each) and each shard's ``bucket`` (an index into that list);
``tensors`` is then the first non-empty bucket's. A cache without buckets is written as version 1,
exactly as before, and reads as one bucket at its ``media_format``.

The parts: ``layout`` (names, the error type), ``manifest`` (the typed manifest and its validation),
``encode`` and ``write`` (precompute), ``verify`` (checksums), ``match`` (a cache against a model),
``read`` (CachedPairs), ``samples`` (a cache of labelled samples for Diffusion-KTO, ``kind: "samples"``).
"""

from sdpo.data.cache.encode import MediaEncoder, pair_gap
from sdpo.data.cache.layout import (
    CACHE_FORMAT,
    CACHE_VERSION,
    COND_PREFIX,
    GAP_KEY,
    LATENT_KEYS,
    MANIFEST_NAME,
    MAX_RECORDED_SKIPS,
    READABLE_VERSIONS,
    STD_KEYS,
    VERIFIED_NAME,
    CacheError,
    CacheExistsError,
    file_sha256,
)
from sdpo.data.cache.manifest import (
    BucketEntry,
    Manifest,
    ShardEntry,
    TensorInfo,
    load_manifest,
    read_manifest,
)
from sdpo.data.cache.match import check_cache_matches
from sdpo.data.cache.read import CachedPairs, collate_pairs
from sdpo.data.cache.samples import CachedSamples, collate_samples, precompute_samples
from sdpo.data.cache.verify import verify_cache
from sdpo.data.cache.write import check_out_dir, precompute, spatial_factor

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "COND_PREFIX",
    "GAP_KEY",
    "LATENT_KEYS",
    "MANIFEST_NAME",
    "MAX_RECORDED_SKIPS",
    "READABLE_VERSIONS",
    "STD_KEYS",
    "VERIFIED_NAME",
    "BucketEntry",
    "CacheError",
    "CacheExistsError",
    "CachedPairs",
    "CachedSamples",
    "Manifest",
    "MediaEncoder",
    "ShardEntry",
    "TensorInfo",
    "check_cache_matches",
    "check_out_dir",
    "collate_pairs",
    "collate_samples",
    "file_sha256",
    "load_manifest",
    "pair_gap",
    "precompute",
    "precompute_samples",
    "read_manifest",
    "spatial_factor",
    "verify_cache",
]
