"""Finding a run's callback of one kind: the config chooses the callbacks, so any of them may be absent."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from lightning.pytorch.callbacks import Callback

CallbackKind = TypeVar("CallbackKind", bound=Callback)


def find_callback(callbacks: Iterable[Callback], kind: type[CallbackKind]) -> CallbackKind | None:
    """The first callback of this kind, or None where the run has none."""
    return next((c for c in callbacks if isinstance(c, kind)), None)
