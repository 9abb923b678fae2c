"""Loggers whose history survives a resume.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it finds one, so a run resumed in its own
directory kept only the epochs after the checkpoint. :class:`CSVLogger` keeps the file and, once
the checkpoint is restored (:class:`HistoryTrimCallback`, added by ``train.py``), drops the rows
logged after the checkpoint's step (a killed run's last, unsaved epoch) before appending: the file
then holds the whole run once, epochs 1 to N.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from gkl.io import atomic_write_text


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion of an existing ``metrics.csv``; its header
    seeds the known columns, so rows with new columns rewrite the file with all of them."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the previous metrics.csv
        pass

    def keep_rows_before(self, step: int) -> int:
        """Drop the rows logged at ``step`` or later (after the checkpoint a resume restored);
        returns how many rows were dropped."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return 0
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [r for r in rows if r.get("step") not in (None, "") and int(r["step"]) < step]
        if len(kept) < len(rows):
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(path, out.getvalue())
        return len(rows) - len(kept)


class CSVLogger(LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that appends to the run's ``metrics.csv`` instead
    of deleting it (see the module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class HistoryTrimCallback(pl.Callback):
    """After a restore (``on_train_start``), every :class:`CSVLogger` of the trainer drops the
    rows logged at or after the restored ``global_step``; a fresh fit (step 0) drops them all."""

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger) and isinstance(logger.experiment, _KeepingWriter):
                logger.experiment.keep_rows_before(trainer.global_step)


def finish_loggers(trainer: pl.Trainer) -> None:
    """End the W&B runs of ``trainer``'s loggers (files flushed; the next run of a multirun gets
    a run of its own instead of reusing this one)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
