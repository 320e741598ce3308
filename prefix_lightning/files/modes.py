"""File modes of what a run writes: readable as the user's umask allows, whoever wrote the bytes."""

from __future__ import annotations

import os
from pathlib import Path


def give_new_file_mode(*paths: Path) -> None:
    """Give ``paths`` the mode a newly created file gets (0o666 less the umask). safetensors 0.8 writes its files
    0600 (safetensors issue #782): other users of a shared machine, or a container's user, could not read an
    export."""
    mask = os.umask(0)  # reading the umask sets it: put it back at once
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)
