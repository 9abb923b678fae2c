"""What the step benchmarks share: a repeated batch and a bare Lightning fit over it."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class RepeatedBatch(Dataset):
    """The same collated batch ``(x, y, *extra)`` ``length`` times."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, length: int, extra: tuple[torch.Tensor, ...] = ()
    ) -> None:
        self.x, self.y, self.length, self.extra = x, y, length, extra

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return (self.x, self.y, *self.extra)


def fit_repeated_batch(
    task: pl.LightningModule,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    timer: pl.Callback,
    device: str,
    precision: str | None = None,
    extra: tuple[torch.Tensor, ...] = (),
) -> None:
    """``steps`` training steps of ``task`` on ``(x, y)``: one epoch, no validation, no
    checkpoints, logger or progress bar, so only the step (and ``timer``) runs."""
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=False,
        callbacks=[timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(
        task, train_dataloaders=DataLoader(RepeatedBatch(x, y, steps, extra), batch_size=None)
    )
