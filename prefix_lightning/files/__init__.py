"""Files a run writes so that a crash or kill never leaves half of one."""

from prefix_lightning.files.atomic import atomic_folder, atomic_write
from prefix_lightning.files.modes import give_new_file_mode

__all__ = ["atomic_folder", "atomic_write", "give_new_file_mode"]
