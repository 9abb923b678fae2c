"""Progress a person can follow: train.py's rich bar on a terminal, one flushed line per epoch
elsewhere (Slurm, nohup, ``> out.txt``), a per-epoch progress file, the run summary."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from gkl.io import atomic_write_json

# What a researcher watches: training loss, clean and robust (AT) validation accuracy.
DEFAULT_BAR_METRICS = ("train/loss", "val/acc", "val/pgd_acc")
PROGRESS_FILE = "progress.json"


# Libraries whose INFO lines (device summary, tips, "fit stopped") are not for the terminal.
LIBRARIES = ("lightning", "torchmetrics")
GKL_DIR = str(Path(__file__).parent.parent)  # a warning raised in a file below it is gkl's


class _LibraryChatter(logging.Filter):
    """True for what the terminal shows: gkl's records, library warnings and errors, and Python
    warnings raised in gkl's code; library INFO lines and library-raised warnings are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":  # "<file>:<line>: <Category>: <message>"
            return record.getMessage().startswith(GKL_DIR)
        from_library = record.name.split(".")[0] in LIBRARIES
        return not from_library or record.levelno >= logging.WARNING


def keep_library_chatter_in_the_log() -> None:
    """Route the libraries' log records and Python warnings through the root logger (Hydra's
    console and ``<run dir>/train.log`` handlers), and filter the console: the run's log file
    keeps every line; the terminal shows the progress bar, gkl's lines and real warnings."""
    logging.captureWarnings(True)
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in LIBRARIES]
    for logger in map(logging.getLogger, names):
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # their own console output
                logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # Hydra's console handler
            handler.addFilter(_LibraryChatter())


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return float(value.item()) if value.numel() == 1 else None
    return float(value) if isinstance(value, int | float) else None


class MetricsProgressBar(RichProgressBar):
    """Lightning's rich progress bar showing only ``metrics`` (those that have been logged).

    The values are the latest in ``trainer.callback_metrics``: epoch means of the training loss
    once an epoch has ended, validation accuracy after each validation.
    """

    def __init__(self, metrics: Sequence[str] = DEFAULT_BAR_METRICS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metric_names = tuple(metrics)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        line = resume_line(trainer)
        if line and trainer.is_global_zero:
            print(line, flush=True)
        super().on_train_start(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        for name in self.metric_names:
            value = _scalar(trainer.callback_metrics.get(name))
            if value is not None:
                shown[name] = value
        return shown


def resume_line(trainer: pl.Trainer) -> str | None:
    """``Restoring states from checkpoint <path>: ...`` for a resumed fit (after the restore),
    else ``None``."""
    if not trainer.ckpt_path:
        return None
    done = trainer.current_epoch
    total = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
    return (
        f"Restoring states from checkpoint {trainer.ckpt_path}: {done} epoch(s) and "
        f"{trainer.global_step} step(s) done, continuing with epoch {done + 1}{total}"
    )


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def epoch_line(
    epoch: int,
    max_epochs: int | None,
    metrics: Mapping[str, float],
    elapsed: float,
    seconds_per_epoch: float | None,
) -> str:
    """``epoch 2/3 | train/loss 0.4213 | val/acc 84.10% | elapsed 0:00:21 | ETA 0:00:10``.

    ``epoch`` counts from 1; accuracies (names ending in ``acc``) print as percentages; the ETA is
    ``seconds_per_epoch * (max_epochs - epoch)`` (``?`` without a known length or pace)."""
    known = max_epochs is not None and max_epochs >= 0
    parts = [f"epoch {epoch}/{max_epochs}" if known else f"epoch {epoch}"]
    for name, value in metrics.items():
        parts.append(
            f"{name} {100 * value:.2f}%" if name.endswith("acc") else f"{name} {value:.4f}"
        )
    parts.append(f"elapsed {_hms(elapsed)}")
    if known and seconds_per_epoch is not None:
        parts.append(f"ETA {_hms(seconds_per_epoch * max(max_epochs - epoch, 0))}")
    else:
        parts.append("ETA ?")
    return " | ".join(parts)


class EpochLines(ProgressBar):
    """Progress where stdout is not a terminal: one line per epoch (:func:`epoch_line`: the
    training loss, every logged ``val/`` metric, elapsed time and ETA), flushed as it is printed,
    and :func:`resume_line` when a fit resumes from a checkpoint.

    The pace is measured over the epochs this process ran, so a resumed run's ETA is honest."""

    def __init__(
        self, metrics: Sequence[str] = DEFAULT_BAR_METRICS, stream: IO[str] | None = None
    ) -> None:
        super().__init__()
        self.metric_names = tuple(metrics)
        self.stream = stream
        self._enabled = True
        self._start_time = 0.0
        self._start_epoch = 0
        self._pending: str | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        print(line, file=stream, flush=True)

    def shown_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """``metrics`` then every other ``val/`` scalar in ``trainer.callback_metrics``."""
        names = [*self.metric_names]
        names += sorted(n for n in trainer.callback_metrics if n.startswith("val/"))
        shown: dict[str, float] = {}
        for name in dict.fromkeys(names):
            value = _scalar(trainer.callback_metrics.get(name))
            if value is not None:
                shown[name] = value
        return shown

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_epoch = trainer.current_epoch
        self._start_time = time.monotonic()
        line = resume_line(trainer)
        if line and self._enabled and trainer.is_global_zero:
            self._print(line)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._enabled or not trainer.is_global_zero:
            return
        done = trainer.current_epoch + 1
        elapsed = time.monotonic() - self._start_time
        ran = done - self._start_epoch
        per_epoch = elapsed / ran if ran > 0 else None
        metrics = self.shown_metrics(trainer)
        self._pending = epoch_line(done, trainer.max_epochs, metrics, elapsed, per_epoch)

    def _flush_pending(self) -> None:
        if self._pending is not None:
            self._print(self._pending)
            self._pending = None

    # The line is printed once the epoch's checkpoints are written (checkpoint callbacks run after
    # this one's on_train_epoch_end): a job killed after "epoch 3/6" resumes after epoch 3.
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_pending()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_pending()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._flush_pending()


def progress_bar(
    metrics: Sequence[str] = DEFAULT_BAR_METRICS, stream: IO[str] | None = None
) -> ProgressBar:
    """The rich bar (:class:`MetricsProgressBar`) when ``stream`` (default stdout) is a
    terminal, else :class:`EpochLines` (cluster logs, ``nohup``, ``> out.txt``)."""
    out = stream if stream is not None else sys.stdout
    if out.isatty():
        return MetricsProgressBar(metrics)
    return EpochLines(metrics, stream)


class ProgressFile(pl.Callback):
    """Writes ``path`` (JSON, atomically) at train start and after every epoch's validation.

    ``{"epoch": epochs done, "max_epochs", "seconds_per_epoch", "history": [{"epoch", metric:
    value, ...}, ...]}``, the history holding ``metrics`` per finished epoch. A resumed run keeps
    the history of the epochs before its checkpoint, so the file covers the whole run.
    """

    def __init__(
        self, path: str | Path, metrics: Sequence[str] = ("train/loss", "val/acc")
    ) -> None:
        self.path = Path(path)
        self.metric_names = tuple(metrics)
        self.history: list[dict[str, float]] = []
        self._start_time = 0.0
        self._start_epoch = 0

    def _write(self, trainer: pl.Trainer, epochs_done: int) -> None:
        ran = epochs_done - self._start_epoch
        per_epoch = (time.monotonic() - self._start_time) / ran if ran > 0 else None
        record = {
            "epoch": epochs_done,
            "max_epochs": trainer.max_epochs,
            "seconds_per_epoch": per_epoch,
            "history": self.history,
        }
        atomic_write_json(self.path, record)

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning restored the loops from a checkpoint: current_epoch is the one to run.
        self._start_epoch = trainer.current_epoch
        self._start_time = time.monotonic()
        previous = read_progress(self.path)
        history = previous["history"] if previous else []
        self.history = [h for h in history if h["epoch"] < self._start_epoch]
        self._write(trainer, self._start_epoch)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry: dict[str, float] = {"epoch": trainer.current_epoch}
        for name in self.metric_names:
            value = _scalar(trainer.callback_metrics.get(name))
            if value is not None and math.isfinite(value):
                entry[name] = value
        self.history.append(entry)
        self._write(trainer, trainer.current_epoch + 1)


def read_progress(path: str | Path) -> dict[str, Any] | None:
    """The record a :class:`ProgressFile` wrote, or ``None`` if there is none (yet)."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def run_summary(out_dir: str | Path, metrics: Mapping[str, float], metrics_file: Path) -> str:
    """One line for the end of a run: test (else validation) accuracy, run dir, metrics file."""
    parts = []
    for name in ("test/acc", "test/pgd_acc", "val/acc", "val/pgd_acc"):
        if name in metrics and (name.startswith("test/") or "test/acc" not in metrics):
            parts.append(f"{name} {100 * metrics[name]:.2f}%")
    shown = ", ".join(parts) if parts else "no accuracy logged"
    return f"done: {shown} | run dir {out_dir} | metrics {metrics_file}"


@rank_zero_only
def print_run_summary(
    cfg: Any, metrics: Mapping[str, float], metrics_name: str, smoke_name: str
) -> None:
    """Print :func:`run_summary` for a ``train.py`` run: its metrics file is ``metrics_name``, or
    ``smoke_name`` when that is the one the run wrote (synthetic data or fast_dev_run)."""
    out_dir = Path(cfg.paths.output_dir)
    metrics_file, smoke_file = out_dir / metrics_name, out_dir / smoke_name
    smoke = smoke_file.is_file() and (
        not metrics_file.is_file() or smoke_file.stat().st_mtime >= metrics_file.stat().st_mtime
    )
    line = run_summary(out_dir, metrics, smoke_file if smoke else metrics_file)
    print(line + (" (smoke test: NOT a result)" if smoke else ""), flush=True)
