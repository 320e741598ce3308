"""Faults injected into real training runs by tests, as callbacks named on the command line."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class SignalAt(L.Callback):
    """Sends the signal ``name`` (SIGKILL, SIGINT, ...) to this very process once ``step`` steps are done."""

    def __init__(self, step: int, name: str) -> None:
        self.step, self.signal = step, getattr(signal, name)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
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
