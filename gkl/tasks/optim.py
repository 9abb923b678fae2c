"""Learning-rate schedules stepped once per epoch, with an optional linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class _EpochFactor:
    """Picklable LR factor: linear warm-up, then step decay or cosine annealing."""

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
        return 1.0


SCHEDULES = ("multistep", "cosine", "constant")


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
    """``lr(epoch) = base_lr * factor(epoch)``.

    ``multistep``: ``gamma ** (number of milestones <= epoch)`` (mdistiller: 150/180/210, 0.1).
    ``cosine``: ``min_factor + (1 - min_factor) * (1 + cos(pi * progress)) / 2``.
    Both after ``warmup_epochs`` of linear warm-up ``(epoch + 1) / warmup_epochs``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid choices: {list(SCHEDULES)}")
    factor = _EpochFactor(kind, max_epochs, warmup_epochs, milestones, gamma, min_factor)
    return LambdaLR(optimizer, factor)
