"""Early stopping on the optimized metric, off unless ``callbacks.early_stopping.patience`` is set."""

from __future__ import annotations

from lightning.pytorch.callbacks import EarlyStopping

from prefix_lightning.numbers import is_int


def early_stopping(monitor: str, mode: str, patience: int | None, min_delta: float = 0.0) -> EarlyStopping | None:
    """Lightning's early stopping on ``monitor``, counting ``patience`` validations without improvement; None (no
    callback) when ``patience`` is None."""
    if patience is None:
        return None
    if not is_int(patience) or patience < 1:
        raise ValueError(f"callbacks.early_stopping.patience={patience!r} is not valid: use a positive integer or null")
    return EarlyStopping(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta)
