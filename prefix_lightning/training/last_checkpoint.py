"""``checkpoints/last.ckpt``, the checkpoint a run resumes from, kept recent enough that a kill loses little."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

LAST = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` after every validation, after every ``every_minutes`` of training (None: only at
    validations), and when Ctrl-C stops the run, so that even ``kill -9`` loses at most that interval.

    A Lightning ``Checkpoint``, so that it runs after the other callbacks of a validation (the best checkpoint, early
    stopping, the result record) and saves their updated state. The timed save happens as a training batch starts,
    when the previous step is complete: a run resumed from it trains the next batch, as the uninterrupted run did.
    """

    def __init__(self, dirpath: str, every_minutes: float | None = 10.0) -> None:
        if every_minutes is not None and not every_minutes >= 0:
            raise ValueError(f"callbacks.last_checkpoint.every_minutes={every_minutes!r}: use minutes >= 0, or null")
        self.path = Path(dirpath) / LAST
        self.interval_s = None if every_minutes is None else 60.0 * every_minutes
        self._saved_at = time.monotonic()
        self._saved_step = -1

    def save(self, trainer: L.Trainer) -> None:
        """Every rank calls this (sharded strategies gather the state); checkpoints are written atomically."""
        trainer.save_checkpoint(self.path)
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        due = (
            self.interval_s is not None
            and trainer.global_step > self._saved_step
            and time.monotonic() - self._saved_at >= self.interval_s
        )
        if trainer.world_size > 1:  # rank 0's clock decides, or the ranks would not save together
            due = trainer.strategy.broadcast(due)
        if due and self.interval_s is not None:
            self.save(trainer)
            log.info("saved %s at step %d (every %.4g minutes)", self.path, trainer.global_step, self.interval_s / 60)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == TrainerFn.FITTING:
            self.save(trainer)
            log.warning(
                "interrupted at step %d: saved %s; resume with ckpt_path=%s", trainer.global_step, self.path, self.path
            )
