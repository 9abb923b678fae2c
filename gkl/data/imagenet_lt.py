"""ImageNet-LT (Liu et al., 2019): the long-tailed subset of ImageNet given by split files.

``ImageNet_LT_train.txt`` (115,846 images of 1,000 classes, 1,280 down to 5 per class),
``ImageNet_LT_val.txt`` (20,000 images from ImageNet's train folder) and ``ImageNet_LT_test.txt``
(50,000 images of ImageNet's validation set, 50 per class) list one image a line as
``<relative path> <label>``, e.g. ``train/n01440764/n01440764_762.JPEG 0`` or
``val/n01440764/ILSVRC2012_val_00029930.JPEG 0``; the paths are relative to an ImageNet root whose
``val/`` images are sorted into class folders. The authors' GKL distillation on ImageNet-LT
(jiequancui/DKL ``DKLv2/Imbalanced_KD-dkl/imagenetlt_distill_dkl.py``) trains on the train file
and evaluates on the test file after every epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from gkl.data.imagenet import ImageNetDataModule, eval_transform, train_transform

SPLIT_FILES = {
    "train": "ImageNet_LT_train.txt",
    "val": "ImageNet_LT_val.txt",
    "test": "ImageNet_LT_test.txt",
}


def read_split_file(path: str | Path, num_classes: int = 1000) -> list[tuple[str, int]]:
    """The ``(relative path, label)`` pairs of an ImageNet-LT split file, in its order; a line
    that is not ``<path> <label>`` with ``0 <= label < num_classes`` is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet-LT split file {path} not found: put ImageNet_LT_{{train,val,test}}.txt "
            "(from the OLTR release, or jiequancui/DKL Imbalanced_KD-dkl/imagenet_inat/data/"
            "ImageNet_LT/) in data.split_dir"
        )
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected '<relative path> <label>', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise ValueError(
                f"{path}:{number}: label {label} outside [0, {num_classes}) (data.num_classes)"
            )
        samples.append((parts[0], label))
    if not samples:
        raise ValueError(f"ImageNet-LT split file {path} lists no images")
    return samples


class SplitFileDataset(Dataset):
    """Images ``root/<relative path>`` with the labels of a split file, as ``(transform(RGB
    image), label)``; every listed image must exist (checked once, here)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], transform: Callable) -> None:
        missing = [p for p, _ in samples if not (root / p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(samples)} listed images are not under {root}, e.g. "
                f"{missing[:3]}: data.data_dir must be the ImageNet root holding "
                "train/<wnid>/*.JPEG and val/<wnid>/ILSVRC2012_val_*.JPEG (validation images "
                "sorted into class folders)"
            )
        self.root, self.samples, self.transform = root, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        relative, label = self.samples[index]
        with Image.open(self.root / relative) as image:
            return self.transform(image.convert("RGB")), label


class ImageNetLTDataModule(ImageNetDataModule):
    """ImageNet-LT from the split files in ``split_dir`` (default: ``data_dir``) over the ImageNet
    root ``data_dir``. Training: ``ImageNet_LT_train.txt`` with ``RandomResizedCrop(224)`` + flip
    (the authors' ``augmentation_regular``); test: ``ImageNet_LT_test.txt`` with ``Resize(256)``
    + ``CenterCrop(224)``. ``val_size=0`` (the default) validates on the test set, as the authors;
    ``val_size=n`` validates on the first ``n`` images of ``ImageNet_LT_val.txt``.
    ``train_subset`` / ``test_size`` take the first images of their files. Synthetic mode is
    :class:`ImageNetDataModule`'s.
    """

    def __init__(
        self,
        data_dir: str | Path = "data/imagenet",
        *,
        split_dir: str | Path | None = None,
        num_classes: int = 1000,
        **options: Any,
    ) -> None:
        if options.get("test_ids") is not None:
            raise ValueError("data.test_ids does not apply to ImageNet-LT: its test split is fixed")
        super().__init__(data_dir, num_classes=num_classes, **{"val_size": 0, **options})
        self.split_dir = Path(split_dir).expanduser() if split_dir is not None else self.data_dir

    def split(self, name: str) -> list[tuple[str, int]]:
        """The ``(relative path, label)`` pairs of split ``name`` (train, val or test)."""
        return read_split_file(self.split_dir / SPLIT_FILES[name], self.num_classes)

    def _fit_sets(self) -> tuple[Dataset, Dataset | None]:
        if self.is_synthetic:
            return super()._fit_sets()
        samples = self.split("train")[: self.train_subset]
        transform = train_transform() if self.augment else eval_transform()
        train = SplitFileDataset(self.data_dir, samples, transform)
        if not self.val_size:
            return train, None
        val_samples = self.split("val")[: self.val_size]
        return train, SplitFileDataset(self.data_dir, val_samples, eval_transform())

    def _test_set(self) -> Dataset:
        if self.is_synthetic:
            return super()._test_set()
        samples = self.split("test")[: self.test_size]
        return SplitFileDataset(self.data_dir, samples, eval_transform())
