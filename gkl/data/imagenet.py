"""ImageNet (or any ImageFolder-layout subset) with the standard ResNet transforms, and
RobustBench's evaluation protocol: its fixed list of 5,000 validation images and per-model
preprocessing."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from gkl.data.base import ImageDataModule, check_subset_size
from gkl.data.datasets import TransformSubset


class _UnitFloat(torch.nn.Module):
    """uint8 image -> float32 ``x / 255`` (torchvision's ``ToTensor`` arithmetic, bit for bit;
    ``ToDtype(scale=True)`` multiplies by 1/255 and differs in the last bit)."""

    def forward(self, image: Tensor) -> Tensor:
        return image.to(torch.float32).div(255)


def _to_float() -> list[Callable[[Any], Any]]:
    return [v2.ToImage(), v2.ToPureTensor(), _UnitFloat()]


def train_transform() -> v2.Compose:
    """``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()``, float ``[0, 1]`` output."""
    return v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), *_to_float()])


def eval_transform() -> v2.Compose:
    """``Resize(256)`` + ``CenterCrop(224)``, float ``[0, 1]`` output."""
    return v2.Compose([v2.Resize(256), v2.CenterCrop(224), *_to_float()])


# RobustBench's ImageNet preprocessings (robustbench.data.PREPROCESSINGS), by name.
PREPROCESSINGS: dict[str, Callable[[], v2.Compose]] = {
    "Res256Crop224": eval_transform,
    "BicubicRes256Crop224": lambda: v2.Compose(
        [v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224)]
        + _to_float()
    ),
    "Crop288": lambda: v2.Compose([v2.CenterCrop(288), *_to_float()]),
    "Res224": lambda: v2.Compose([v2.Resize([224, 224]), *_to_float()]),
}
ROBUSTBENCH_IDS = "robustbench"  # test_ids: the list shipped with the robustbench package
ROBUSTBENCH_IDS_FILE = "helper_files/imagenet_test_image_ids.txt"


def preprocessing_transform(name: str) -> v2.Compose:
    """RobustBench's ImageNet preprocessing ``name`` (float ``[0, 1]`` output)."""
    if name not in PREPROCESSINGS:
        raise ValueError(
            f"unknown ImageNet preprocessing {name!r}; valid choices: {list(PREPROCESSINGS)}"
        )
    return PREPROCESSINGS[name]()


def robustbench_test_ids_path() -> Path:
    """``helper_files/imagenet_test_image_ids.txt`` of the installed robustbench package (found
    without importing it); ``FileNotFoundError`` saying how to get it otherwise."""
    spec = importlib.util.find_spec("robustbench")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / ROBUSTBENCH_IDS_FILE
        if path.is_file():
            return path
    where = f" (looked in {locations})" if locations else " (robustbench is not installed)"
    raise FileNotFoundError(
        f"RobustBench's ImageNet image list {ROBUSTBENCH_IDS_FILE} was not found{where}. "
        "Install robustbench (bash scripts/install_robustbench.sh) or set data.test_ids=<a copy "
        "of imagenet_test_image_ids.txt>."
    )


def read_test_ids(test_ids: str | Path) -> list[str]:
    """The ``<wnid>/<file>`` lines of an image-id list (``"robustbench"``: RobustBench's)."""
    path = robustbench_test_ids_path() if test_ids == ROBUSTBENCH_IDS else Path(test_ids)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet image list data.test_ids={str(path)!r} not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    malformed = [line for line in ids if line.count("/") != 1]
    if not ids or malformed:
        raise ValueError(
            f"{path} must list images as <wnid>/<file name>, one a line; bad lines: {malformed[:3]}"
        )
    return ids


class ImageListDataset(Dataset):
    """Images ``root/<wnid>/<file>`` in the order of ``ids``; the label of ``<wnid>`` is its
    index among the sorted class folders of ``root`` (as RobustBench's ``CustomImageFolder``)."""

    def __init__(self, root: Path, ids: Sequence[str], transform: Callable) -> None:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        index = {name: i for i, name in enumerate(classes)}
        missing = [i for i in ids if i.split("/")[0] not in index or not (root / i).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(ids)} listed test images are not under {root}, "
                f"e.g. {missing[:3]}: RobustBench's protocol needs these exact validation images "
                "(val/<wnid>/ILSVRC2012_val_*.JPEG)"
            )
        self.root, self.transform, self.classes = root, transform, classes
        self.samples = [(root / i, index[i.split("/")[0]]) for i in ids]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


class ImageNetDataModule(ImageDataModule):
    """ImageNet from ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (ImageFolder).

    The validation split is held out from ``train/`` (``val_size`` images, seeded); ``val/`` is
    the test set (``val_size=0`` validates on it, ``val_is_test=True``). ``test_size`` takes a
    seeded random subset of ``val/``; ``test_ids`` instead takes the images of a list file in
    its order (``"robustbench"``: RobustBench's 5,000 ids from the installed package).
    ``preprocessing`` names the test transform (RobustBench's names, see ``PREPROCESSINGS``).
    ``num_classes`` must match the number of class folders. Synthetic mode yields 224x224 tensors
    without augmentation.
    """

    input_shape = (3, 224, 224)

    def __init__(
        self,
        data_dir: str | Path = "data/imagenet",
        *,
        num_classes: int = 1000,
        test_ids: str | None = None,
        preprocessing: str = "Res256Crop224",
        **options: Any,
    ) -> None:
        """``options``: :class:`ImageDataModule`'s (``batch_size``, ``val_size``, ...); here
        ``batch_size`` defaults to 256, ``num_workers`` to 8, ``val_size`` to 10,000 and
        ``augment`` to true. ImageNet is never downloaded."""
        if options.pop("download", False):
            raise ValueError(
                "data.download=true: ImageNet cannot be downloaded; point data.data_dir at an "
                "ImageFolder copy (train/<wnid>/*, val/<wnid>/*)"
            )
        defaults = {"batch_size": 256, "num_workers": 8, "val_size": 10000, "augment": True}
        super().__init__(data_dir, **{**defaults, **options})
        self.num_classes = num_classes
        if test_ids is not None and self.test_size is not None:
            raise ValueError("give data.test_ids (a fixed image list) or data.test_size, not both")
        preprocessing_transform(preprocessing)  # unknown names fail here, before any work
        self.test_ids = test_ids
        self.preprocessing = preprocessing

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
        if self.test_ids is not None:
            root = self.data_dir / "val"
            if not root.is_dir():
                self._folder("val")  # raises with the expected layout
            transform = preprocessing_transform(self.preprocessing)
            dataset = ImageListDataset(root, read_test_ids(self.test_ids), transform)
            if len(dataset.classes) != self.num_classes:  # labels index the sorted folders
                raise ValueError(
                    f"{root} has {len(dataset.classes)} class folders but num_classes="
                    f"{self.num_classes}; the labels would be wrong (set data.num_classes)"
                )
            return dataset
        folder = self._folder("val")
        indices: Tensor = torch.arange(len(folder))
        if self.test_size is not None:
            check_subset_size("test_size", self.test_size, len(folder), "test")
            gen = torch.Generator().manual_seed(self.seed)
            indices = torch.randperm(len(folder), generator=gen)[: self.test_size].sort().values
        return TransformSubset(
            folder, indices.tolist(), preprocessing_transform(self.preprocessing)
        )
