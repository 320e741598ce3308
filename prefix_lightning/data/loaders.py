"""The data modules' loaders: training in the sampler's order, evaluation in the data's own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader

from prefix_lightning.data.sampler import training_sampler


def training_loader(
    examples: list[Any],
    lengths: Sequence[int] | None,
    seed: int,
    batch_size: int,
    trainer: Any | None,
    collate_fn: Callable[[list[Any]], Any],
    num_workers: int,
) -> DataLoader:
    """A data module's training loader: this rank's share of the (seed, epoch) order, in global batches of similar
    ``lengths`` where given."""
    return DataLoader(
        examples,  # type: ignore[arg-type]  # a list is a map-style dataset; torch annotates Dataset
        batch_size=batch_size,
        sampler=training_sampler(len(examples), seed, batch_size, trainer, lengths),
        collate_fn=collate_fn,
        num_workers=num_workers,
    )


def evaluation_loader(
    items: list[Any], batch_size: int, collate_fn: Callable[[list[Any]], Any], num_workers: int
) -> DataLoader:
    """A validation or test loader: ``items`` in order (Lightning shards it over the ranks)."""
    return DataLoader(
        items,  # type: ignore[arg-type]  # a list is a map-style dataset; torch annotates Dataset
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
    )
