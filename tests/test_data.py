"""Tests for gkl.data: real on-disk formats, synthetic mode, seeded splits, generated mixing."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from gkl.data import (
    CIFARDataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    MixedBatchSampler,
    RandomCropFlip,
    load_generated_npz,
    read_cifar,
    read_idx,
    split_indices,
)

ROOT = Path(__file__).resolve().parents[1]


# --- helpers: writers for the real on-disk formats ----------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (gzipped when ``path`` ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fmnist(directory: Path, train: tuple, test: tuple, suffix: str = "") -> None:
    """Write the four Fashion-MNIST IDX files from ``(images, labels)`` pairs."""
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


class Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str``, as in the official CIFAR python archives."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_py2(obj: Any, path: Path) -> None:
    with path.open("wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def write_cifar(root: Path, dataset: str, train: tuple, test: tuple) -> None:
    """Write ``(NHWC uint8, labels)`` train/test splits in torchvision's CIFAR layout."""

    def batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict[bytes, Any]:
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        entry: dict[bytes, Any] = {
            b"batch_label": name.encode(),
            b"data": np.ascontiguousarray(data),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
        }
        if dataset == "cifar10":
            entry[b"labels"] = [int(y) for y in labels]
        else:
            entry[b"fine_labels"] = [int(y) for y in labels]
            entry[b"coarse_labels"] = [int(y) // 5 for y in labels]
        return entry

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        chunks = zip(np.array_split(train[0], 5), np.array_split(train[1], 5), strict=True)
        for i, (images, labels) in enumerate(chunks, start=1):
            dump_py2(batch(images, labels, f"training batch {i} of 5"), folder / f"data_batch_{i}")
        dump_py2(batch(*test, "testing batch 1 of 1"), folder / "test_batch")
        names = [f"class{i}".encode() for i in range(10)]
        meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
        dump_py2(meta, folder / "batches.meta")
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump_py2(batch(*train, "training batch 1 of 1"), folder / "train")
        dump_py2(batch(*test, "testing batch 1 of 1"), folder / "test")
        meta = {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        }
        dump_py2(meta, folder / "meta")


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def collect(loader: Any) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def to_uint8(x: Tensor) -> Tensor:
    return (x * 255).round().to(torch.uint8)


def rows(images: Tensor, labels: Tensor) -> Tensor:
    """Rows ``(label, pixels...)`` sorted, to compare sample multisets."""
    table = torch.cat([labels[:, None], images.flatten(1).long()], dim=1)
    return torch.unique(table, dim=0)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def foolbox_wheel() -> Iterator[zipfile.ZipFile]:
    """The foolbox 3.3.4 wheel (real test images), via scripts/fetch_test_assets.sh."""
    script = ROOT / "scripts" / "fetch_test_assets.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if proc.returncode != 0:
        message = f"`bash {script}` failed (needs PyPI): {proc.stderr.strip()[-400:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with zipfile.ZipFile(proc.stdout.strip().splitlines()[-1]) as wheel:
        yield wheel


def foolbox_images(wheel: zipfile.ZipFile, prefix: str) -> tuple[list[Image.Image], np.ndarray]:
    """The wheel's ``foolbox/data/<prefix>_<idx>_<label>.*`` images in index order."""
    pattern = re.compile(rf"foolbox/data/{prefix}_(\d+)_(\d+)\.(png|jpg)")
    found = sorted(
        (int(m[1]), int(m[2]), name) for name in wheel.namelist() if (m := pattern.fullmatch(name))
    )
    assert len(found) == 20, f"expected 20 {prefix} images in the wheel, found {len(found)}"
    images = [Image.open(io.BytesIO(wheel.read(name))) for _, _, name in found]
    return images, np.array([label for _, label, _ in found])


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory, foolbox_wheel: zipfile.ZipFile) -> dict:
    """CIFAR-10 and CIFAR-100 archives (12 train / 8 test real images each) in one root."""
    root = tmp_path_factory.mktemp("cifar")
    expected = {}
    for dataset in ("cifar10", "cifar100"):
        pil, labels = foolbox_images(foolbox_wheel, dataset)
        images = np.stack([np.asarray(im.convert("RGB")) for im in pil])
        train, test = (images[:12], labels[:12]), (images[12:], labels[12:])
        write_cifar(root, dataset, train, test)
        expected[dataset] = {"train": train, "test": test}
    return {"root": root, "expected": expected}


@pytest.fixture
def tiny_fmnist(tmp_path: Path) -> Path:
    """Random Fashion-MNIST-shaped data (100 train / 30 test), uncompressed, torchvision layout."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (100, 28, 28)), rng.integers(0, 10, 100)
    test = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 10, 30)
    write_fmnist(tmp_path / "FashionMNIST" / "raw", train, test)
    return tmp_path


def nhwc_to_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


# --- Fashion-MNIST ------------------------------------------------------------------------------


@pytest.mark.needs_fmnist
def test_fashion_mnist_real_files() -> None:
    dm = FashionMNISTDataModule(batch_size=256)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    assert not dm.is_synthetic and not dm.val_is_test
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    for images, labels in (
        (dm.train_set.images, dm.train_set.labels),
        (dm.test_set.images, dm.test_set.labels),
    ):
        assert labels.min() == 0 and labels.max() == 9
        assert images.shape[1:] == (1, 28, 28)
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10


@pytest.mark.needs_fmnist
def test_fashion_mnist_matches_foolbox_pngs(foolbox_wheel: zipfile.ZipFile) -> None:
    pil, labels = foolbox_images(foolbox_wheel, "fashionMNIST")
    dm = FashionMNISTDataModule(test_size=20)
    dm.setup("test")
    x, y = collect(dm.test_dataloader())
    assert torch.equal(to_uint8(x)[:, 0], torch.from_numpy(np.stack([np.asarray(p) for p in pil])))
    assert y.tolist() == labels.tolist()


def test_fashion_mnist_torchvision_layout_and_split(tiny_fmnist: Path) -> None:
    raw = tiny_fmnist / "FashionMNIST" / "raw"
    dm = FashionMNISTDataModule(tiny_fmnist, batch_size=16, val_size=20, test_size=25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (80, 20, 25)
    train_images = torch.from_numpy(read_idx(raw / "train-images-idx3-ubyte")).unsqueeze(1)
    train_idx, val_idx = split_indices(100, 20, seed=0)
    assert torch.equal(dm.val_set.images, train_images[val_idx])
    x, _ = collect(dm.val_dataloader())
    assert torch.equal(to_uint8(x), train_images[val_idx])


def test_fashion_mnist_missing_files_error(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert str(tmp_path / "nowhere" / "FashionMNIST" / "raw") in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "data.download=true" in message


def test_fashion_mnist_download_uses_torchvision_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``download=True`` goes through torchvision; its own IDX reader must agree with ours."""
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 10, 40)
    test = rng.integers(0, 256, (10, 28, 28)), rng.integers(0, 10, 10)
    calls = []

    def fake_download(self: torchvision.datasets.FashionMNIST) -> None:
        calls.append(self.raw_folder)
        write_fmnist(Path(self.raw_folder), train, test)

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    dm = FashionMNISTDataModule(tmp_path, download=True, val_size=10)
    dm.prepare_data()
    dm.prepare_data()  # files present now: no second download
    assert len(calls) == 1
    dm.setup()
    tv = torchvision.datasets.FashionMNIST(str(tmp_path), train=False)
    assert torch.equal(dm.test_set.images[:, 0], tv.data)
    assert torch.equal(dm.test_set.labels, tv.targets)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 4) + bytes(16))  # float32 IDX
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(bad)
    short = tmp_path / "short-idx.gz"
    short.write_bytes(gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + bytes(3)))
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)


# --- CIFAR --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_fixture_is_torchvision_format(
    cifar_root: dict, dataset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's own CIFAR reader (md5 check off) reads the fixture like ours does."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    for train in (True, False):
        tv = cls(str(cifar_root["root"]), train=train)
        images, labels = read_cifar(cifar_root["root"], dataset, train)
        assert torch.equal(images, torch.from_numpy(tv.data).permute(0, 3, 1, 2))
        assert labels.tolist() == tv.targets
    assert len(tv.classes) == (10 if dataset == "cifar10" else 100)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_real_images_load(cifar_root: dict, dataset: str) -> None:
    expected = cifar_root["expected"][dataset]
    dm = CIFARDataModule(
        dataset, cifar_root["root"], batch_size=5, num_workers=0, val_size=3, augment=False
    )
    assert (dm.num_classes, dm.input_shape) == ((10 if dataset == "cifar10" else 100), (3, 32, 32))
    dm.setup()
    test_images, test_labels = nhwc_to_tensor(expected["test"][0]), expected["test"][1]
    x, y = collect(dm.test_dataloader())
    assert x.dtype == torch.float32 and torch.equal(x, test_images.div(255))
    assert y.tolist() == test_labels.tolist()
    train_images = nhwc_to_tensor(expected["train"][0])
    train_labels = torch.from_numpy(expected["train"][1])
    train_idx, val_idx = split_indices(12, 3, seed=0)
    x, y = collect(dm.val_dataloader())
    assert torch.equal(to_uint8(x), train_images[val_idx])
    assert torch.equal(y, train_labels[val_idx])
    x, y = collect(dm.train_dataloader())
    assert len(y) == 9
    assert torch.equal(rows(to_uint8(x), y), rows(train_images[train_idx], train_labels[train_idx]))


def test_cifar_val_size_zero_validates_on_test(cifar_root: dict) -> None:
    dm = CIFARDataModule("cifar10", cifar_root["root"], num_workers=0, val_size=0)
    with pytest.warns(UserWarning, match="val_is_test"):
        dm.setup("fit")
    assert dm.val_is_test and dm.val_set is dm.test_set
    assert len(dm.train_set) == 12 and len(dm.val_set) == 8


def test_cifar_verify_checksums_rejects_non_official_files(cifar_root: dict) -> None:
    with pytest.raises(ValueError, match="md5"):
        read_cifar(cifar_root["root"], "cifar100", train=True, verify_checksums=True)


def test_cifar_missing_files_error(tmp_path: Path) -> None:
    dm = CIFARDataModule("cifar100", tmp_path, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    assert str(tmp_path / "cifar-100-python") in str(err.value)
    assert "data.download=true" in str(err.value)
    with pytest.raises(ValueError, match="dataset must be one of"):
        CIFARDataModule("cifar1000")


def test_cifar_download_goes_through_torchvision(
    tmp_path: Path, cifar_root: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = cifar_root["expected"]["cifar10"]
    calls = []

    def fake_download(self: torchvision.datasets.CIFAR10) -> None:
        calls.append(self.root)
        write_cifar(Path(self.root), "cifar10", expected["train"], expected["test"])

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", fake_download)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    CIFARDataModule("cifar10", tmp_path, download=False).prepare_data()
    assert calls == []
    dm = CIFARDataModule("cifar10", tmp_path, download=True, num_workers=0, val_size=2)
    dm.prepare_data()
    assert calls == [str(tmp_path)]
    dm.setup("test")
    assert torch.equal(dm.test_set.images, nhwc_to_tensor(expected["test"][0]))


# --- ImageNet -----------------------------------------------------------------------------------


def test_imagenet_folder_layout(tmp_path: Path, foolbox_wheel: zipfile.ZipFile) -> None:
    pil, labels = foolbox_images(foolbox_wheel, "imagenet")
    for split in ("train", "val"):
        for i, (image, label) in enumerate(zip(pil, labels, strict=True)):
            (tmp_path / split / f"{label:04d}").mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / split / f"{label:04d}" / f"{i}.jpg", quality=95)
    classes = sorted({f"{label:04d}" for label in labels})
    dm = ImageNetDataModule(
        tmp_path, batch_size=4, num_workers=0, val_size=4, test_size=6, num_classes=len(classes)
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    x, y = collect(dm.test_dataloader())
    reference = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(256),
            torchvision.transforms.CenterCrop(224),
            torchvision.transforms.ToTensor(),
        ]
    )
    for image, label, (index, (path, target)) in zip(
        x, y, ((i, dm.test_set.dataset.samples[i]) for i in dm.test_set.indices), strict=True
    ):
        assert label == target and classes[target] == Path(path).parent.name
        assert torch.allclose(image, reference(Image.open(path).convert("RGB")), atol=1e-6), index
    with pytest.raises(ValueError, match="num_classes"):
        ImageNetDataModule(tmp_path, num_classes=1000).setup("test")


def test_imagenet_missing_dir_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ImageNetDataModule(tmp_path / "imagenet").setup("fit")
    assert str(tmp_path / "imagenet" / "train") in str(err.value)
    assert "data.data_dir" in str(err.value)


# --- synthetic mode, splits, loaders ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "classes", "shape"),
    [
        (FashionMNISTDataModule, {}, 10, (1, 28, 28)),
        (CIFARDataModule, {"dataset": "cifar10", "download": True}, 10, (3, 32, 32)),
        (CIFARDataModule, {"dataset": "cifar100"}, 100, (3, 32, 32)),
        (ImageNetDataModule, {"synthetic_sizes": (32, 8, 8)}, 1000, (3, 224, 224)),
    ],
)
def test_synthetic_mode(cls: type, kwargs: dict, classes: int, shape: tuple) -> None:
    dm = cls(data_dir="/nonexistent", synthetic=True, batch_size=8, num_workers=0, **kwargs)
    dm.prepare_data()  # no download in synthetic mode
    dm.setup()
    assert dm.is_synthetic and dm.num_classes == classes and dm.input_shape == shape
    n_train, n_val, n_test = dm.synthetic_sizes
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (n_train, n_val, n_test)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, *shape) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < classes
    if n_train >= classes:
        assert torch.unique(dm.train_set.labels).numel() == classes


def test_split_is_seeded(tiny_fmnist: Path) -> None:
    def val_images(seed: int) -> Tensor:
        dm = FashionMNISTDataModule(tiny_fmnist, val_size=20, seed=seed)
        dm.setup("fit")
        return dm.val_set.images

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))
    train, val = split_indices(10, 3, seed=5)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(10)) and len(val) == 3
    with pytest.raises(ValueError, match="val_size"):
        split_indices(10, 10, seed=0)


def test_train_loader_is_seeded_and_reshuffles(tiny_fmnist: Path) -> None:
    def label_order(seed: int) -> list[list[int]]:
        dm = FashionMNISTDataModule(tiny_fmnist, batch_size=100, val_size=0, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        orders = []
        for epoch in range(2):  # Lightning calls set_epoch at each epoch start
            loader.sampler.set_epoch(epoch)
            orders.append(next(iter(loader))[1].tolist())
        return orders

    with pytest.warns(UserWarning, match="val_is_test"):
        first, again, other = label_order(0), label_order(0), label_order(3)
    assert first == again and first != other
    assert first[0] != first[1] and sorted(first[0]) == sorted(first[1])


def test_train_subset_and_workers(tiny_fmnist: Path) -> None:
    dm = FashionMNISTDataModule(tiny_fmnist, val_size=20, train_subset=30, num_workers=2)
    dm.setup("fit")
    assert len(dm.train_set) == 30
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    dm = FashionMNISTDataModule(tiny_fmnist, val_size=20)
    dm.setup("fit")
    assert dm.train_dataloader().num_workers == 0 and not dm.train_dataloader().persistent_workers


def test_random_crop_flip_matches_torchvision_semantics() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (150, 3, 32, 32), dtype=torch.uint8)
    out = RandomCropFlip(padding=4)(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = TF.pad(images, [4])
    matched = torch.zeros(len(images), dtype=torch.long)
    seen = set()
    for top in range(9):
        for left in range(9):
            crop = TF.crop(padded, top, left, 32, 32)
            for flip, candidate in ((False, crop), (True, TF.horizontal_flip(crop))):
                hit = (candidate == out).flatten(1).all(1)
                matched += hit
                if hit.any():
                    seen.add((top, left, flip))
    assert (matched >= 1).all()
    assert {t for t, _, _ in seen} == set(range(9)) == {left for _, left, _ in seen}
    assert {f for _, _, f in seen} == {False, True}


# --- generated-data mixing ----------------------------------------------------------------------


def test_mixed_batch_sampler_composition() -> None:
    sampler = MixedBatchSampler(num_real=100, num_generated=40, batch_size=10, fraction=0.7)
    assert (sampler.n_real, sampler.n_generated, len(sampler)) == (3, 7, 33)
    epoch0 = list(sampler)
    assert len(epoch0) == 33
    for batch in epoch0:
        assert len(batch) == 10
        assert sum(i < 100 for i in batch) == 3 and sum(i >= 100 for i in batch) == 7
    real = [i for b in epoch0 for i in b if i < 100]
    assert len(set(real)) == len(real) == 99
    generated = [i - 100 for b in epoch0 for i in b if i >= 100]
    assert all(0 <= g < 40 for g in generated) and len(set(generated[:40])) == 40
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    replay = MixedBatchSampler(100, 40, 10, 0.7, seed=0)
    assert list(replay) == epoch0
    assert MixedBatchSampler(50000, 10**6, 128, 0.7).n_generated == 90
    for fraction in (0.0, 1.0, 0.01):
        with pytest.raises(ValueError, match="generated"):
            MixedBatchSampler(100, 40, 10, fraction)


def test_generated_mixing_through_the_module(tmp_path: Path) -> None:
    path = write_npz(
        tmp_path / "gen.npz",
        image=np.full((30, 32, 32, 3), 255, dtype=np.uint8),
        label=np.arange(30) % 10,
    )
    dm = CIFARDataModule(
        "cifar10",
        tmp_path,
        batch_size=10,
        num_workers=0,
        synthetic=True,
        augment=False,
        generated_path=path,
        generated_fraction=0.7,
        synthetic_sizes=(64, 16, 16),
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 64 // 3
    for x, _ in batches:
        assert x.shape == (10, 3, 32, 32)
        is_generated = (x == 1.0).flatten(1).all(1)
        assert is_generated.sum() == 7 and not is_generated[:3].any()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"images": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4, int)}, "'image'"),
        ({"image": np.zeros((4, 32, 32, 3), np.float32), "label": np.zeros(4, int)}, "uint8"),
        ({"image": np.zeros((4, 3, 32, 32), np.uint8), "label": np.zeros(4, int)}, "NHWC"),
        ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(3, int)}, "'label'"),
        ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.zeros(4)}, "integers"),
        ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.full(4, 10)}, "outside"),
        ({"image": np.zeros((4, 32, 32, 3), np.uint8), "label": np.full(4, -1)}, "outside"),
    ],
)
def test_bad_generated_npz(tmp_path: Path, arrays: dict, match: str) -> None:
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_generated_npz(path, num_classes=10, image_shape=(3, 32, 32))


def test_generated_npz_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_generated_npz(tmp_path / "missing.npz", 10, (3, 32, 32))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_generated_npz(tmp_path / "text.npz", 10, (3, 32, 32))
    ok = write_npz(
        tmp_path / "ok.npz", image=np.zeros((4, 32, 32, 3), np.uint8), label=np.full(4, 42)
    )
    images, labels = load_generated_npz(ok, 100, (3, 32, 32))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    dm = CIFARDataModule("cifar10", synthetic=True, num_workers=0, generated_path=ok)
    with pytest.raises(ValueError, match="outside"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="generated_fraction"):
        CIFARDataModule("cifar10", generated_path=ok, generated_fraction=1.0)


def test_train_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch(tiny_fmnist: Path):
    def epoch_batches(dm: FashionMNISTDataModule, epoch: int) -> list[list[int]]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [batch[1].tolist() for batch in loader]

    dm = FashionMNISTDataModule(tiny_fmnist, batch_size=7, val_size=10, seed=4)
    dm.setup("fit")
    full = epoch_batches(dm, 3)
    assert epoch_batches(dm, 3) == full and epoch_batches(dm, 2) != full
    # A checkpoint taken after 2 batches of epoch 3 resumes with batch 3 of that epoch.
    dm.load_state_dict({"epoch": 3, "batches_done": 2})
    assert epoch_batches(dm, 3) == full[2:]
    assert epoch_batches(dm, 3) == full  # the skip applies once
