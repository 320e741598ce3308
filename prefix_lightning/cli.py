"""How command-line entry points end: a result, or one readable error line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode

T = TypeVar("T")
log = logging.getLogger("prefix_lightning")

DEBUG_VARIABLE = "HYDRA_FULL_ERROR"


class JobFailed(CompactHydraException):
    """A failed job of a multirun: Hydra records it and runs the other jobs (an exit would end the whole sweep, and
    the Optuna sweeper could not count it against ``max_failure_rate``); the sweep ends with this line and exit
    code 1."""


class StoppedBySignal(Exception):
    """A run stopped by a signal, which is not an error: :func:`report_errors` prints its line as it is and exits
    with ``exit_code``."""

    exit_code: int


def device_option(value: str) -> str:
    """An argparse type: a torch device this machine has, checked as the command line is read (a typo would
    otherwise surface in torch's words once the model is loaded or a benchmark phase has started)."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this torch has no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this torch has no MPS device")
    if device.type == "meta":
        raise argparse.ArgumentTypeError(f"{value!r} holds no data: give a device that computes")
    return value


def positive_int(value: str) -> int:
    """An argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid: use 1 or more")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a number above 0."""
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} is not valid: use a number above 0")
    return number


def report_errors(entry: Callable[[], T]) -> T:
    """Run ``entry``; turn any exception into one line on stderr and exit code 1 (a job of a multirun: the line,
    then :class:`JobFailed`).

    Set HYDRA_FULL_ERROR=1 (Hydra's own switch) to get the traceback instead. A :class:`StoppedBySignal` prints
    its line as it is and exits with its status (other errors may carry an ``exit_code`` too: torch's for a worker
    that a signal killed).
    """
    try:
        return entry()
    except Exception as error:
        stopped = error.exit_code if isinstance(error, StoppedBySignal) else None
        if os.environ.get(DEBUG_VARIABLE) == "1" and stopped is None:
            raise
        message = _message(error)
        _log_to_files(f"{type(error).__name__}: {message}")
        if stopped is not None:
            print(message, file=sys.stderr)
            sys.exit(stopped)
        print(f"error: {message} (set {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            hydra = HydraConfig.get()
            raise JobFailed(
                f"error in the job {hydra.runtime.output_dir}: {message}. Once fixed, run the sweep again: its "
                f"finished jobs are skipped (its table so far: python -m prefix_lightning.sweeps.aggregate "
                f"{hydra.sweep.dir})"
            ) from None
        sys.exit(1)


def _message(error: BaseException) -> str:
    """The error on one line; for a config entry that failed to build (Hydra's wrapper, which names the class and
    repeats the cause's repr), the cause's own words under the entry's key: ``data: max_source_tokens=0 ...``."""
    cause = error.__cause__
    if isinstance(error, InstantiationException) and cause is not None:
        key = re.search(r"full_key: (\S+)", str(error))
        return (f"{key.group(1)}: " if key else "") + _message(cause)
    return " ".join(str(error).split()) or type(error).__name__


def _log_to_files(message: str) -> None:
    """Record the error in the run's log file without printing it twice on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
