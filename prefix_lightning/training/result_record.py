"""The callback that writes the run's result record (``result.json``; its fields and writer are in
``prefix_lightning.training.record``) when the run ends, from what only the training loop sees."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L

from prefix_lightning.methods import IGNORE_INDEX
from prefix_lightning.training.callback_lookup import find_callback
from prefix_lightning.training.dashboards import log_result
from prefix_lightning.training.job import current_job
from prefix_lightning.training.last_checkpoint import LastCheckpoint
from prefix_lightning.training.method_export import MethodExport, kept_best_checkpoint, logged_test_scores
from prefix_lightning.training.module import MethodModule
from prefix_lightning.training.record import write_record
from prefix_lightning.training.sharded import trainable_whole_on_rank_zero

log = logging.getLogger(__name__)


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
        last = find_callback(callbacks, LastCheckpoint)
        export = find_callback(callbacks, MethodExport)
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
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = write_record(self.dirpath, record)
        log_result(trainer.loggers, record)
        log.info("result record: %s", path)

    def _relative(self, path: str | Path | None) -> str | None:
        """Paths relative to the run folder: the record stays valid when a sweep folder is moved."""
        return os.path.relpath(path, self.dirpath) if path and Path(path).exists() else None
