"""Checkpoint files a user hands over (``ckpt_path=``, ``resume=``, ``python -m prefix_lightning.export``): read,
or refused with one line that names the file, says what is wrong and points to the newest intact checkpoint beside
it (a full disk or a killed copy leaves a truncated file; torch's own error is then "[Errno 22] Invalid argument")."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

# What every Lightning checkpoint holds; a file without them was written by something else.
REQUIRED_KEYS = ("state_dict", "global_step")


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names it and the newest intact one beside it."""


def check_checkpoint(path: str | Path) -> Path:
    """``path`` if it is a complete checkpoint file, else a one-line DamagedCheckpointError or FileNotFoundError.

    A folder (DeepSpeed's checkpoints) is left to the strategy that reads it.
    """
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist{_alternative(path)}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {path} cannot be used: {problem}{_alternative(path)}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents on the CPU, after :func:`check_checkpoint`."""
    return torch.load(check_checkpoint(path), map_location="cpu", weights_only=True)


def logged_step(path: str | Path) -> int | None:
    """The step from which a run resumed from this checkpoint logs again: the steps it had taken (Lightning logs the
    N-th step at N-1, and the validation after it too, before its checkpoint); None for a folder (DeepSpeed's)."""
    if Path(path).is_dir():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` unusable as a checkpoint, or None. Reads the whole archive (every entry's checksum):
    about a second per GB."""
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        return f"it is truncated or not a checkpoint ({size:,} bytes, no complete torch archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"it is damaged ({error})"
    if damaged is not None:
        return f"its entry {damaged} is damaged"
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        return f"torch cannot read it ({' '.join(str(error).split())[:200]})"
    if not isinstance(contents, dict) or any(key not in contents for key in REQUIRED_KEYS):
        return f"it is not a Lightning checkpoint (no {' / '.join(REQUIRED_KEYS)})"
    return None


def newest_intact(folder: Path, besides: Path | None = None) -> Path | None:
    """The most recently written usable ``*.ckpt`` in ``folder`` other than ``besides``."""
    candidates = [p for p in folder.glob("*.ckpt") if p.is_file() and p != besides]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(candidate) is None:
            return candidate
    return None


def _alternative(path: Path) -> str:
    intact = newest_intact(path.parent, besides=path) if path.parent.is_dir() else None
    if intact is None:
        return f"; no intact checkpoint in {path.parent}"
    return f"; the newest intact checkpoint there is {intact}"
