"""A LightningDataModule mixing several datasets, each row tagged with its task (``data=multi``).

Every task is an ordinary data config (``conf/data/<task>.yaml``) read by its own ``TextToTextDataModule``; this
module pools their splits. Training batches are drawn from the pooled pairs (tasks mixed in proportion to their
training sizes); every batch carries ``prefixes``, the task of each row, which the multi-task method reads as the
prefix of that row. Validation and test inputs keep their task, so that each task is scored with its own metrics
(``tasks[task].metric_suite``, and WebNLG's seen/unseen categories).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import lightning as L
from torch.utils.data import DataLoader

from prefix_lightning.data.collate import EncodedPair, EncodedPrompt, TextToTextCollator
from prefix_lightning.data.datamodule import TextToTextDataModule, stage_to_prepare
from prefix_lightning.data.loaders import evaluation_loader, training_loader


@dataclass(frozen=True)
class Tagged:
    """One encoded pair or prompt and the task it belongs to."""

    task: str
    item: EncodedPair | EncodedPrompt


def _batch(collate: Any, items: Sequence[Tagged]) -> dict[str, Any]:
    return {**collate([tagged.item for tagged in items]), "prefixes": [tagged.task for tagged in items]}


class MultiTaskDataModule(L.LightningDataModule):
    """The pooled splits of ``tasks`` (task name -> that task's ``TextToTextDataModule`` arguments, as its data
    config gives them).

    ``batch_size``, ``eval_batch_size``, ``num_workers``, ``shuffle_seed`` and ``group_by_length`` (see
    ``TextToTextDataModule``) are this module's: batches mix tasks. The tokenizer, prompt format, token budgets,
    ``data_dir`` and ``tested`` are passed on to every task, and so are ``train_size``, ``subset_seed``,
    ``val_size``, ``test_size`` and ``metric_suite`` where they are set (None: each task keeps its own). Validation
    and test inputs get unique ``group_id``s over all tasks (task by task, in the order of ``tasks``).
    """

    def __init__(
        self,
        tasks: Mapping[str, Mapping[str, Any]],
        tokenizer: Any | None,
        separator: str,
        target_end: str,
        is_encoder_decoder: bool = False,
        max_source_tokens: int = 256,
        max_target_tokens: int = 128,
        batch_size: int = 10,
        eval_batch_size: int = 10,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        group_by_length: bool = False,
        data_dir: str | Path | None = None,
        train_size: int | None = None,
        subset_seed: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        metric_suite: str | None = None,
        tested: bool = True,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("data.tasks is empty: name the data configs to mix, e.g. [e2e_devsplit,webnlg]")
        shared = dict(
            tokenizer=tokenizer,
            separator=separator,
            target_end=target_end,
            is_encoder_decoder=is_encoder_decoder,
            max_source_tokens=max_source_tokens,
            max_target_tokens=max_target_tokens,
            tested=tested,
        )
        given: dict[str, Any] = dict(
            train_size=train_size, subset_seed=subset_seed, val_size=val_size, test_size=test_size
        )
        given |= dict(metric_suite=metric_suite, data_dir=str(data_dir) if data_dir is not None else None)
        shared |= {key: value for key, value in given.items() if value is not None}
        self.tasks: dict[str, TextToTextDataModule] = {
            task: TextToTextDataModule(**{**dict(fields), **shared}) for task, fields in tasks.items()
        }
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.shuffle_seed, self.group_by_length = num_workers, shuffle_seed, group_by_length
        self._train: list[Tagged] = []
        self._val_loss: list[Tagged] = []
        self._val_generation: list[Tagged] = []
        self._test_generation: list[Tagged] = []

    @property
    def collator(self) -> TextToTextCollator:
        """The first task's: every task's collator is configured alike."""
        return next(iter(self.tasks.values())).collator

    def encode_with(self, tokenizer: Any, is_encoder_decoder: bool, max_source_tokens: int) -> None:
        """Every task tokenizes for the model (see ``TextToTextDataModule.encode_with``)."""
        for module in self.tasks.values():
            module.encode_with(tokenizer, is_encoder_decoder, max_source_tokens)

    def prepare_data(self, stage: str | None = None) -> None:
        """Every task downloads what ``stage`` reads (see ``TextToTextDataModule.prepare_data``); the tasks have
        no trainer of their own to ask."""
        stage = stage_to_prepare(self, stage)
        for module in self.tasks.values():
            module.prepare_data(stage)

    def read(self, stage: str | None = None) -> None:
        """Every task reads and checks its splits of ``stage``, before the model loads (see
        ``TextToTextDataModule.read``)."""
        for module in self.tasks.values():
            module.read(stage)

    def setup(self, stage: str | None = None) -> None:
        for module in self.tasks.values():
            module.setup(stage)
        if stage in (None, "fit", "validate"):
            self._train = self._pooled("_train")
            self._val_loss = self._pooled("_val_loss")
            self._val_generation = self._renumbered(self._pooled("_val_generation"))
        if stage in (None, "test"):
            self._test_generation = self._renumbered(self._pooled("_test_generation"))

    def _pooled(self, split: str) -> list[Tagged]:
        return [Tagged(task, item) for task, module in self.tasks.items() for item in getattr(module, split)]

    @staticmethod
    def _renumbered(prompts: list[Tagged]) -> list[Tagged]:
        """Group ids unique over all tasks (each task counts its own from 0), as gathering across ranks needs."""
        # Only prompts (validation and test inputs) are renumbered.
        return [
            Tagged(tagged.task, replace(cast(EncodedPrompt, tagged.item), group_id=index))
            for index, tagged in enumerate(prompts)
        ]

    def train_dataloader(self) -> DataLoader:
        lengths = [cast(EncodedPair, tagged.item).length for tagged in self._train] if self.group_by_length else None
        collate = partial(_batch, self.collator.train_batch)
        return training_loader(
            self._train, lengths, self.shuffle_seed, self.batch_size, self.trainer, collate, self.num_workers
        )

    def val_dataloader(self) -> list[DataLoader]:
        collate = partial(_batch, self.collator.train_batch)
        loss_loader = evaluation_loader(self._val_loss, self.eval_batch_size, collate, self.num_workers)
        return [loss_loader, self._generation_loader(self._val_generation)]

    def test_dataloader(self) -> DataLoader:
        return self._generation_loader(self._test_generation)

    def _generation_loader(self, prompts: list[Tagged]) -> DataLoader:
        collate = partial(_batch, self.collator.generation_batch)
        return evaluation_loader(prompts, self.eval_batch_size, collate, self.num_workers)
