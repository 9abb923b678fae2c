"""CRD's instance-sampling training data (mdistiller's ``CIFAR100InstanceSample`` semantics).

Each training item is ``(image, label, index, sample_index)``: ``index`` the item's position in
the training set (the key of CRD's memory bank) and ``sample_index`` ``k + 1`` positions, the
positive first (``index`` itself in ``exact`` mode, a random item of the same class in ``relax``
mode) then ``k`` negatives drawn uniformly from the items of the other classes (with replacement
only when there are fewer than ``k`` of them).

The draws are a function of ``(seed, epoch, index)`` alone: :class:`EpochKeySampler` hands the
dataset ``(epoch, index)`` keys, so a run resumed mid-epoch (or with worker processes) sees the
same negatives as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from gkl.data.base import EpochSampler

MODES = ("exact", "relax")


class EpochKeySampler(EpochSampler):
    """:class:`EpochSampler` yielding ``(epoch, index)`` keys instead of bare indices."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class InstanceSampleDataset(Dataset):
    """``(image, label, index, sample_index)`` items over a labelled training set."""

    def __init__(
        self, dataset: Dataset, labels: Tensor, k: int, mode: str = "exact", seed: int = 0
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"data.instance_sample_mode={mode!r}; valid choices: {list(MODES)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"data.instance_sample_k={k!r} must be a positive number of negatives")
        labels = torch.as_tensor(labels).long()
        if labels.shape != (len(dataset),):
            raise ValueError(f"{labels.numel()} labels for a dataset of {len(dataset)} items")
        self.dataset, self.labels, self.k, self.mode, self.seed = dataset, labels, k, mode, seed
        order = torch.arange(len(labels))
        classes = labels.unique().tolist()
        self.positives = {c: order[labels == c] for c in classes}
        self.negatives = {c: order[labels != c] for c in classes}

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_index(self, epoch: int, index: int) -> Tensor:
        """The ``k + 1`` sample positions of item ``index`` in ``epoch`` (positive first)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        label = int(self.labels[index])
        positive = index
        if self.mode == "relax":
            pool = self.positives[label]
            positive = int(pool[torch.randint(len(pool), (1,), generator=g)])
        pool = self.negatives[label]
        if self.k > len(pool):
            chosen = torch.randint(len(pool), (self.k,), generator=g)
        else:
            chosen = torch.randperm(len(pool), generator=g)[: self.k]
        return torch.cat([torch.tensor([positive]), pool[chosen]])

    def _items(self, keys: Sequence[tuple[int, int]]) -> list[tuple]:
        indices = [int(i) for _, i in keys]
        if hasattr(self.dataset, "__getitems__"):
            items = self.dataset.__getitems__(indices)
        else:
            items = [self.dataset[i] for i in indices]
        return [
            (x, y, torch.tensor(i), self.sample_index(int(e), i))
            for (x, y), (e, _), i in zip(items, keys, indices, strict=True)
        ]

    def __getitem__(self, key: tuple[int, int] | int) -> tuple:
        return self._items([key if isinstance(key, tuple) else (0, key)])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int] | int]) -> list[tuple]:
        return self._items([k if isinstance(k, tuple) else (0, k) for k in keys])


def instance_sample_set(dataset: Dataset, k: int, mode: str, seed: int) -> InstanceSampleDataset:
    """Wrap a training set that exposes its labels (``labels`` or ``targets``)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        raise ValueError(
            f"CRD's instance sampling needs the training labels, which {type(dataset).__name__} "
            "does not expose (labels / targets); use a CIFAR or Fashion-MNIST data module"
        )
    return InstanceSampleDataset(dataset, torch.as_tensor(labels), k, mode, seed)
