"""In-memory image datasets and batched uint8 augmentation shared by the data modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from gkl.checks import check_count

BatchTransform = Callable[[Tensor], Tensor]


class ImageTensorDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images held as one uint8 ``(N, C, H, W)`` tensor, served as float ``[0, 1]`` tensors.

    ``batch_transform`` (optional) maps a uint8 ``(B, C, H, W)`` batch to a uint8 batch of the
    same shape (e.g. :class:`RandomCropFlip`). ``__getitems__`` lets the DataLoader fetch a
    whole batch with one tensor indexing op instead of one Python call per sample.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, batch_transform: BatchTransform | None = None
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NCHW, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} != ({images.shape[0]},)")
        self.images = images
        self.labels = labels.long()
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def _batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        images = self.images[index]
        if self.batch_transform is not None:
            images = self.batch_transform(images)
        return images.div(255), self.labels[index]  # uint8 / 255 -> float32, one kernel

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self._batch(torch.tensor([index]))
        return images[0], labels[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        images, labels = self._batch(torch.as_tensor(indices, dtype=torch.long))
        return list(zip(images.unbind(0), labels.unbind(0), strict=True))


class ConcatImageDataset(ConcatDataset):
    """``ConcatDataset`` of :class:`ImageTensorDataset` parts that keeps batched fetching."""

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range for dataset of length {len(self)}")
        ends = torch.as_tensor(self.cumulative_sizes)
        part = torch.searchsorted(ends, index, right=True)
        out: list[Any] = [None] * len(index)
        for p in part.unique().tolist():
            positions = (part == p).nonzero().flatten()
            start = 0 if p == 0 else self.cumulative_sizes[p - 1]
            items = self.datasets[p].__getitems__((index[positions] - start).tolist())
            for pos, item in zip(positions.tolist(), items, strict=True):
                out[pos] = item
        return out


class TransformSubset(Dataset[tuple[Any, int]]):
    """View of ``dataset`` restricted to ``indices``, applying ``transform`` to the image."""

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], transform: Callable[[Any], Tensor]
    ) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[self.indices[index]]
        return self.transform(image), label


class RandomCropFlip:
    """Batched ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` on uint8 NCHW tensors.

    Same distribution as torchvision's per-sample pair (zero padding, offsets uniform in
    ``[0, 2 * padding]``, flip with probability 0.5), drawn from torch's global RNG, which the
    DataLoader seeds per worker.
    """

    def __init__(self, padding: int, flip: bool = True) -> None:
        self.padding = check_count("padding", padding, minimum=0)
        self.flip = flip

    def __call__(self, images: Tensor) -> Tensor:
        n, c, h, w = images.shape
        p = self.padding
        padded = F.pad(images, (p, p, p, p))
        rows = torch.randint(0, 2 * p + 1, (n, 1)) + torch.arange(h)
        cols = torch.randint(0, 2 * p + 1, (n, 1)) + torch.arange(w)
        if self.flip:
            cols = torch.where(torch.rand(n, 1) < 0.5, cols.flip(1), cols)
        return padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(c)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, flip={self.flip})"
