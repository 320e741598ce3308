"""Silencing a library's logger for one call whose news the project says itself, in its own words."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def muted(logger_name: str) -> Iterator[None]:
    """Drop what the logger ``logger_name`` logs inside the block (a library's error line before the exception
    that the project turns into one line of its own, a notice the project's own line repeats)."""
    logger = logging.getLogger(logger_name)
    was_disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was_disabled
