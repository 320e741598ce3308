"""Training order that depends only on (seed, epoch), split across ranks like one process's batches, and that a
resumed run can pick up mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """A fresh permutation per epoch, drawn from ``seed + epoch`` rather than from a running generator.

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed from a checkpoint sees exactly the
    order that the uninterrupted run would have seen; ``resume_at`` skips the examples that the interrupted
    run already trained on in its last epoch.

    With several ranks, each run of ``num_replicas * batch_size`` examples of the order is one global batch, and
    rank r takes the r-th ``batch_size`` of it: DDP's global batch k is the single-process batch k of
    ``num_replicas * batch_size`` examples. (A DistributedSampler, so that Lightning uses it as it is instead of
    wrapping it in its own, which would re-shuffle.) The last, short global batch is shared evenly, padded with
    examples from the start of the order as DistributedSampler pads.
    """

    def __init__(self, size: int, seed: int, batch_size: int = 1, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler's own __init__ wants a dataset and a process group; everything it sets is set here.
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.shuffle, self.drop_last = 0, True, False
        self.start: int | Callable[[], tuple[int, int] | None] = 0

    def resume_at(self, position: int | Callable[[], tuple[int, int] | None]) -> None:
        """Start the next pass at ``position`` of the epoch's order (later passes start at 0); a callable is asked
        as that pass starts, and gives the epoch and the position (None: this epoch, from its start)."""
        self.start = position

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        if callable(start):
            resumed = start()
            self.epoch, start = resumed if resumed is not None else (self.epoch, 0)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order = order[start:]
        order += order[: -len(order) % self.num_replicas]  # every rank the same number of examples
        width = self.num_replicas * self.batch_size
        mine = []
        for begin in range(0, len(order), width):
            chunk = order[begin : begin + width]
            share = len(chunk) // self.num_replicas
            mine += chunk[self.rank * share : (self.rank + 1) * share]
        return iter(mine)

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)


def training_sampler(size: int, seed: int, batch_size: int, trainer: Any | None) -> EpochShuffleSampler:
    """The training sampler for this rank; when Lightning is resuming mid-epoch, it starts after the global batches
    already trained.

    Asked as the first pass starts, with the epoch too: Lightning sets the epoch only after it has made the epoch's
    iterator, whose loader workers (``data.num_workers``) take their first indices as it is made. A checkpoint taken
    after the last batch of an epoch restores a complete epoch: Lightning goes on with the next one, from its
    beginning.
    """
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochShuffleSampler(size, seed, batch_size, replicas, rank)

    def resumed() -> tuple[int, int] | None:
        if trainer is None or not trainer.fit_loop.restarting:
            return None
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        position = done * batch_size * replicas if 0 < done < math.ceil(size / (batch_size * replicas)) else 0
        return trainer.fit_loop.epoch_progress.current.processed, position

    sampler.resume_at(resumed)
    return sampler
