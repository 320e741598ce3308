"""Generation samples in the dashboards: the first generations of every validation and of the test."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import lightning as L

from prefix_lightning.training.dashboards import log_generation_samples
from prefix_lightning.training.module import outputs_name


class GenerationSamples(L.Callback):
    """Shows the first ``count`` generations of every validation and of the test in the dashboards (a W&B table,
    TensorBoard text), read from the ``<split>_generations.jsonl`` files that the module has just written."""

    def __init__(self, dirpath: str, count: int = 10) -> None:
        self.dirpath = Path(dirpath)
        self.count = count

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, "test")

    def _log(self, trainer: L.Trainer, split: str) -> None:
        path = self.dirpath / f"{outputs_name(split, trainer.global_step)}_generations.jsonl"
        if not trainer.is_global_zero or not trainer.loggers or not path.is_file():
            return
        with open(path, encoding="utf-8") as file:
            rows = [json.loads(line) for line in islice(file, self.count)]
        # The step Lightning logs metrics at (a validation's: one less than the steps taken; the test's: the steps).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        log_generation_samples(trainer.loggers, f"{split}/samples", rows, step)
