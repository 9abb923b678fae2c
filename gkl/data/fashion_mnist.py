"""Fashion-MNIST from the raw IDX files, held in memory as uint8 tensors."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gkl.data.base import ImageDataModule, check_label_range
from gkl.data.datasets import BatchTransform, RandomCropFlip

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); replace it "
            "(`sudo apt-get install --reinstall dataset-fashion-mnist`, or delete it and set "
            "data.download=true)"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} but has {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (60k train / 10k test, 1x28x28, 10 classes) read offline with numpy.

    Looks for the four IDX files (``.gz`` or uncompressed) in ``data_dir`` (the Debian package
    ``dataset-fashion-mnist`` layout) and then in torchvision's ``data_dir/FashionMNIST/raw``.
    ``download=True`` fetches them with torchvision into ``data_dir`` when both are missing.
    ``augment=True`` applies ``RandomCrop(28, padding=2)`` + horizontal flip to training batches.
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, data_dir: str | Path = DEFAULT_DIR, **options: Any) -> None:
        """``options``: :class:`ImageDataModule`'s (``batch_size``, ``val_size``, ...)."""
        super().__init__(data_dir, **options)

    def _search_dirs(self) -> tuple[Path, Path]:
        return self.data_dir, self.data_dir / "FashionMNIST" / "raw"

    def _locate(self) -> dict[str, Path] | None:
        """Paths of the four IDX files from the first search directory holding all of them."""
        for directory in self._search_dirs():
            found = {name: _find(directory, name) for name in FILES[True] + FILES[False]}
            if None not in found.values():
                return {name: path for name, path in found.items() if path is not None}
        return None

    def prepare_data(self) -> None:
        """Download with torchvision when asked to and the files are not already there."""
        if self.download and not self.is_synthetic and self._locate() is None:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(self.data_dir), train=True, download=True)

    def _read_split(self, train: bool) -> tuple[Tensor, Tensor]:
        files = self._locate()
        if files is None:
            looked = " and ".join(str(d) for d in self._search_dirs())
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files ({', '.join(FILES[True] + FILES[False])}, .gz or "
                f"uncompressed) not found in {looked}. Fix: `sudo apt-get install "
                f"dataset-fashion-mnist` (installs them in {DEFAULT_DIR}), or set "
                f"data.download=true to download them with torchvision into {self.data_dir}."
            )
        image_name, label_name = FILES[train]
        image_path, label_path = files[image_name], files[label_name]
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{image_path} holds images of shape {images.shape}; Fashion-MNIST's are "
                "(N, 28, 28): replace the file"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"{label_path} has {labels.size} labels (shape {labels.shape}) but {image_path} "
                f"has {len(images)} images: one of the files is corrupt or from another split"
            )
        check_label_range(label_path, labels, self.num_classes)
        images_nchw = torch.from_numpy(images).unsqueeze(1)
        return images_nchw, torch.from_numpy(labels.astype(np.int64))

    def _batch_augment(self) -> BatchTransform:
        return RandomCropFlip(padding=2)
