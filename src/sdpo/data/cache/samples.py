"""A cache of labelled samples (Diffusion-KTO's data): one latent and one label per row, never a pair.

It is the pair cache's format with ``kind: "samples"`` in the manifest and other per-row tensors:
``latents`` (N, ...), ``desirable`` (N,) bool, ``score`` (N,) float64 when every sample had one, and the
``cond.<key>`` tensors; ``num_pairs`` and each shard's ``num_pairs`` count rows. Shards, checksums,
verification, the model check and the write-then-rename are the pair cache's own. A samples cache has
no aspect-ratio buckets and no posterior std (the posterior mean is stored). `CachedPairs` refuses it
and :class:`CachedSamples` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdpo.data.batch import Sample, SampleBatch
from sdpo.data.cache.encode import MediaEncoder, ShardWriter, checked_rows, encode_prompt_rows
from sdpo.data.cache.layout import (
    CACHE_FORMAT,
    COND_PREFIX,
    LABEL_KEY,
    MANIFEST_NAME,
    REBUILD,
    SAMPLE_LATENT_KEY,
    SCORE_KEY,
    CacheError,
)
from sdpo.data.cache.manifest import Manifest
from sdpo.data.cache.read import CachedPairs
from sdpo.data.cache.write import check_out_dir, pretrained_of, sdpo_version, staged_folder, swap_into_place
from sdpo.data.decode import load_media
from sdpo.data.pairs import media_kind
from sdpo.data.samples import LabelledSample
from sdpo.errors import InputError
from sdpo.files import write_atomic


def precompute_samples(
    samples: Sequence[LabelledSample],
    spec: MediaEncoder,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
    pad_frames: bool = False,
    extra_manifest: dict[str, Any] | None = None,
) -> Path:
    """Encode every labelled sample once through ``spec`` and write a samples cache to ``out_dir``.

    Media are loaded at ``spec.media_format`` and encoded ``batch_size`` at a time; a medium that does not
    suit the model (an image for a video model, ...) or does not load is an InputError before anything
    is in place. An existing non-empty ``out_dir`` is an error unless ``overwrite`` (a cache only)."""
    if not samples:
        raise InputError("no samples to precompute")
    if batch_size < 1 or shard_size < 1:
        raise InputError(f"batch_size and shard_size must be at least 1, got {batch_size} and {shard_size}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    wanted = "image" if spec.media_format.frames is None else "video"
    for number, sample in enumerate(samples):
        if media_kind(sample.media) != wanted:
            raise InputError(f"sample {number} ({sample.media}) is not a{'n' if wanted == 'image' else ''} {wanted}: "
                             f"{spec.family} takes {wanted}s")
    with_scores = all(sample.score is not None for sample in samples)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(out_dir) as staging:
        writer = ShardWriter(staging, shard_size)
        _encode(samples, spec, writer, batch_size, progress, pad_frames, with_scores)
        writer.flush(final=True)
        manifest = Manifest(
            family=spec.family, pretrained=pretrained_of(spec), media_format=spec.media_format,
            num_pairs=sum(shard.num_pairs for shard in writer.shards), shards=writer.shards,
            tensors=writer.tensor_info, extra=dict(extra_manifest or {}), kind="samples", format=CACHE_FORMAT,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), sdpo_version=sdpo_version())
        write_atomic(staging / MANIFEST_NAME, manifest.dumps().encode())
        swap_into_place(staging, out_dir, overwrite)
    return out_dir


def _encode(samples: Sequence[LabelledSample], spec: MediaEncoder, writer: ShardWriter, batch_size: int,
            progress: bool, pad_frames: bool, with_scores: bool) -> None:
    from tqdm.auto import tqdm

    batches = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    with torch.no_grad(), tqdm(total=len(batches), desc="precompute samples", unit="batch",
                               disable=not progress) as bar:
        for batch in batches:
            try:
                pixels = torch.stack([load_media(s.media, spec.media_format, pad_frames=pad_frames) for s in batch])
            except (OSError, ValueError) as error:
                raise InputError(f"cannot load a sample of {[str(s.media) for s in batch][:3]}: {error}") from None
            tensors = {SAMPLE_LATENT_KEY: checked_rows(spec.encode_media(pixels), len(batch), "encode_media")}
            tensors[LABEL_KEY] = torch.tensor([s.desirable for s in batch], dtype=torch.bool)
            if with_scores:
                tensors[SCORE_KEY] = torch.tensor([s.score for s in batch], dtype=torch.float64)
            for key, value in encode_prompt_rows(spec, [s.prompt for s in batch]).items():
                tensors[COND_PREFIX + key] = value
            for name, value in tensors.items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise InputError(f"the encoder returned non-finite values in {name}: try --dtype fp32 or bf16")
            writer.add(tensors, len(batch))
            bar.update(1)


class CachedSamples(CachedPairs):
    """A samples cache as a Dataset of ``Sample`` (latents, label, conditions, score), one per row.

    Everything but the rows is ``CachedPairs``' (lazy memory-mapped shards, verification, the manifest)."""

    kind = "samples"
    row_name = "labelled samples"
    """What one row is, in the trainer's announcement."""

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        shard, local = self.locate(index)
        handle = self._shard(shard)
        try:
            return Sample(handle.get_slice(SAMPLE_LATENT_KEY)[local], handle.get_slice(LABEL_KEY)[local],
                          {key: handle.get_slice(COND_PREFIX + key)[local] for key in self.cond_keys},
                          handle.get_slice(SCORE_KEY)[local] if SCORE_KEY in self.layout.tensors else None)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
            raise CacheError(f"{self._shard_path(shard)}: cannot read sample {local} ({error}): {REBUILD}") from None

    def gaps(self) -> Tensor | None:
        """None: samples have no score gaps (``pair_weighting`` needs pairs)."""
        return None

    def labels(self) -> Tensor:
        """Every row's label in cache order, (N,) bool."""
        return torch.cat([self._shard(shard).get_tensor(LABEL_KEY) for shard in range(len(self.layout.shards))])


def collate_samples(items: Sequence[Sample]) -> SampleBatch:
    """Stack CachedSamples items into a SampleBatch: ``SampleBatch.collate``."""
    return SampleBatch.collate(items)
