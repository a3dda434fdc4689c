"""A CSV logger whose history survives a resumed run.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts, so a run resumed in its
own folder (a requeued or interrupted job) would lose every epoch logged before the interruption.
This one appends to it.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics file and its columns; new rows are appended below."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that appends to the history of a resumed run."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment
