"""Counts and numbers as settings mean them: ``true`` (YAML's and Python's) is an ``int`` to ``isinstance``, but a
LoRA rank of ``true`` or a patience of ``true`` is a mistake to name, not 1."""

from __future__ import annotations


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
