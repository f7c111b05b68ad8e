"""Which pairs each process sees: one seeded permutation per epoch, cut into global batches (grouped by
bucket for a bucketed cache)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sdpo.errors import InputError
from sdpo.seeding import epoch_seed
from sdpo.train.config import TrainConfig
from sdpo.train.log import warn

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["GlobalBatchOrder", "batch_order"]


class GlobalBatchOrder:
    """Which pairs each process sees: one seeded permutation per epoch, cut into global batches.

    Process r takes rows [r*B, (r+1)*B) of each global batch, so the union over processes is the
    batch a single process with B x world pairs would see.

    ``buckets`` (N,) (a bucketed cache's ``bucket_ids()``; None: one bucket) keeps every global batch
    within one bucket: the epoch's permutation is split by bucket (each bucket's pairs in permutation
    order), each bucket's list is cut into global batches, and the batches run in the order of their
    first pair's place in the permutation, so buckets interleave in proportion to their size. With one
    bucket that is exactly the plain permutation cut in order. A bucket's ragged tail (fewer than a
    global batch; other pairs each epoch) waits for a later epoch, as the single order's tail does. A
    bucket with fewer pairs than one global batch is padded to one by repeating its pairs, so it still
    trains each epoch: padding rather than a smaller batch keeps B pairs on every process and micro-step,
    so the loss is a mean over the same count everywhere and the process count changes nothing.
    """

    def __init__(self, num_pairs: int, per_process: int, world: int, rank: int, seed: int,
                 buckets: Tensor | None = None) -> None:
        if num_pairs < per_process * world:
            raise InputError(
                f"the cache holds {num_pairs} pairs, fewer than one global batch "
                f"({per_process} x {world} processes)"
            )
        if buckets is not None and buckets.shape != (num_pairs,):
            raise InputError(f"buckets must give one bucket per pair ({num_pairs}), got shape {tuple(buckets.shape)}")
        self.num_pairs, self.per_process, self.world, self.rank, self.seed = num_pairs, per_process, world, rank, seed
        self.global_batch = per_process * world
        self.buckets = None if buckets is None else buckets.long()
        counts = [num_pairs] if self.buckets is None else torch.bincount(self.buckets).tolist()
        # The ragged tail of each bucket is dropped; a bucket smaller than one batch is padded to one.
        self.batches_per_epoch = sum(max(1, count // self.global_batch) for count in counts if count)
        self.padded = [index for index, count in enumerate(counts) if 0 < count < self.global_batch]
        """Buckets holding fewer pairs than one global batch (their batch repeats pairs)."""
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_step: int) -> tuple[Tensor, Tensor]:
        """(dataset indices of this process's pairs, their positions in the global batch)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._epoch, self._order = epoch, self._by_bucket(torch.randperm(self.num_pairs, generator=generator))
        start = position * self.global_batch + self.rank * self.per_process
        rows = torch.arange(start, start + self.per_process)
        return self._order[rows], rows - position * self.global_batch

    def _by_bucket(self, permutation: Tensor) -> Tensor:
        """The epoch's global batches laid end to end, each within one bucket (see the class docstring)."""
        if self.buckets is None:
            return permutation
        size, batches = self.global_batch, []
        of_each = self.buckets[permutation]
        for bucket in range(int(of_each.max()) + 1):
            places = (of_each == bucket).nonzero()[:, 0]  # ascending: the bucket's pairs in permutation order
            members = permutation[places]
            if 0 < len(members) < size:
                batches.append((int(places[0]), members.repeat(-(-size // len(members)))[:size]))
            for first in range(0, len(members) - size + 1, size):
                batches.append((int(places[first]), members[first : first + size]))
        batches.sort(key=lambda batch: batch[0])
        return torch.cat([members for _, members in batches])


def batch_order(dataset: Any, config: TrainConfig, accelerator: Accelerator) -> GlobalBatchOrder:
    """The run's batch order, grouped by bucket when the dataset has buckets (a bucketed CachedPairs)."""
    ids = dataset.bucket_ids() if callable(getattr(dataset, "bucket_ids", None)) else None
    order = GlobalBatchOrder(len(dataset), config.train_batch_size, accelerator.num_processes,
                             accelerator.process_index, config.seed, buckets=ids)
    if order.padded and accelerator.is_main_process:
        sizes = getattr(dataset, "buckets", None)
        named = ", ".join(f"{sizes[i][0]}x{sizes[i][1]}" if sizes else str(i) for i in order.padded)
        warn(f"bucket(s) {named} hold fewer pairs than one global batch ({order.global_batch}): each "
             f"epoch their batch repeats some of their pairs", stacklevel=4)
    return order
