"""Lightning's CSV logger, with a ``metrics.csv`` that outlives the process writing it.

Lightning's writer deletes the file it finds when it starts and knows only the columns its own process logged.
So a resumed run lost the rows of its earlier attempts, and a ``trainer=ddp_cpu`` run, whose fit and test run in
processes spawned from a writer that logged nothing, failed at the test ("dict contains fields not in
fieldnames": the fit's columns). This one adds rows to the file it finds, and columns to its header.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ContinuedCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` is continued, never replaced (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not isinstance(self._experiment, _ContinuedWriter):  # None until the first call
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes the metrics file of an earlier attempt here; it is kept."""

    def save(self) -> None:
        if not self.metrics:
            return
        header = self._header()
        keys = sorted(set(header).union(*self.metrics))
        if header and keys != header:  # new columns: the rows so far are written again under the wider header
            self._rewrite_with_new_header(keys)
        with self._fs.open(self.metrics_file_path, mode="a" if header else "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            if not header:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics_keys, self.metrics = keys, []

    def _header(self) -> list[str]:
        """The columns of the metrics file on disk (none where there is no file yet)."""
        if not self._fs.isfile(self.metrics_file_path):
            return []
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            return next(csv.reader(file), [])
