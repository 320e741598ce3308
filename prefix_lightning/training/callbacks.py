"""Callbacks: exporting the prefix at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from prefix_lightning.training.module import PrefixTuningModule

log = logging.getLogger(__name__)


class PrefixExport(L.Callback):
    """Writes the final prefix with ``save_prefix`` (MLP dropped): the run's deliverable, a few hundred KB."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: PrefixTuningModule) -> None:
        if trainer.is_global_zero:
            pl_module.model.save_prefix(self.dirpath)
            size = sum(f.stat().st_size for f in self.dirpath.iterdir())
            log.info("exported the prefix to %s (%.1f KB)", self.dirpath, size / 1024)


class InterruptCheckpoint(L.Callback):
    """On Ctrl-C, saves ``last.ckpt`` before Lightning exits, so the run resumes where it stopped."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            path = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(path)
            log.warning("interrupted at step %d: saved %s; resume with ckpt_path=%s", trainer.global_step, path, path)
