"""Class-wise global prior for GKL (the "GI" variant)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ._validation import check_logits, check_positive, check_target


class ClassPrior(nn.Module):
    """A (C, C) matrix whose row c is the mean of ``softmax(logits / T2)`` over samples of class c.

    During an epoch, :meth:`update` accumulates ``softmax(logits / T2)`` (teacher logits in KD,
    natural logits in adversarial training) into the row of each sample's true class. At epoch end,
    :meth:`end_epoch` all-reduces the sums across processes (when ``torch.distributed`` is
    initialised), row-normalises them and makes them the prior used during the next epoch. Before
    the first epoch ends the prior is uniform. A class with no samples in an epoch keeps its row.
    Sums and prior are buffers, so ``state_dict`` round-trips them (exact resume).
    """

    prior: torch.Tensor
    sums: torch.Tensor
    epochs_completed: torch.Tensor

    def __init__(self, num_classes: int, temperature: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        check_positive("temperature", temperature)
        self.num_classes = num_classes
        self.temperature = temperature
        self.register_buffer(
            "prior", torch.full((num_classes, num_classes), 1.0 / num_classes, dtype=torch.float64)
        )
        self.register_buffer("sums", torch.zeros(num_classes, num_classes, dtype=torch.float64))
        self.register_buffer("epochs_completed", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(
        self, logits: torch.Tensor, target: torch.Tensor, *, check_labels: bool = True
    ) -> None:
        """Add ``softmax(logits / T2)`` of each sample to the row of its true class.

        ``check_labels=False`` skips the label range check (one device synchronisation).
        """
        check_logits("logits", logits, check_finite=False)
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} classes but the ClassPrior has {self.num_classes}"
            )
        check_target(target, logits, check_range=check_labels)
        probs = F.softmax(logits.detach().to(self.sums.dtype) / self.temperature, dim=1)
        self.sums.index_add_(0, target.long(), probs)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """All-reduce the epoch's sums, row-normalise them into the prior, and reset the sums."""
        sums = self.sums
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        row_mass = sums.sum(dim=1, keepdim=True)
        seen = row_mass.squeeze(1) > 0
        self.prior[seen] = sums[seen] / row_mass[seen]
        self.sums.zero_()
        self.epochs_completed += 1

    def rows(self, target: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The prior rows of the samples' true classes, shape (B, C): ``gkl_loss``'s class_prior."""
        return self.prior.to(dtype)[target.long()]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, temperature={self.temperature}"


def class_priors(module: nn.Module) -> list[tuple[str, ClassPrior]]:
    """``(name, prior)`` for every :class:`ClassPrior` inside ``module``."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, ClassPrior)]


def class_prior_for(num_classes: int, *losses: nn.Module | None) -> ClassPrior | None:
    """The one :class:`ClassPrior` that ``losses`` read, or ``None`` when none of them uses one.

    A loss asks for the prior with ``use_class_prior`` and sets its temperature with
    ``temperature2``; losses that share a task share its prior (the same ``softmax(t / T2)``
    statistics feed them all), so their ``temperature2`` must agree.
    """
    users = [m for m in losses if m is not None and getattr(m, "use_class_prior", False)]
    if not users:
        return None
    temperatures = sorted({m.temperature2 for m in users})
    if len(temperatures) > 1:
        names = ", ".join(f"{type(m).__name__}(temperature2={m.temperature2})" for m in users)
        raise ValueError(
            f"{names} read one class prior but ask for different temperatures {temperatures}: "
            "set the same temperature2 (e.g. loss.temperature2 and task.attack_loss.temperature2)"
        )
    return ClassPrior(num_classes, temperature=temperatures[0])
