"""Record the best test epoch under a name that says it is not a result.

mdistiller's tables (and so the KD columns of the GKL paper) report the best test accuracy over
all epochs: a number selected on the test set. gkl's ``metrics.json`` keeps the last epoch; this
callback writes the best epoch beside it, to a file whose name and first key say
``NOT_A_RESULT``, so that like can be compared with like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from gkl.io import atomic_write_json

NOTE = (
    "best epoch selected on the TEST set (mdistiller's reporting), for comparison with published "
    "tables only; the result is the last epoch in metrics.json"
)


class BestTestEpochRecorder(pl.Callback):
    """After each validation on the test set (``datamodule.val_is_test``), keep the epoch with the
    highest ``monitor`` and write ``{"NOT_A_RESULT": ..., "epoch": e, monitor: value}`` to
    ``path``. The best so far is callback state, so it survives resume."""

    def __init__(self, path: str | Path, monitor: str = "val/acc") -> None:
        self.path = Path(path)
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not getattr(trainer.datamodule, "val_is_test", False):
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, trainer.current_epoch + 1
            if trainer.is_global_zero:
                record = {"NOT_A_RESULT": NOTE, "epoch": self.best_epoch, self.monitor: value}
                atomic_write_json(self.path, record)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]
