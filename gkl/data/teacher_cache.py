"""Teacher-output caching (torchdistill-style): logits computed once, served with the batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class TeacherLogitsDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """``(image, label, teacher_logits)`` items from a dataset and its precomputed logits."""

    def __init__(self, dataset: Dataset, logits: Tensor) -> None:
        if len(dataset) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} cached logits for a dataset of {len(dataset)}")
        self.dataset = dataset
        self.logits = logits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        image, label = self.dataset[index]
        return image, label, self.logits[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        if hasattr(self.dataset, "__getitems__"):
            items = self.dataset.__getitems__(indices)
        else:
            items = [self.dataset[i] for i in indices]
        return [(x, y, self.logits[i]) for (x, y), i in zip(items, indices, strict=True)]


@torch.no_grad()
def compute_teacher_logits(
    teacher: nn.Module, dataset: Dataset, *, batch_size: int = 1024, device: torch.device
) -> Tensor:
    """Teacher logits of every item of ``dataset``, in order (needs a deterministic dataset)."""
    if getattr(dataset, "batch_transform", None) is not None:
        raise ValueError(
            "teacher outputs can only be cached for deterministic inputs, but the training set "
            "is augmented: set data.augment=false or task.cache_teacher_outputs=false"
        )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return torch.cat([teacher(batch[0].to(device)).float().cpu() for batch in loader])
