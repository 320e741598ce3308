"""Writing files and folders so that a crash or kill leaves either the old one or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

from prefix_lightning.files.modes import give_new_file_mode


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a temporary sibling of ``path``, flush it to disk, then rename it over ``path``.

    The sibling lives in the same folder, so the final rename never crosses filesystems. The file gets the mode of
    a new file, whatever ``write`` used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{uuid4().hex}")
    try:
        write(temporary)
        give_new_file_mode(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_folder(target: Path, write: Callable[[Path], object]) -> None:
    """Run ``write`` into a temporary sibling folder, then rename it to ``target``; if another process finished
    the same target first, its copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its folder is private (0700) and would stay so after the rename; mkdir honours umask.
    temporary = target.with_name(f".{target.name}.tmp-{uuid4().hex}")
    temporary.mkdir()
    try:
        write(temporary)
        try:
            temporary.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
