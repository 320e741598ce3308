"""How command-line entry points end: a result, or one readable error line and a non-zero exit."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("prefix_lightning")

DEBUG_VARIABLE = "HYDRA_FULL_ERROR"


def report_errors(entry: Callable[[], T]) -> T:
    """Run ``entry``; turn any exception into one line on stderr and exit code 1.

    Set HYDRA_FULL_ERROR=1 (Hydra's own switch) to get the traceback instead.
    """
    try:
        return entry()
    except Exception as error:
        if os.environ.get(DEBUG_VARIABLE) == "1":
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        _log_to_files(f"{type(error).__name__}: {message}")
        print(f"error: {message} (set {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def _log_to_files(message: str) -> None:
    """Record the error in the run's log file without printing it twice on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
