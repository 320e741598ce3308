"""Argument checks and reference layout shared by every scorer."""

from __future__ import annotations

from collections.abc import Sequence


def check_pairs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """ValueError unless there is at least one hypothesis, each with its own non-empty list of reference strings."""
    if not hypotheses:
        raise ValueError("scoring needs at least one hypothesis")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    if not all(isinstance(text, str) for text in hypotheses) or not all(
        isinstance(text, str) for refs in references for text in refs
    ):
        raise ValueError("hypotheses and references must be strings")


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every hypothesis' k-th reference, None where a group has fewer.

    sacrebleu drops None per segment, but keeps "" as a zero-length reference (which changes the closest reference
    length and so the brevity penalty): pad with "" only where an official script has empty reference lines.
    """
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
