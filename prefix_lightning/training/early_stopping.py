"""Early stopping on the optimized metric, off unless ``callbacks.early_stopping.patience`` is set."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import EarlyStopping

from prefix_lightning.numbers import is_int


def early_stopping(monitor: str, mode: str, patience: int | None, min_delta: float = 0.0) -> EarlyStopping | None:
    """Lightning's early stopping on ``monitor``, counting ``patience`` validations without improvement; None (no
    callback) when ``patience`` is None."""
    check_patience(patience)
    if patience is None:
        return None
    return EarlyStopping(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta)


def check_patience(patience: Any) -> None:
    """Refuse a patience that counts no validations (``training/checks.py`` asks before anything loads)."""
    if patience is not None and not (is_int(patience) and patience > 0):
        raise ValueError(f"callbacks.early_stopping.patience={patience!r} is not valid: use validations > 0, or null")
