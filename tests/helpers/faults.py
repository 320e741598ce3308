"""Faults injected into real training runs by tests, as callbacks named on the command line."""

from __future__ import annotations

import os
import signal
import time

import lightning as L
import torch

from prefix_lightning.training.last_checkpoint import LastCheckpoint


def fault(callback: str, **options: object) -> list[str]:
    """The command-line overrides that add the fault ``callback`` of this module to a run, with its options."""
    return [f"+callbacks.{callback}._target_=tests.helpers.faults.{callback}"] + [
        f"+callbacks.{callback}.{key}={value}" for key, value in options.items()
    ]


class SignalAt(L.Callback):
    """Sends the signal ``name`` (SIGKILL, SIGINT, ...) to this very process once ``step`` steps are done; with
    ``rank``, only the process of that rank does."""

    def __init__(self, step: int, name: str, rank: int | None = None) -> None:
        self.step, self.signal, self.rank = step, getattr(signal, name), rank

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signal)


class SignalAtBatch(L.Callback):
    """Sends the signal ``name`` to this very process after the training batch ``batch`` of the first epoch (with
    gradient accumulation: possibly in the middle of a step)."""

    def __init__(self, batch: int, name: str) -> None:
        self.batch, self.signal = batch, getattr(signal, name)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch:
            os.kill(os.getpid(), self.signal)


class DivergeAt(L.Callback):
    """Makes the prefix infinite before step ``step``, as a diverging optimizer would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for parameter in pl_module.model.trainable_parameters():
                    parameter.fill_(float("inf"))


class SlowSteps(L.Callback):
    """Makes every training step last at least ``seconds`` (a sleep after it), so that time-based behaviour can be
    measured in steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


class PauseAfterBatch(L.Callback):
    """Sleeps ``seconds`` after the training batch ``batch`` of the first epoch, so that a timer falls due as the
    next batch starts (with gradient accumulation: possibly in the middle of a step)."""

    def __init__(self, batch: int, seconds: float) -> None:
        self.batch, self.seconds = batch, seconds

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch:
            time.sleep(self.seconds)


class SignalInValidation(L.Callback):
    """Sends the signal ``name`` to this process in the middle of the validation that follows step ``step`` (after
    its first validation batch)."""

    def __init__(self, step: int, name: str) -> None:
        self.step, self.signal = step, getattr(signal, name)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signal)
            self.step = -1  # once


class SignalInTest(L.Callback):
    """Sends the signal ``name`` to this process after the test's first batch, where this process trained (a
    resumed run whose training was over tests in peace)."""

    def __init__(self, name: str) -> None:
        self.signal, self.trained = getattr(signal, name), False

    def on_train_batch_end(self, *args: object) -> None:
        self.trained = True

    def on_test_batch_end(self, *args: object) -> None:
        if self.trained:
            os.kill(os.getpid(), self.signal)


class SignalMainAt(L.Callback):
    """Sends the signal ``name`` to the process that spawned this one (``trainer=ddp_cpu``'s main process, which
    waits for its workers) once ``step`` steps are done, from rank 0, and waits until the signal has reached this
    process too (for at most a minute), as one sent to itself would have: the run stops after that step."""

    def __init__(self, step: int, name: str) -> None:
        self.step, self.signal = step, getattr(signal, name)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        last = next(c for c in trainer.callbacks if isinstance(c, LastCheckpoint))  # type: ignore[attr-defined]
        self.send(os.getppid())
        deadline = time.monotonic() + 60
        while last.stopped_by is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def send(self, main: int) -> None:
        os.kill(main, self.signal)


class SignalMainAtSetup(L.Callback):
    """Sends the signal ``name`` to ``trainer=ddp_cpu``'s main process from rank 0 as the workers set up their fit
    (before they listen for stop signals) and waits, for at most a minute, to be ended by the signal handed over."""

    def __init__(self, name: str) -> None:
        self.signal = getattr(signal, name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.global_rank == 0:
            os.kill(os.getppid(), self.signal)
            time.sleep(60)


class SignalMainAsItLaunches(L.Callback):
    """Sends the signal ``name`` to ``trainer=ddp_cpu``'s main process as it pickles this callback for its first
    worker: while it launches the workers, before it knows them and before they are ready for the signal."""

    def __init__(self, name: str) -> None:
        self.signal, self.sent = getattr(signal, name), False

    def __getstate__(self) -> dict[str, object]:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signal)
        return self.__dict__


class CtrlCAt(SignalMainAt):
    """Ctrl-C at a terminal once ``step`` steps are done: SIGINT to every process in the main process's group, which
    must be a group of its own (the run started in a new session), or the tests would get it too. The main process
    gets it last, half a second after the others: a worker in that group then handles the terminal's signal before
    the one the main process hands over (sent at once with ``os.killpg``, both at times count as one)."""

    def __init__(self, step: int) -> None:
        super().__init__(step, "SIGINT")

    def send(self, main: int) -> None:
        if os.getpgid(main) != main:
            raise RuntimeError("CtrlCAt: the run does not lead its process group; start it in a new session")
        for pid in _process_group(main):
            if pid != main:
                os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        os.kill(main, signal.SIGINT)


def _process_group(group: int) -> list[int]:
    """The processes in the process group ``group`` (Linux: read from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == group:
                    members.append(int(entry))
            except OSError:  # ended meanwhile
                continue
    return members
