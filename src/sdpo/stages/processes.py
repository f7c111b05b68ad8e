"""The processes of a stage launched by torchrun: who is who, waiting for each other, and work that only
process 0 does while the others wait (``sdpo online``'s scoring, pairs, cache and evaluation, whose files
every process would otherwise write at once)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from sdpo.errors import SdpoError

T = TypeVar("T")


class OtherProcessError(SdpoError):
    """Work that process 0 did for every process failed there (its own error is in its output)."""


def process_rank() -> tuple[int, int]:
    """(rank, world size), starting torch.distributed (gloo on CPU) when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for in one)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def on_main_process(what: str, work: Callable[[], T]) -> T:
    """``work()`` on process 0 alone, its result handed to every process (it must pickle); the others wait
    for it, and fail with one line if it failed.

    The outcome is broadcast rather than waited for at a barrier, so a failure on process 0 ends the
    others too instead of leaving them waiting for a process that has gone.
    """
    rank, world = process_rank()
    if world == 1:
        return work()
    import torch.distributed as dist

    outcome: list[Any] = [None, None]  # (process 0's error, its result)
    try:
        if rank == 0:
            outcome[1] = work()
    except BaseException as error:
        outcome = [f"{type(error).__name__}: {error}", None]
        dist.broadcast_object_list(outcome, src=0)
        raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise OtherProcessError(f"{what} failed on process 0 ({outcome[0]})")
    return outcome[1]
