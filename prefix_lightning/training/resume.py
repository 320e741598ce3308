"""Re-running a sweep: a run folder with a complete record is skipped, one with a last checkpoint resumes from it.

Sweep job folders are named by their overrides, not by time, so the same command finds the same folders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefix_lightning.training.last_checkpoint import LAST
from prefix_lightning.training.record import RECORD_FILE, read_record

log = logging.getLogger(__name__)


def finished_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The complete record of a run that already finished in ``run_dir`` (then skip it), else None."""
    record = read_record(run_dir)
    if record is not None:
        log.info("skipped: %s already holds a complete %s (delete it to run again)", run_dir, RECORD_FILE)
    return record


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``cfg.ckpt_path`` when given, else the run folder's own last checkpoint if an earlier attempt left one."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    dirpath = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath")
    last = Path(dirpath, LAST) if dirpath else None
    if last is None or not last.is_file():
        return None
    log.info("resuming from %s, left by an earlier attempt of this run", last)
    return str(last)
