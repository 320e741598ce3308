"""``checkpoints/last.ckpt``, the checkpoint a run resumes from, kept recent enough that a kill loses little, and
written when a scheduler stops the run (SIGTERM, SIGUSR1) or the user presses Ctrl-C (SIGINT).

Lightning's own SIGTERM handling only stops the loops (raising ``SIGTERMException``, a ``SystemExit`` with status 0)
and saves nothing; SIGUSR1 it handles only on SLURM with auto-requeue (it saves ``hpc_ckpt_<n>.ckpt`` and requeues
the job), and elsewhere SIGUSR1 kills the process outright.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from prefix_lightning.cli import StoppedBySignal
from prefix_lightning.numbers import is_number
from prefix_lightning.training.job import resumable_folder
from prefix_lightning.training.muted import muted

log = logging.getLogger(__name__)
SIGNAL_CONNECTOR_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"

LAST = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` after every validation, after every ``every_minutes`` of training (None: only at
    validations), and when SIGTERM, SIGUSR1 or Ctrl-C stops the run, so that even ``kill -9`` loses at most that
    interval. ``stopped_by`` then names the signal (see :class:`RunStopped`).

    SIGTERM, SIGUSR1 and a first Ctrl-C stop the run as Lightning stops it on SIGTERM (a second Ctrl-C interrupts at
    once, saving nothing: a checkpoint taken in the middle of a step resumes one batch off), handed to Lightning at a
    point from which it resumes exactly: at the end of the current training step (its last accumulated batch),
    after the validation in progress or due after that step (stopped in its middle, Lightning resumes without it),
    and after the first step of the next epoch when the current step ends one (Lightning resumes a run stopped at an
    epoch's end with a shortened next epoch). The checkpoint is written when Lightning stops. Where Lightning
    already handles SIGUSR1 (SLURM auto-requeue) it is left to Lightning.

    A Lightning ``Checkpoint``, so that it runs after the other callbacks of a validation (the best checkpoint, early
    stopping, the result record) and saves their updated state. The timed save happens as a training step's first
    batch starts, when the previous step is complete: a run resumed from it trains the next batch, as the
    uninterrupted run did.
    """

    def __init__(self, dirpath: str, every_minutes: float | None = 10.0) -> None:
        check_every_minutes(every_minutes)
        self.path = Path(dirpath) / LAST
        self.interval_s = None if every_minutes is None else 60.0 * every_minutes
        self._saved_at = time.monotonic()
        self._saved_step = -1
        self.stopped_by: str | None = None
        self._pending: Callable[[], None] | None = None  # Lightning's stop, until a point to resume from
        self._lightning_stop: Callable[[], None] | None = None  # the same for a rank that got no signal

    def save(self, trainer: L.Trainer) -> None:
        """Every rank calls this (sharded strategies gather the state); checkpoints are written atomically."""
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state; unsaid, Lightning logs its default
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_at, self._saved_step = time.monotonic(), trainer.global_step
        self._listen(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._listen(trainer)
        self._hand_over(trainer)  # a signal that came after the last training step stops the test

    def _listen(self, trainer: L.Trainer) -> None:
        """Called right after Lightning installed its handlers (it restores the previous ones when the stage ends):
        note which signal arrived and keep Lightning's SIGTERM handling for the next point to resume from (during
        a test: at once); SIGUSR1 does the same where Lightning does not use it."""
        if threading.current_thread() is not threading.main_thread():
            return
        lightning_sigterm = signal.getsignal(signal.SIGTERM)
        self._lightning_stop = partial(lightning_sigterm, signal.SIGTERM, None) if callable(lightning_sigterm) else None

        def stop(signum: int, frame: Any) -> None:
            self.stopped_by = self.stopped_by or signal.Signals(signum).name
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                log.warning("Ctrl-C: the run stops (and saves) at the end of this step; press it again to stop at once")
            if callable(lightning_sigterm):
                self._pending = partial(lightning_sigterm, signal.SIGTERM, frame)
            if trainer.state.fn != TrainerFn.FITTING:
                self._hand_over()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)  # Lightning puts back the handler it found when the stage ends
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, stop)

    def _hand_over(self, trainer: L.Trainer | None = None) -> None:
        """Let Lightning stop the run (it does at the end of the current step or validation). Called with the
        ``trainer`` by every process at the same point, all stop where any one was signalled: a scheduler's signal
        reaches the processes at different steps, and one stopping alone pairs its checkpoint's collectives with
        the others' next step (they hang). The signal is taken before the processes agree: one that comes while
        a process waits for the others is kept for the next point (taken after, it was dropped unseen)."""
        pending, self._pending = self._pending, None
        stopping = pending is not None
        if trainer is not None and trainer.world_size > 1:
            stopping = trainer.strategy.reduce_boolean_decision(stopping, all=False)
        stop = pending or self._lightning_stop
        if stopping and stop is not None:
            # Lightning logs "Received SIGTERM" for every stop handed to it, a Ctrl-C's too: the run's own line says
            # which signal stopped it.
            with muted(SIGNAL_CONNECTOR_LOGGER, "Received SIGTERM"):
                stop()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Not an epoch's last step; a step that Lightning validates next is handed over by on_validation_end (once
        # handed over, Lightning would stop that validation after its first batch and resume without it). Not in
        # the middle of a gradient accumulation either: the checkpoint would lose the gradients accumulated so far.
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if step_done and batch_idx + 1 < trainer.num_training_batches and not _validation_follows(trainer):
            self._hand_over(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Only as a step's first batch starts: later ones would save without the gradients accumulated so far.
        due = (
            self.interval_s is not None
            and batch_idx % trainer.accumulate_grad_batches == 0
            and trainer.global_step > self._saved_step
            and time.monotonic() - self._saved_at >= self.interval_s
        )
        if trainer.world_size > 1:  # rank 0's clock decides, or the ranks would not save together
            due = trainer.strategy.broadcast(due)
        if due and self.interval_s is not None:
            self.save(trainer)
            log.info("saved %s at step %d (every %.4g minutes)", self.path, trainer.global_step, self.interval_s / 60)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint taken as a batch starts (the timed save) holds the loops as the finished step left them.
        Lightning has already counted the starting batch as fetched, not yet as started, and a resume restores the
        count across epochs as it is: the resumed run would count one batch too many, validating a step early and
        logging every step one too far on."""
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        for counts in (progress["total"], progress["current"]):
            if counts["ready"] == counts["started"] + 1:
                counts["ready"] -= 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.save(trainer)
        self._hand_over(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # a second Ctrl-C; Lightning exits with status 1 after this hook
            self.stopped_by = "SIGINT"
            log.warning(
                "stopped at once by a second Ctrl-C, in the middle of a step: nothing saved now; to go on from the "
                "last checkpoint, run: python run.py resume=%s",
                resumable_folder(trainer.default_root_dir),
            )
            return
        if isinstance(exception, WorkersStopped):  # this process waited for the workers that trained, and saved
            self.stopped_by = exception.signal_name
            return
        if not isinstance(exception, SIGTERMException):
            return
        self.stopped_by = self.stopped_by or "SIGTERM"
        if trainer.state.fn == TrainerFn.FITTING:
            if self._saved_step != trainer.global_step:  # else the validation of this very step has just saved it
                self.save(trainer)
            log.warning("stopped by %s at step %d: saved %s", self.stopped_by, trainer.global_step, self.path)


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the training step that has just ended: its own test, which it
    makes after the step's ``on_train_batch_end`` hooks (Lightning has no public form of it)."""
    fit_loop = trainer.fit_loop
    return fit_loop._data_fetcher is not None and fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)


class RunStopped(StoppedBySignal):
    """A run stopped by a signal, after saving what it had: one line with the command that goes on, and the exit
    status of a process killed by that signal (128 + its number), so that schedulers and sweeps do not take it for
    a success."""

    def __init__(self, signal_name: str, checkpoint: Path | None, run_dir: str | Path, in_sweep: bool = False) -> None:
        self.exit_code = 128 + signal.Signals[signal_name].value
        saved = f"saved {checkpoint}" if checkpoint is not None and checkpoint.is_file() else "no checkpoint saved"
        again = "run the same sweep command again, or " if in_sweep else ""
        super().__init__(f"stopped by {signal_name} ({saved}); to go on, {again}run: python run.py resume={run_dir}")

    @classmethod
    def of(cls, checkpoint: LastCheckpoint | None, run_dir: str | Path, in_sweep: bool = False) -> RunStopped:
        """What ``checkpoint`` (None: the run keeps no last checkpoint) saw: the signal and the file it wrote."""
        if checkpoint is None:
            return cls("SIGTERM", None, run_dir, in_sweep)
        return cls(checkpoint.stopped_by or "SIGTERM", checkpoint.path, run_dir, in_sweep)


class WorkersStopped(SIGTERMException):
    """Raised in the main process of spawned workers (``trainer=ddp_cpu``) that a signal stopped: they saved what
    they had (it holds none of the training's state), and ``signal_name`` stopped them."""

    def __init__(self, signal_name: str) -> None:
        super().__init__()
        self.signal_name = signal_name


def check_every_minutes(every_minutes: Any) -> None:
    """Refuse an interval of timed saves that is not a number of minutes (``training/checks.py`` asks before anything
    loads)."""
    if every_minutes is not None and not (is_number(every_minutes) and every_minutes >= 0):
        raise ValueError(
            f"callbacks.last_checkpoint.every_minutes={every_minutes!r} is not valid: use minutes >= 0, or null"
        )
