"""Training order that depends only on (seed, epoch), split across ranks like one process's batches, and that a
resumed run can pick up mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
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

    With ``lengths`` (each example's length), global batches hold examples of similar lengths
    (:func:`grouped_by_length`), still an order drawn from (seed, epoch) alone.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: Sequence[int] | None = None,
    ) -> None:
        # DistributedSampler's own __init__ wants a dataset and a process group; everything it sets is set here.
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        self.size, self.seed, self.batch_size, self.lengths = size, seed, batch_size, lengths
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
        width = self.num_replicas * self.batch_size
        if self.lengths is not None:
            order = grouped_by_length(order, self.lengths, width, generator)
        order += order[: -len(order) % self.num_replicas]  # every rank the same number of examples
        order = order[start:]  # after the padding, which a resumed pass pads as the whole one did
        mine = []
        for begin in range(0, len(order), width):
            chunk = order[begin : begin + width]
            share = len(chunk) // self.num_replicas
            mine += chunk[self.rank * share : (self.rank + 1) * share]
        return iter(mine)

    def __len__(self) -> int:
        return math.ceil(self.size / self.num_replicas)


# Global batches whose examples are sorted by length together (as transformers' Trainer groups by length).
LENGTH_WINDOW = 50


def grouped_by_length(order: list[int], lengths: Sequence[int], width: int, generator: torch.Generator) -> list[int]:
    """``order`` regrouped so that each run of ``width`` examples (a global batch) holds examples of similar lengths,
    which pads each batch less: the examples of each window of ``LENGTH_WINDOW`` global batches of ``order`` sorted
    by length, then the window's full batches in an order drawn from ``generator`` (the lengths do not fall
    steadily through an epoch). The last batch, which may be short, stays last, where the batches of ranks and
    loaders expect it.
    """
    grouped: list[int] = []
    for begin in range(0, len(order), LENGTH_WINDOW * width):
        window = sorted(order[begin : begin + LENGTH_WINDOW * width], key=lengths.__getitem__, reverse=True)
        batches = [window[i : i + width] for i in range(0, len(window), width)]
        short = batches.pop() if len(batches[-1]) < width else []
        for index in torch.randperm(len(batches), generator=generator).tolist():
            grouped += batches[index]
        grouped += short
    return grouped


def training_sampler(
    size: int, seed: int, batch_size: int, trainer: Any | None, lengths: Sequence[int] | None = None
) -> EpochShuffleSampler:
    """The training sampler for this rank (global batches of similar lengths where ``lengths`` are given); when
    Lightning is resuming mid-epoch, it starts after the global batches already trained.

    Asked as the first pass starts, with the epoch too: Lightning sets the epoch only after it has made the epoch's
    iterator, whose loader workers (``data.num_workers``) take their first indices as it is made. A checkpoint taken
    after the last batch of an epoch restores a complete epoch: Lightning goes on with the next one, from its
    beginning.
    """
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochShuffleSampler(size, seed, batch_size, replicas, rank, lengths)

    def resumed() -> tuple[int, int] | None:
        if trainer is None or not trainer.fit_loop.restarting:
            return None
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        position = done * batch_size * replicas if 0 < done < math.ceil(size / (batch_size * replicas)) else 0
        return trainer.fit_loop.epoch_progress.current.processed, position

    sampler.resume_at(resumed)
    return sampler
