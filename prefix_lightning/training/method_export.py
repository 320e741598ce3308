"""The method's export when training ends: what it trained (the best validation checkpoint's weights or the last
step's), written with the model's ``save`` into the run's export folder with its model card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from prefix_lightning.files.checkpoints import check_checkpoint
from prefix_lightning.methods.model_card import ModelCard, write_cards
from prefix_lightning.training.callback_lookup import find_callback
from prefix_lightning.training.module import MethodModule
from prefix_lightning.training.sharded import trainable_whole_on_rank_zero

log = logging.getLogger(__name__)


class MethodExport(L.Callback):
    """Writes what the method trained with the model's ``save``: the run's deliverable (for prefix-tuning the
    prefix with its MLP dropped, a few hundred KB; for full fine-tuning the whole model), with a README.md model
    card (see ``ModelCard``; ``card`` holds the run's settings it states), rewritten with the test's scores.

    ``weights="best"`` first loads the best validation checkpoint (``trainer.checkpoint_callback``'s) into the model,
    which the test then runs on as well; without one (no validation ran) the last step's weights are exported, with
    a warning. ``source`` and ``step`` say what was exported.
    """

    def __init__(self, dirpath: str, weights: str = "best", card: dict[str, Any] | None = None) -> None:
        if weights not in EXPORTED_WEIGHTS:
            raise ValueError(f"export={weights!r} is not valid: use one of {', '.join(EXPORTED_WEIGHTS)}")
        self.dirpath = Path(dirpath)
        self.weights = weights
        self.card = dict(card or {})
        self.source: str | None = None
        self.step: int | None = None
        self._validation: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        """What was exported (set as training ends): for a test run in other processes (``trainer=ddp_cpu``)."""
        return {"source": self.source, "step": self.step, "validation": self._validation}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source, self.step, self._validation = state_dict["source"], state_dict["step"], state_dict["validation"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, MethodModule)  # the callbacks of run.py's runs
        self.source, self.step = "last", trainer.global_step
        if self.weights == "best":
            self._load_best(trainer, pl_module)
        callback = best_checkpoint_callback(trainer)
        if callback is not None and callback.monitor:
            value = (
                callback.best_model_score if self.source == "best" else trainer.callback_metrics.get(callback.monitor)
            )
            self._validation = {callback.monitor: float(value)} if value is not None else {}
        written = True
        with trainable_whole_on_rank_zero(trainer, pl_module):
            if trainer.is_global_zero:
                pl_module.model.save(self.dirpath)
                written = self.dirpath.is_dir() and any(self.dirpath.iterdir())
                if written:
                    self._write_card(trainer, pl_module, {})
                    size = sum(f.stat().st_size for f in self.dirpath.rglob("*") if f.is_file()) / 1024
                    log.info(
                        "exported %s weights (step %d) to %s (%.1f KB)", self.source, self.step, self.dirpath, size
                    )
        if not trainer.strategy.broadcast(written):  # every rank stops, not rank 0 alone before the test's collectives
            raise RuntimeError(
                f"{type(pl_module.model).__name__}.save({str(self.dirpath)!r}) wrote nothing there: a method's save "
                "writes what it trained into the folder it is given"
            )

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from a checkpoint of its last training step (interrupted in its final validation or in the
        test) skips training altogether, and Lightning calls no ``on_train_end``: the export, and the loading of the
        weights the test runs on, happen here instead."""
        if self.source is None and trainer.global_step > 0:
            self.on_train_end(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, MethodModule)  # the callbacks of run.py's runs
        with trainable_whole_on_rank_zero(trainer, pl_module):  # the card counts what trained, whole
            if trainer.is_global_zero and self.source is not None and self.dirpath.is_dir():
                self._write_card(trainer, pl_module, logged_test_scores(trainer))

    def _write_card(self, trainer: L.Trainer, pl_module: MethodModule, test: dict[str, float]) -> None:
        if not self.card:
            return
        card = ModelCard(
            **self.card,
            train_steps=trainer.global_step,
            exported=self.source,
            exported_step=self.step,
            metrics={**self._validation, **test},
            trainable_params=sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        )
        write_cards(card, self.dirpath, getattr(pl_module.model, "tasks", None))  # multi-task: a card per task

    def best_checkpoint(self, trainer: L.Trainer) -> str | None:
        """The checkpoint whose weights ``weights="best"`` exports: the best validation one, if one was kept."""
        return kept_best_checkpoint(trainer) if self.weights == "best" else None

    def _load_best(self, trainer: L.Trainer, pl_module: MethodModule) -> None:
        """Every rank loads the best checkpoint, as Lightning restores one (the strategy reads it)."""
        best = self.best_checkpoint(trainer)
        if best is None:
            callback = best_checkpoint_callback(trainer)
            monitor = callback.monitor if callback else None
            log.warning("export=best, but no validation checkpoint by %s was kept: exporting the last step's", monitor)
            return
        checkpoint = trainer.strategy.load_checkpoint(check_checkpoint(best))
        pl_module.on_load_checkpoint(checkpoint)  # non-strict loading below: the module checks the tensors first
        trainer.strategy.load_model_state_dict(checkpoint, strict=False)
        self.source, self.step = "best", int(checkpoint["global_step"])


EXPORTED_WEIGHTS = ("best", "last")


def logged_test_scores(trainer: L.Trainer) -> dict[str, float]:
    return {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("test/")}


def best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The callback that keeps the best validation checkpoint (the first ModelCheckpoint)."""
    return find_callback(trainer.checkpoint_callbacks, ModelCheckpoint)


def kept_best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best validation checkpoint this run kept, if any. Lightning also restores the best path of a checkpoint
    written in another folder (a run started with ``ckpt_path=`` from another run's): that one is not this run's."""
    callback = best_checkpoint_callback(trainer)
    if callback is None or not callback.best_model_path or callback.dirpath is None:
        return None
    best = Path(callback.best_model_path)
    return str(best) if best.parent.resolve() == Path(callback.dirpath).resolve() else None
