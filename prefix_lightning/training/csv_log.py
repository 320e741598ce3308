"""Lightning's CSV logger, with a ``metrics.csv`` that outlives the process writing it.

Lightning's writer deletes the file it finds when it starts and knows only the columns its own process logged.
So a resumed run lost the rows of its earlier attempts, and a ``trainer=ddp_cpu`` run, whose fit and test run in
processes spawned from a writer that logged nothing, failed at the test ("dict contains fields not in
fieldnames": the fit's columns). This one continues the file it finds, adding columns to its header: the rows of
earlier attempts stay, up to the step from which this attempt logs (a resumed run goes on from its checkpoint's
step, and what an attempt logged after its checkpoint was lost with it; a run started afresh replaces them all).
Later rows are appended while their columns are in the file (Lightning saves after every few steps: rewriting the
file each time grew with the square of a long run's rows).
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
    _first_save = True  # per process: a spawned one gets the writer as the main process left it

    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes the metrics file of an earlier attempt here; it is kept."""

    def save(self) -> None:
        if not self.metrics:
            return
        columns = set().union(*self.metrics)
        header = self._header()
        if not self._first_save and columns <= set(header):  # rows of known columns: appended, not rewritten
            with self._fs.open(self.metrics_file_path, mode="a", newline="") as file:
                csv.DictWriter(file, fieldnames=header).writerows(self.metrics)
            self.metrics = []
            return
        header, rows = self._read()
        if self._first_save:  # this attempt's first rows: the earlier attempts' from that step on are void
            self._first_save = False
            start = min(int(row["step"]) for row in self.metrics)
            rows = [row for row in rows if int(row["step"]) < start]
        keys = sorted(columns.union(header))
        with self._fs.open(self.metrics_file_path, mode="w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows([*rows, *self.metrics])
        self.metrics = []

    def _header(self) -> list[str]:
        """The columns of the metrics file on disk, from its first line (another process may have added some)."""
        if not self._fs.isfile(self.metrics_file_path):
            return []
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            return next(csv.reader(file), [])

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        """The columns and rows of the metrics file on disk (none where there is no file yet)."""
        if not self._fs.isfile(self.metrics_file_path):
            return [], []
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            return list(reader.fieldnames or []), list(reader)
