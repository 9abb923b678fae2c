"""CIFAR-10/100 from torchvision's on-disk python-pickle format, with optional generated data."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from gkl.checks import check_number
from gkl.data.base import ImageDataModule, check_label_range
from gkl.data.datasets import BatchTransform, ConcatImageDataset, ImageTensorDataset, RandomCropFlip
from gkl.data.generated import IndexBatchDataset, MixedBatchSampler, load_generated_npz


@dataclass(frozen=True)
class CIFARSpec:
    """Per-dataset constants; file names and md5s come from torchvision's class."""

    title: str
    torchvision_cls: type[CIFAR10]
    label_key: str
    num_classes: int


SPECS = {
    "cifar10": CIFARSpec(
        title="CIFAR-10",
        torchvision_cls=CIFAR10,
        label_key="labels",
        num_classes=10,
    ),
    "cifar100": CIFARSpec(
        title="CIFAR-100",
        torchvision_cls=CIFAR100,
        label_key="fine_labels",
        num_classes=100,
    ),
}


# Every global a CIFAR python batch (torchvision's / the official archives') refers to: numpy's
# array reconstruction. Anything else (os.system, builtins.eval, ...) means a tampered file.
CIFAR_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
    }
)


class CIFARUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, str/bytes/numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle (written by Python 2), with ``str`` keys, without running code."""
    try:
        with path.open("rb") as f:
            entry = CIFARUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a plain CIFAR batch: it refers to {error}, which a CIFAR batch never "
            "holds (a tampered or foreign file), so it was not loaded. Replace it with the "
            "official archive (delete the folder and set data.download=true)."
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(
            f"{path} is not a readable CIFAR batch (truncated or corrupt: {error})"
        ) from None
    if not isinstance(entry, dict):
        raise ValueError(
            f"{path} is not a CIFAR batch: expected a dict, got {type(entry).__name__}"
        )
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def download_cifar(root: str | Path, dataset: str) -> list[str]:
    """Download and extract the official archive with torchvision's ``download`` (its md5
    checks) unless every batch is already there and intact, without letting torchvision unpickle
    anything (its ``CIFAR10.__init__`` reads the batches and the meta file with a plain
    ``pickle.load``); then read the meta file with :class:`CIFARUnpickler`. Returns the class
    names."""
    cls = SPECS[dataset].torchvision_cls
    downloader = cls.__new__(cls)  # no __init__: nothing is unpickled by torchvision
    downloader.root = str(Path(root).expanduser())
    downloader.download()
    return read_cifar_classes(root, dataset)


def read_cifar_classes(root: str | Path, dataset: str) -> list[str]:
    """The class names from ``batches.meta`` (CIFAR-10) / ``meta`` (CIFAR-100), read with the
    restricted unpickler (a tampered file is refused, naming it)."""
    cls = SPECS[dataset].torchvision_cls
    path = Path(root).expanduser() / cls.base_folder / cls.meta["filename"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR meta file missing; set data.download=true")
    entry = _unpickle(path)
    names = entry.get(cls.meta["key"])
    if not isinstance(names, list) or not all(isinstance(n, str | bytes) for n in names):
        raise ValueError(
            f"{path}: not a CIFAR meta file (no list of names under {cls.meta['key']!r})"
        )
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def read_cifar(
    root: str | Path, dataset: str, train: bool, verify_checksums: bool = False
) -> tuple[Tensor, Tensor]:
    """Read ``root/cifar-10-batches-py`` or ``root/cifar-100-python`` like torchvision does.

    Returns ``(uint8 (N, 3, 32, 32) images, int64 labels)``. ``verify_checksums`` checks each
    file against torchvision's md5 (the official archives).
    """
    spec = SPECS[dataset]
    cls = spec.torchvision_cls
    folder = Path(root).expanduser() / cls.base_folder
    files = cls.train_list if train else cls.test_list
    missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{spec.title} not found: missing {missing} in {folder}. Set data.download=true to "
            f"download it into {Path(root).expanduser()}, or point data.data_dir at the "
            f"directory that contains {cls.base_folder}/."
        )
    images, labels = [], []
    for name, md5 in files:
        path = folder / name
        if verify_checksums and not check_integrity(str(path), md5):
            raise ValueError(
                f"{path} failed its md5 check (expected {md5}): delete it and set "
                "data.download=true, or set data.verify_checksums=false"
            )
        entry = _unpickle(path)
        missing_keys = {"data", spec.label_key} - set(entry)
        if missing_keys:
            raise ValueError(f"{path}: not a {spec.title} batch, missing {sorted(missing_keys)}")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: 'data' must be (N, 3072) uint8, got {data.shape}")
        batch_labels = np.asarray(entry[spec.label_key])
        if batch_labels.shape != (len(data),):
            raise ValueError(
                f"{path}: {len(data)} images but {batch_labels.size} labels "
                f"('{spec.label_key}'); the file is corrupt: replace it with the official archive"
            )
        check_label_range(path, batch_labels, spec.num_classes)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    label_tensor = torch.as_tensor(np.concatenate(labels), dtype=torch.long)
    return torch.from_numpy(np.concatenate(images)), label_tensor


class CIFARDataModule(ImageDataModule):
    """CIFAR-10/100 (50k train / 10k test, 3x32x32) from torchvision's on-disk format.

    Training batches get ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` (applied
    batched on uint8 tensors) when ``augment``; no normalisation. ``val_size=0`` validates on the
    test set (``val_is_test=True``, the authors' recipe). With ``generated_path`` (a DM-AT
    ``.npz``) each training batch holds ``round(generated_fraction * batch_size)`` generated
    images and the rest real ones; an epoch is one pass over the real training split.
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        dataset: str = "cifar10",
        data_dir: str | Path = "data",
        *,
        generated_path: str | Path | None = None,
        generated_fraction: float = 0.7,
        verify_checksums: bool = False,
        **options: Any,
    ) -> None:
        """``options``: :class:`ImageDataModule`'s (``batch_size``, ``val_size``, ...); here
        ``augment`` defaults to true and ``num_workers`` to 4."""
        if dataset not in SPECS:
            raise ValueError(f"dataset must be one of {sorted(SPECS)}, got {dataset!r}")
        super().__init__(data_dir, **{"augment": True, "num_workers": 4, **options})
        self.dataset = dataset
        self.spec = SPECS[dataset]
        self.num_classes = self.spec.num_classes
        self.verify_checksums = verify_checksums
        self.generated_path = generated_path
        self.generated_fraction = generated_fraction
        self.generated_set: ImageTensorDataset | None = None
        if generated_path is not None:
            check_number(
                "data.generated_fraction",
                generated_fraction,
                low=0,
                high=1,
                low_open=True,
                high_open=True,
            )

    def prepare_data(self) -> None:
        """Download and md5-check the archive with torchvision when ``download=True``; the files
        are then read by gkl's restricted unpickler only (:func:`download_cifar`)."""
        if self.download and not self.is_synthetic:
            download_cifar(self.data_dir, self.dataset)

    def _read_split(self, train: bool) -> tuple[Tensor, Tensor]:
        return read_cifar(self.data_dir, self.dataset, train, self.verify_checksums)

    def _batch_augment(self) -> BatchTransform:
        return RandomCropFlip(padding=4)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits for ``stage`` and, for fitting, the generated data."""
        super().setup(stage)
        path = self.generated_path
        if path is not None and self.train_set is not None and self.generated_set is None:
            images, labels = load_generated_npz(path, self.num_classes, self.input_shape)
            augment = self._batch_augment() if self.augment else None
            self.generated_set = ImageTensorDataset(images, labels, augment)

    def train_dataloader(self) -> DataLoader:
        """Real-only shuffled loader, or fixed real/generated mixing with ``generated_path``."""
        if self.generated_set is None:
            return super().train_dataloader()
        train_set = self._require(self.train_set, "train_set")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = MixedBatchSampler(
            num_real=len(train_set),
            num_generated=len(self.generated_set),
            batch_size=self.batch_size,
            fraction=self.generated_fraction,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
        )
        if self._resume_position is not None:  # restored from a checkpoint: continue there
            sampler.resume(*self._resume_position)
            self._resume_position = None
        elif trainer is not None:  # reloaded loaders continue the epoch sequence
            sampler.set_epoch(trainer.current_epoch)
        return DataLoader(
            IndexBatchDataset(ConcatImageDataset([train_set, self.generated_set])),
            batch_size=None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),
            **self._loader_kwargs(),
        )
