"""Mixing diffusion-generated images into training batches (DM-AT ``.npz`` format)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler


def load_generated_npz(
    path: str | Path, num_classes: int, image_shape: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """Load and validate a DM-AT ``.npz``: ``image`` uint8 ``(N, H, W, C)``, ``label`` int ``(N,)``.

    Returns ``(uint8 NCHW images, int64 labels)``; ``image_shape`` is the expected ``(C, H, W)``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"generated data file not found: {path} (data.generated_path)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable .npz archive (np.savez output expected)")
    with np.load(path, allow_pickle=False) as archive:
        missing = {"image", "label"} - set(archive.files)
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {sorted(missing)}; a DM-AT .npz needs 'image' "
                f"(uint8 N x H x W x C) and 'label' (int N), found {sorted(archive.files)}"
            )
        images, labels = archive["image"], archive["label"]
    c, h, w = image_shape
    if images.dtype != np.uint8 or images.shape[1:] != (h, w, c):
        raise ValueError(
            f"{path}: 'image' must be uint8 of shape (N, {h}, {w}, {c}) (NHWC), "
            f"got {images.dtype} {images.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{path}: 'label' must be integers of shape ({images.shape[0]},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if len(labels) == 0:
        raise ValueError(f"{path}: contains no samples")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{path}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes - 1}]"
            f" for a {num_classes}-class dataset"
        )
    tensor_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return tensor_images, torch.from_numpy(labels.astype(np.int64))


class MixedBatchSampler(DistributedSampler):
    """Batches of ``batch_size - n_gen`` real and ``n_gen = round(fraction * batch_size)``
    generated indices over ``ConcatDataset([real, generated])`` (generated offset by ``num_real``),
    sharded over ``num_replicas`` processes and resumable part-way through an epoch.

    An epoch is ``num_real // n_real`` batches in all: each real sample appears at most once, the
    remainder is dropped. Generated samples are drawn without replacement, a fresh permutation
    whenever one runs out. Process ``rank`` takes batches ``rank, rank + num_replicas, ...`` of
    the epoch (``(num_real // n_real) // num_replicas`` each; the tail that does not divide evenly
    is dropped). Epoch ``e`` is a pure function of ``(seed, e)``; the epoch advances on each
    ``__iter__`` and can be set with :meth:`set_epoch` (Lightning does, at each epoch start). It
    yields whole batches (lists of indices): serve them with :class:`IndexBatchDataset` and a
    ``DataLoader(batch_size=None)``; as a ``DistributedSampler`` Lightning leaves it alone.
    """

    def __init__(
        self,
        num_real: int,
        num_generated: int,
        batch_size: int,
        fraction: float,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"generated_fraction={fraction} must be in (0, 1)")
        n_gen = round(fraction * batch_size)
        if not 0 < n_gen < batch_size:
            raise ValueError(
                f"generated_fraction={fraction} with batch_size={batch_size} gives {n_gen} "
                "generated samples per batch; need at least one real and one generated"
            )
        needed = (batch_size - n_gen) * num_replicas
        if num_generated < 1 or num_real < needed:
            raise ValueError(
                f"need >= 1 generated and >= {needed} real samples ({batch_size - n_gen} per "
                f"batch, {num_replicas} process(es)), got {num_generated} and {num_real}"
            )
        super().__init__(
            range(num_real), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
        self.num_real = num_real
        self.num_generated = num_generated
        self.batch_size = batch_size
        self.n_generated = n_gen
        self.n_real = batch_size - n_gen
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next ``__iter__`` yields."""
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Skip this process's first ``batches_done`` batches the next time ``epoch`` is
        iterated."""
        self.epoch, self._resume = epoch, (epoch, batches_done)

    def __len__(self) -> int:
        return (self.num_real // self.n_real) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        self.epoch += 1
        num_batches = self.num_real // self.n_real
        real = torch.randperm(self.num_real, generator=gen)[: num_batches * self.n_real]
        passes = -(-num_batches * self.n_generated // self.num_generated)
        generated = torch.cat(
            [torch.randperm(self.num_generated, generator=gen) for _ in range(passes)]
        )
        real = real.view(num_batches, self.n_real)
        generated = generated[: num_batches * self.n_generated].view(num_batches, -1)
        batches = torch.cat([real, generated + self.num_real], dim=1)
        mine = batches[self.rank : len(self) * self.num_replicas : self.num_replicas]
        yield from mine[start:].tolist()


class IndexBatchDataset(Dataset[tuple[Tensor, Tensor]]):
    """``dataset[list of indices]`` -> one ``(images, labels)`` batch, for samplers that yield
    whole batches (:class:`MixedBatchSampler` with ``DataLoader(batch_size=None)``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images, labels = zip(*self.dataset.__getitems__(indices), strict=True)
        return torch.stack(images), torch.stack(labels)
