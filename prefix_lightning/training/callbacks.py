"""Callbacks: exporting what the method trained (best or last), early stopping, the run's result record, generation
samples."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from prefix_lightning.files.checkpoints import check_checkpoint
from prefix_lightning.methods import IGNORE_INDEX
from prefix_lightning.methods.model_card import ModelCard, write_cards
from prefix_lightning.numbers import is_int
from prefix_lightning.training.dashboards import log_generation_samples, log_result
from prefix_lightning.training.job import current_job
from prefix_lightning.training.last_checkpoint import LastCheckpoint
from prefix_lightning.training.module import MethodModule, outputs_name
from prefix_lightning.training.record import write_record
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
        with trainable_whole_on_rank_zero(trainer, pl_module):
            if trainer.is_global_zero:
                pl_module.model.save(self.dirpath)
                self._write_card(trainer, pl_module, {})
                size = sum(f.stat().st_size for f in self.dirpath.rglob("*") if f.is_file()) / 1024
                log.info("exported %s weights (step %d) to %s (%.1f KB)", self.source, self.step, self.dirpath, size)

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
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)


def kept_best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best validation checkpoint this run kept, if any. Lightning also restores the best path of a checkpoint
    written in another folder (a run started with ``ckpt_path=`` from another run's): that one is not this run's."""
    callback = best_checkpoint_callback(trainer)
    if callback is None or not callback.best_model_path or callback.dirpath is None:
        return None
    best = Path(callback.best_model_path)
    return str(best) if best.parent.resolve() == Path(callback.dirpath).resolve() else None


def early_stopping(monitor: str, mode: str, patience: int | None, min_delta: float = 0.0) -> EarlyStopping | None:
    """Lightning's early stopping on ``monitor``, counting ``patience`` validations without improvement; None (no
    callback) when ``patience`` is None."""
    if patience is None:
        return None
    if not is_int(patience) or patience < 1:
        raise ValueError(f"callbacks.early_stopping.patience={patience!r} is not valid: use a positive integer or null")
    return EarlyStopping(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta)


class ResultRecord(L.Callback):
    """Writes the run's result record (``result.json``, see ``prefix_lightning.training.record``) when the run ends:
    after the test when ``after_test``, else after fitting.

    It tracks what only the training loop sees: the best and last value of ``monitor``, the tokens and seconds of
    training steps (throughput) and the wall time. These travel in checkpoints, so a resumed run reports the whole
    run. The token count is that of all ranks, summed at every step: a checkpoint holds rank 0's state alone, and
    it is what every rank of a resumed run, or of a test stage in new processes (``trainer=ddp_cpu``), starts from.
    """

    def __init__(
        self,
        dirpath: str,
        monitor: str,
        mode: str = "max",
        after_test: bool = True,
        seed: int | None = None,
        subset_seed: int | None = None,
        train_size: int | None = None,
        prefix_length: int | None = None,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.after_test = after_test
        self.settings = {
            "seed": seed,
            "subset_seed": subset_seed,
            "train_size": train_size,
            "prefix_length": prefix_length,
        }
        job = current_job()  # read here, in the main process: spawned DDP workers have no Hydra runtime
        self.job = {
            "run": job.name if job else self.dirpath.name,
            "overrides": job.overrides if job else {},
            "choices": job.choices if job else {},
        }
        self.progress: dict[str, Any] = {
            "best_val": None,
            "best_val_step": None,
            "last_val": None,
            "train_tokens": 0,
            "train_time_s": 0.0,
            "earlier_wall_time_s": 0.0,  # of the attempts before a resume
        }
        self._started = time.time()
        self._step_started = 0.0
        self._encoder_decoder = False

    def _wall_time(self) -> float:
        return self.progress["earlier_wall_time_s"] + time.time() - self._started

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.progress,
            "earlier_wall_time_s": self._wall_time(),
            "dirpath": str(self.dirpath),
            "attempt_started": self._started,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint of another run (``ckpt_path=``) brings its steps, tokens and time, not its validations:
        the best and last values are this run's own. This attempt's own state, brought back from the processes
        that ran its fit (``trainer=ddp_cpu``), holds its time so far: the clock starts again from there."""
        state = dict(state_dict)
        if state.pop("attempt_started", None) == self._started:
            self._started = time.time()
        written_in = state.pop("dirpath", None)
        if written_in is not None and Path(written_in).resolve() != self.dirpath.resolve():
            state.update(best_val=None, best_val_step=None, last_val=None)
            log.info("started from a checkpoint of the run in %s: its validations are not this run's", written_in)
        self.progress.update(state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, MethodModule)  # the callbacks of run.py's runs
        self._encoder_decoder = bool(pl_module.model.lm.config.is_encoder_decoder)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Every real token the model reads; an encoder-decoder also reads the target. int() waits for the device,
        # so the time below is that of the finished step.
        tokens = batch["attention_mask"].sum()
        if self._encoder_decoder:
            tokens = tokens + (batch["labels"] != IGNORE_INDEX).sum()
        if trainer.world_size > 1:  # every rank trained on its own share of the batch
            tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
        self.progress["train_tokens"] += int(tokens)
        self.progress["train_time_s"] += time.perf_counter() - self._step_started

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or metric is None:
            return
        value = float(metric)
        best = self.progress["best_val"]
        if best is None or (value > best if self.mode == "max" else value < best):
            self.progress.update(best_val=value, best_val_step=trainer.global_step)
        self.progress["last_val"] = value

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.after_test:
            self._write(trainer, pl_module, test={})

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.after_test:
            self._write(trainer, pl_module, logged_test_scores(trainer))

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, test: dict[str, float]) -> None:
        with trainable_whole_on_rank_zero(trainer, pl_module):  # outside, a sharded rank counts its own shard
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if not trainer.is_global_zero:
            return
        tokens = self.progress["train_tokens"]
        train_time = self.progress["train_time_s"]
        # Lightning sets this attribute without declaring it.
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
        export = next((c for c in callbacks if isinstance(c, MethodExport)), None)
        record = {
            **self.job,
            **self.settings,
            "trainable_params": trainable,
            "optimized_metric": self.monitor,
            **{name: self.progress[name] for name in ("best_val", "best_val_step", "last_val")},
            "test": test,
            "train_steps": trainer.global_step,
            "train_tokens": tokens,
            "train_time_s": round(train_time, 3),
            "tokens_per_s": round(tokens / train_time, 1) if train_time > 0 else None,
            "wall_time_s": round(self._wall_time(), 1),
            "checkpoint": self._relative(last.path if last else None),
            "best_checkpoint": self._relative(kept_best_checkpoint(trainer)),
            "prefix": self._relative(export.dirpath if export else None),
            "export": export.source if export else None,
            "exported_step": export.step if export else None,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        path = write_record(self.dirpath, record)
        log_result(trainer.loggers, record)
        log.info("result record: %s", path)

    def _relative(self, path: str | Path | None) -> str | None:
        """Paths relative to the run folder: the record stays valid when a sweep folder is moved."""
        return os.path.relpath(path, self.dirpath) if path and Path(path).exists() else None


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
