"""ImageNet (or any ImageFolder-layout subset) with the standard ResNet transforms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from gkl.data.base import ImageDataModule
from gkl.data.datasets import TransformSubset


def _to_float() -> list[Callable[[Any], Any]]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]


def train_transform() -> v2.Compose:
    """``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()``, float ``[0, 1]`` output."""
    return v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), *_to_float()])


def eval_transform() -> v2.Compose:
    """``Resize(256)`` + ``CenterCrop(224)``, float ``[0, 1]`` output."""
    return v2.Compose([v2.Resize(256), v2.CenterCrop(224), *_to_float()])


class ImageNetDataModule(ImageDataModule):
    """ImageNet from ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (ImageFolder).

    The validation split is held out from ``train/`` (``val_size`` images, seeded); ``val/`` is
    the test set (``val_size=0`` validates on it, ``val_is_test=True``). ``test_size`` takes a
    seeded random subset of ``val/``. ``num_classes`` must match the number of class folders.
    Synthetic mode yields 224x224 tensors without augmentation.
    """

    input_shape = (3, 224, 224)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        data_dir: str | Path = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        val_size: int = 10000,
        seed: int = 0,
        synthetic: bool = False,
        augment: bool = True,
        pin_memory: bool = False,
        train_subset: int | None = None,
        test_size: int | None = None,
        num_classes: int = 1000,
        synthetic_sizes: Sequence[int] = (512, 256, 256),
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            val_size=val_size,
            seed=seed,
            synthetic=synthetic,
            download=False,
            augment=augment,
            pin_memory=pin_memory,
            train_subset=train_subset,
            test_size=test_size,
            synthetic_sizes=synthetic_sizes,
        )
        self.num_classes = num_classes

    def _folder(self, split: str) -> ImageFolder:
        path = self.data_dir / split
        if not path.is_dir():
            raise FileNotFoundError(
                f"ImageNet {split} directory not found: {path}. Expected the ImageFolder layout "
                f"{self.data_dir}/{{train,val}}/<wnid>/*.JPEG (the val images sorted into class "
                "folders); ImageNet cannot be downloaded automatically, so set data.data_dir to "
                "the directory that holds train/ and val/."
            )
        folder = ImageFolder(str(path))
        if len(folder.classes) != self.num_classes:
            raise ValueError(
                f"{path} has {len(folder.classes)} class folders but num_classes="
                f"{self.num_classes}; set data.num_classes to match"
            )
        train_dir = self.data_dir / "train"
        if split != "train" and train_dir.is_dir() and find_classes(train_dir)[0] != folder.classes:
            raise ValueError(f"class folders of {path} differ from those of {train_dir}")
        return folder

    def _fit_sets(self) -> tuple[Dataset, Dataset | None]:
        if self.is_synthetic:
            return super()._fit_sets()
        folder = self._folder("train")
        train_idx, val_idx = self._split(len(folder))
        train = TransformSubset(
            folder, train_idx.tolist(), train_transform() if self.augment else eval_transform()
        )
        val = TransformSubset(folder, val_idx.tolist(), eval_transform()) if len(val_idx) else None
        return train, val

    def _test_set(self) -> Dataset:
        if self.is_synthetic:
            return super()._test_set()
        folder = self._folder("val")
        indices: Tensor = torch.arange(len(folder))
        if self.test_size is not None:
            gen = torch.Generator().manual_seed(self.seed)
            indices = torch.randperm(len(folder), generator=gen)[: self.test_size].sort().values
        return TransformSubset(folder, indices.tolist(), eval_transform())
