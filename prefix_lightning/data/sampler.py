"""Training order that depends only on (seed, epoch), and that a resumed run can pick up mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch, drawn from ``seed + epoch`` rather than from a running generator.

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed from a checkpoint sees exactly the
    order that the uninterrupted run would have seen; ``resume_at`` skips the examples that the interrupted
    run already trained on in its last epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, position: int) -> None:
        """Start the next pass at ``position`` of the epoch's order (later passes start at 0)."""
        self.start = position

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.size


def training_sampler(size: int, seed: int, batch_size: int, trainer: Any | None) -> EpochShuffleSampler:
    """The training sampler; when Lightning is resuming mid-epoch, it starts after the batches already trained.

    A checkpoint taken after the last batch of an epoch restores a complete epoch: Lightning goes on with the
    next one, which must start from its beginning.
    """
    sampler = EpochShuffleSampler(size, seed)
    if trainer is not None and trainer.fit_loop.restarting:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if 0 < done < math.ceil(size / batch_size) and trainer.world_size == 1:
            sampler.resume_at(done * batch_size)
    return sampler
