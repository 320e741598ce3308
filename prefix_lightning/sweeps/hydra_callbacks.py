"""Hydra callbacks (conf/hydra/default.yaml): aggregate a sweep when its multirun ends; close W&B after each job."""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prefix_lightning.sweeps.aggregate import aggregate

log = logging.getLogger(__name__)


class AggregateSweep(Callback):
    """Writes the sweep's table, plots and report once all its jobs are done (whichever launcher ran them)."""

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        aggregate(config.hydra.sweep.dir, self.metric)


class FinishWandbRun(Callback):
    """Each job of a multirun gets its own W&B run: without ``wandb.finish()`` the next job would log into this one."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        wandb = sys.modules.get("wandb")  # only if this job used it
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=0 if job_return.status == JobStatus.COMPLETED else 1)
