"""A second, strongly augmented view of each training image (the authors' ``--aug autoaug``).

The GKL-AT code (jiequancui/DKL, ``dataset/cifar.py`` CIFAR10V2 / CIFAR100V2) serves every
training image twice: view 1 with ``RandomCrop(32, 4)`` + ``RandomHorizontalFlip``, view 2 with
the same crop and flip followed by their ``autoaug.CIFAR10Policy`` (``--aug autoaug``;
:mod:`gkl.data.autoaugment`, policy name ``authors_cifar10``) or by Cutout (``--aug cutout``).
torchvision's policies stay selectable (``torchvision_cifar10``, ``torchvision_imagenet``).
Batches are ``(x, y, x_aug)``; :class:`gkl.tasks.AdversarialTask` trains on both views.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import AutoAugment, AutoAugmentPolicy

from gkl.data.autoaugment import CIFAR10Policy
from gkl.data.cifar import CIFARDataModule
from gkl.data.datasets import ImageTensorDataset, RandomCropFlip


class PILPolicy:
    """A policy on PIL images applied to one uint8 ``(C, H, W)`` tensor (round trip exact)."""

    def __init__(self, policy: Callable[[Image.Image], Image.Image]) -> None:
        self.policy = policy

    def __call__(self, image: Tensor) -> Tensor:
        out = self.policy(Image.fromarray(image.permute(1, 2, 0).numpy()))
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)


# Name -> per-image uint8 (C, H, W) transform.
POLICIES: dict[str, Callable[[], Callable[[Tensor], Tensor]]] = {
    "authors_cifar10": lambda: PILPolicy(CIFAR10Policy()),
    "torchvision_cifar10": lambda: AutoAugment(AutoAugmentPolicy.CIFAR10),
    "torchvision_imagenet": lambda: AutoAugment(AutoAugmentPolicy.IMAGENET),
}


def cutout(images: Tensor, length: int) -> Tensor:
    """Cutout (DeVries & Taylor, 2017; the authors' ``Cutout(n_holes=1, length)``): zero the
    square ``[cy - length//2, cy + length//2) x [cx - length//2, cx + length//2)``, clipped to
    the image, centre uniform over the pixels, independently per image of a ``(B, C, H, W)``
    batch."""
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n, 1))
    cx = torch.randint(0, w, (n, 1))
    rows, cols = torch.arange(h), torch.arange(w)
    inside_y = (rows >= cy - length // 2) & (rows < cy + length // 2)  # (n, h)
    inside_x = (cols >= cx - length // 2) & (cols < cx + length // 2)  # (n, w)
    hole = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return images.masked_fill(hole, 0)


class SecondView:
    """uint8 ``(B, C, H, W)`` -> crop + flip, then the AutoAugment policy ``autoaugment`` per
    image (a name of :data:`POLICIES` or null), then Cutout of side ``cutout`` (0: none)."""

    def __init__(
        self, autoaugment: str | None = "authors_cifar10", cutout: int = 0, padding: int = 4
    ):
        if autoaugment is not None and autoaugment not in POLICIES:
            raise ValueError(
                f"data.second_view.autoaugment={autoaugment!r}; valid: {sorted(POLICIES)} or null"
            )
        if cutout < 0:
            raise ValueError(f"data.second_view.cutout must be >= 0 (0: off), got {cutout}")
        self.crop_flip = RandomCropFlip(padding=padding)
        self.autoaugment = POLICIES[autoaugment]() if autoaugment else None
        self.cutout = cutout

    def __call__(self, images: Tensor) -> Tensor:
        images = self.crop_flip(images)
        if self.autoaugment is not None:
            images = torch.stack([self.autoaugment(image) for image in images])
        return cutout(images, self.cutout) if self.cutout else images


class TwoViewDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """``(view 1, label, view 2)`` of an :class:`ImageTensorDataset` (view 1: its own
    ``batch_transform``; view 2: ``second``), as float ``[0, 1]`` tensors, fetched batched."""

    def __init__(self, base: ImageTensorDataset, second: SecondView) -> None:
        self.base = base
        self.second = second

    def __len__(self) -> int:
        return len(self.base)

    def _batch(self, index: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        images = self.base.images[index]
        first = self.base.batch_transform(images) if self.base.batch_transform else images
        second = self.second(images)
        rows = zip(first.div(255).unbind(0), self.base.labels[index].unbind(0), strict=True)
        return [(a, y, b) for (a, y), b in zip(rows, second.div(255).unbind(0), strict=True)]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self._batch(torch.tensor([index]))[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        return self._batch(torch.as_tensor(indices, dtype=torch.long))


class TwoViewCIFARDataModule(CIFARDataModule):
    """:class:`CIFARDataModule` whose training batches are ``(x, y, x_aug)``: ``x_aug`` is
    :class:`SecondView` of the same images (``second_view``: ``autoaugment`` policy name or
    null, ``cutout`` side or 0). Validation and test batches are unchanged."""

    def __init__(self, *args: Any, second_view: Mapping[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.second_view = SecondView(**dict(second_view or {}))
        if kwargs.get("generated_path") is not None:
            raise ValueError("a second view is not combined with data.generated_path")

    def _fit_sets(self) -> tuple[Dataset, Dataset | None]:
        train, val = super()._fit_sets()
        return TwoViewDataset(train, self.second_view), val
