"""Hydra callbacks (conf/hydra/default.yaml): aggregate a sweep when its multirun ends (early or not); close W&B after
each job."""

from __future__ import annotations

import atexit
import logging
import sys
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prefix_lightning.sweeps.aggregate import aggregate

log = logging.getLogger(__name__)


class AggregateSweep(Callback):
    """Writes the sweep's table, plots and report once all its jobs are done (whichever launcher ran them), and also
    when the sweep ends early: Hydra skips ``on_multirun_end`` when a job failed (or on Ctrl-C), so the launching
    process then writes the summary as it exits, its unfinished jobs listed."""

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric
        self._unsummarized: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._unsummarized = str(config.hydra.sweep.dir)
        atexit.register(self._summarize_an_early_end)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._unsummarized = None
        aggregate(config.hydra.sweep.dir, self.metric)

    def _summarize_an_early_end(self) -> None:
        if self._unsummarized is None:
            return
        try:
            aggregate(self._unsummarized, self.metric)
        except Exception as error:  # the sweep's own error is the one to see
            log.warning("could not summarize %s: %s", self._unsummarized, error)


class FinishWandbRun(Callback):
    """Each job of a multirun gets its own W&B run: without ``wandb.finish()`` the next job would log into this one."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        wandb = sys.modules.get("wandb")  # only if this job used it
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=0 if job_return.status == JobStatus.COMPLETED else 1)
