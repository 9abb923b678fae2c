"""Supervised classification task: trains teachers and CE-only baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from gkl.checks import (
    check_count,
    check_non_negative_number,
    check_number,
    check_positive_number,
)
from gkl.losses import ClassPrior

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def check_optimizer_options(optimizer: OptimizerFactory) -> None:
    """Refuse a bad number among the optimizer partial's options (``optim.optimizer.<key>``)
    before training: ``lr``, ``eps`` finite > 0; ``weight_decay`` finite >= 0; ``momentum``,
    ``dampening`` in [0, 1]; each of ``betas`` in [0, 1). Tensors are left to torch."""
    options = getattr(optimizer, "keywords", None) or {}
    for key, value in options.items():
        name = f"optim.optimizer.{key}"
        if isinstance(value, torch.Tensor):
            continue
        if key in ("lr", "eps"):
            check_positive_number(name, value)
        elif key == "weight_decay":
            check_non_negative_number(name, value)
        elif key in ("momentum", "dampening"):
            check_number(name, value, low=0, high=1)
        elif key == "betas":
            for i, beta in enumerate(value):
                check_number(f"{name}[{i}]", beta, low=0, high=1, high_open=True)


class ClassificationTask(pl.LightningModule):
    """``model`` maps images in [0, 1] to logits (normalisation lives inside the model).

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``): ``optimizer(params)``
    and ``scheduler(optimizer)``; the scheduler is stepped once per epoch. ``class_prior`` is the
    :class:`ClassPrior` a subclass's losses read (:func:`gkl.losses.class_prior_for`); this class
    finalises it at each training epoch's end.
    """

    class_prior: ClassPrior | None

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        check_count("num_classes", num_classes)
        check_optimizer_options(optimizer)
        self.model = model
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.class_prior = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def export_model(self) -> nn.Module:
        """The network that ``train.py``'s ``export_weights`` saves: the trained model."""
        return self.model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.log_train(loss, logits, y, {})
        return loss

    def log_train(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
        parts: dict[str, torch.Tensor],
    ) -> None:
        # Rank-local epoch means (batch-size weighted), no collective: under DDP, rank 0's
        # progress bar computes epoch metrics before the other ranks, so a synchronised metric
        # here would pair with a different collective (the class prior's all-reduce) and hang.
        batch_size = len(y)
        accuracy = (logits.detach().argmax(dim=1) == y).float().mean()
        epoch_mean = {"on_step": False, "on_epoch": True, "batch_size": batch_size}
        self.log("train/loss", loss.detach(), prog_bar=True, **epoch_mean)
        self.log("train/acc", accuracy, prog_bar=True, **epoch_mean)
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), **epoch_mean)

    def on_train_epoch_end(self) -> None:
        """The epoch's class-prior statistics become the prior of the next epoch."""
        if self.class_prior is not None:
            self.class_prior.end_epoch()

    def _evaluate(self, batch, metric: MulticlassAccuracy, stage: str) -> None:
        x, y = batch
        logits = self.model(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, "test")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
