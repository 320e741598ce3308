"""The unit every dataset reader produces: one (source, target) pair and the group it belongs to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training pair.

    `group_id` indexes the source's group within its file: all references written for one input (one E2E
    meaning representation, one WebNLG entry) share it, so that generation runs once per group and scores
    against all of them. `category` is the input's domain where the dataset has one (WebNLG's DBpedia
    category), so that scores can be split into seen and unseen categories.
    """

    source: str
    target: str
    group_id: int
    category: str = ""


@dataclass(frozen=True)
class Group:
    """One generation input: a source with all its references."""

    group_id: int
    source: str
    references: list[str]
    category: str = ""


def reference_groups(examples: Iterable[Example]) -> list[Group]:
    """One group per `group_id`, in first-seen order, each with all its references (multi-reference scoring).

    Grouping is by id, not by source text: two WebNLG or DART entries may share a triple set and are still
    scored separately, as the official evaluations do.
    """
    groups: dict[int, Group] = {}
    for example in examples:
        group = groups.get(example.group_id)
        if group is None:
            groups[example.group_id] = Group(example.group_id, example.source, [example.target], example.category)
        else:
            group.references.append(example.target)
    return list(groups.values())


def group_references(examples: Iterable[Example]) -> list[tuple[str, list[str]]]:
    """(source, references) per group, in first-seen order: the plain view that scorers take."""
    return [(group.source, group.references) for group in reference_groups(examples)]
