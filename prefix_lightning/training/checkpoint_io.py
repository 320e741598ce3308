"""Checkpoint files written atomically next to their destination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from prefix_lightning.files.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's own writer stages local files in the system temp folder and moves them, which is a copy, not
    an atomic rename, when that folder is on another filesystem; a kill then leaves a truncated last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda temporary: torch.save(checkpoint, temporary))
