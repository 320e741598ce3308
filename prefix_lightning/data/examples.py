"""The unit every dataset reader produces: one (source, target) pair and the group it belongs to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training pair.

    `group_id` indexes the source's group within its file: all references written for one input (one E2E
    meaning representation) share it, so that generation runs once per group and scores against all of them.
    """

    source: str
    target: str
    group_id: int


def group_references(examples: Iterable[Example]) -> list[tuple[str, list[str]]]:
    """Unique sources in first-seen order, each with all its references (for multi-reference scoring)."""
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(example.source, []).append(example.target)
    return list(groups.items())
