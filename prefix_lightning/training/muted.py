"""Silencing a library's log lines for one call whose news the project says itself, in its own words."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def muted(logger_name: str, containing: str = "") -> Iterator[None]:
    """Drop the records of the logger ``logger_name`` whose message holds ``containing`` (all, by default) inside
    the block: a library's error line before the exception that the project turns into one line of its own, a
    notice that the project's own line repeats."""
    logger = logging.getLogger(logger_name)

    def passes(record: logging.LogRecord) -> bool:
        return containing not in record.getMessage()

    logger.addFilter(passes)
    try:
        yield
    finally:
        logger.removeFilter(passes)
