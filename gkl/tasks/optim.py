"""Learning-rate schedules stepped once per epoch, with an optional linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class _EpochFactor:
    """Picklable LR factor of the 0-based epoch: linear warm-up, then step decay or a cosine."""

    def __init__(
        self,
        kind: str,
        max_epochs: int,
        warmup_epochs: int,
        milestones: Sequence[int],
        gamma: float,
        min_factor: float,
    ) -> None:
        self.kind, self.max_epochs, self.warmup_epochs = kind, max_epochs, warmup_epochs
        self.milestones, self.gamma, self.min_factor = list(milestones), gamma, min_factor

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / self.warmup_epochs
        if self.kind == "multistep":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.kind == "cosine":
            span = max(1, self.max_epochs - self.warmup_epochs)
            progress = min(1.0, (epoch - self.warmup_epochs) / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        if self.kind == "authors_cosine":
            span = self.max_epochs - self.warmup_epochs + 1
            return 0.5 * (1 + math.cos(math.pi * (epoch + 1 - self.warmup_epochs) / span))
        return 1.0


SCHEDULES = ("multistep", "cosine", "authors_cosine", "constant")


def epoch_scheduler(
    optimizer: Optimizer,
    *,
    kind: str = "multistep",
    max_epochs: int,
    warmup_epochs: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
) -> LambdaLR:
    """``lr(epoch) = base_lr * factor(epoch)``, ``epoch`` 0-based (Lightning's).

    ``multistep``: ``gamma ** (number of milestones <= epoch)`` (mdistiller: 150/180/210, 0.1;
    its ``epoch > stage`` with 1-based epochs).
    ``cosine``: ``min_factor + (1 - min_factor) * (1 + cos(pi * progress)) / 2`` with
    ``progress = (epoch - warmup_epochs) / (max_epochs - warmup_epochs)``; with no warm-up and
    ``min_factor = 0`` this is ``train_trades_cifar.py``'s ``0.5 * (1 + cos((E - 1) / epochs *
    pi))`` for the 1-based epoch ``E = epoch + 1``.
    ``authors_cosine``: ``(1 + cos(pi * (epoch + 1 - warmup_epochs) / (max_epochs -
    warmup_epochs + 1))) / 2``, the ``adjust_learning_rate_cosine`` of the authors' GKL-AT scripts
    (``train_dkl_cifar10/100.py``, 1-based ``E``: ``cos(pi * (E - W) / (epochs - W + 1))``) and
    of ``imagenetlt_distill_dkl.py`` (0-based: ``cos(pi * (epoch - W + 1) / (epochs - W + 1))``);
    it never reaches 0 (last epoch of 200: 6.1e-5).
    All after ``warmup_epochs`` of linear warm-up ``(epoch + 1) / warmup_epochs`` (the authors'
    ``lr / W * E`` before epoch ``W``, and ``imagenetlt_distill_dkl.py``'s ``lr / W * (epoch +
    1)``).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid choices: {list(SCHEDULES)}")
    if kind == "authors_cosine" and min_factor != 0:
        raise ValueError(
            f"optim.scheduler.min_factor={min_factor}: the authors' cosine has no floor; use "
            "kind=cosine for one, or set min_factor=0"
        )
    if warmup_epochs < 0:
        raise ValueError(f"optim.scheduler.warmup_epochs must be >= 0, got {warmup_epochs}")
    factor = _EpochFactor(kind, max_epochs, warmup_epochs, milestones, gamma, min_factor)
    return LambdaLR(optimizer, factor)
