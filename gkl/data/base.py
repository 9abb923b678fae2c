"""Common base for the image data modules: seeded splits, synthetic data and loaders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gkl.checks import check_count
from gkl.data.datasets import BatchTransform, ImageTensorDataset
from gkl.data.teacher_cache import TeacherLogitsDataset, compute_teacher_logits


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random split of ``range(n)`` into ``(train, val)`` index tensors."""
    if not 0 <= val_size < n:
        raise ValueError(
            f"data.val_size={val_size} must be in [0, {n}) for a training set of {n} images"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def check_label_range(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Refuse a label file (``path``) with labels outside ``[0, num_classes)``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path} holds labels in [{labels.min()}, {labels.max()}] but the data set has "
            f"{num_classes} classes, so labels must lie in [0, {num_classes - 1}]; the file is "
            "corrupt or belongs to another data set: replace it"
        )


def check_subset_size(key: str, wanted: int, available: int, split: str) -> None:
    """Refuse ``data.<key>`` larger than the real split instead of silently taking all of it
    (synthetic smoke-test splits are small on purpose and keep any subset size)."""
    if wanted > available:
        after = " left after the validation split" if split == "training" else ""
        raise ValueError(
            f"data.{key}={wanted} is more than the {available} {split} images{after}; "
            f"set data.{key}<={available}, or null for all of them"
        )


class EpochSampler(DistributedSampler):
    """Random order drawn from ``(seed, epoch)`` alone, sharded over ``num_replicas`` processes
    and resumable part-way through an epoch.

    Lightning calls :meth:`set_epoch` at each epoch start, so the order never depends on how many
    epochs this process has run: a resumed run sees the same batches as an uninterrupted one.
    Process ``rank`` takes positions ``rank, rank + num_replicas, ...`` of the epoch's order,
    padded with its first positions to a multiple of ``num_replicas`` (as
    :class:`~torch.utils.data.DistributedSampler`, of which this is a subclass so that Lightning
    does not wrap it again). With one process the order is the whole permutation.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size = size
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, samples_done: int) -> None:
        """Skip this process's first ``samples_done`` samples the next time ``epoch`` is
        iterated."""
        self.epoch, self._resume = epoch, (epoch, samples_done)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order += order[: self.total_size - self.size]  # pad to a multiple of num_replicas
        shard = order[self.rank : self.total_size : self.num_replicas]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        return iter(shard[start:])


class ImageDataModule(pl.LightningDataModule):
    """Base data module serving float images in ``[0, 1]`` (normalise inside the model).

    Subclasses set ``num_classes`` and ``input_shape`` and implement :meth:`_read_split`, or
    override :meth:`_fit_sets` / :meth:`_test_set`; they take their own arguments and pass the
    rest (``**options``) to this constructor. The normalisation statistics are the data config's
    (``conf/data/*.yaml`` ``mean``/``std``, read by the model).

    Attributes:
        is_synthetic: data are random tensors (smoke tests only; mark results accordingly).
        val_is_test: ``val_size == 0``, so validation runs on the test set.
    """

    num_classes: int
    input_shape: tuple[int, int, int]

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        synthetic: bool = False,
        download: bool = False,
        augment: bool = False,
        pin_memory: bool = False,
        train_subset: int | None = None,
        test_size: int | None = None,
        synthetic_sizes: Sequence[int] = (512, 256, 256),
        drop_last: bool = False,
        instance_sample_k: int | None = None,
        instance_sample_mode: str = "exact",
    ) -> None:
        super().__init__()
        check_count("data.batch_size", batch_size)
        check_count("data.num_workers", num_workers, minimum=0)
        check_count("data.seed", seed, minimum=0)
        for name, value in (("train_subset", train_subset), ("test_size", test_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"data.{name}={value!r} must be a positive number of images (null: all of them)"
                )
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(
                f"data.val_size={val_size!r} must be an integer >= 0 (0: validate on test)"
            )
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.is_synthetic = synthetic
        self.download = download
        self.augment = augment
        self.pin_memory = pin_memory
        self.train_subset = train_subset
        self.test_size = test_size
        self.synthetic_sizes = tuple(int(s) for s in synthetic_sizes)
        self.drop_last = drop_last
        if len(self.synthetic_sizes) != 3:
            raise ValueError(f"synthetic_sizes must be (train, val, test), got {synthetic_sizes}")
        if min(self.synthetic_sizes) < 1:
            raise ValueError(
                f"data.synthetic_sizes must be three integers >= 1, got {tuple(synthetic_sizes)}"
            )
        self.val_is_test = val_size == 0
        # CRD (gkl.data.instance_sample): (x, y, index, sample_index) training items when set.
        self.instance_sample = (instance_sample_k, instance_sample_mode)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # Position in the training order saved in checkpoints: (epoch, batches already trained).
        self._resume_position: tuple[int, int] | None = None

    # --- data sources -------------------------------------------------------------------------

    def _read_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return the real ``(uint8 NCHW images, int64 labels)`` of the train or test split."""
        raise NotImplementedError

    def _batch_augment(self) -> BatchTransform | None:
        """Batched uint8 augmentation for the training split (``None``: no augmentation)."""
        return None

    def _synthetic_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Seeded random images; every class appears when the split has enough samples."""
        n_train, n_val, n_test = self.synthetic_sizes
        n = n_train + (0 if self.val_is_test else n_val) if train else n_test
        gen = torch.Generator().manual_seed(self.seed * 2 + (0 if train else 1))
        images = torch.randint(0, 256, (n, *self.input_shape), generator=gen, dtype=torch.uint8)
        labels = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=gen)]
        return images, labels

    def _source(self, train: bool) -> tuple[Tensor, Tensor]:
        return self._synthetic_split(train) if self.is_synthetic else self._read_split(train)

    def _split(self, n: int) -> tuple[Tensor, Tensor]:
        """Seeded ``(train, val)`` indices of the training split, with ``train_subset`` applied."""
        val_size = self.synthetic_sizes[1] if self.is_synthetic and self.val_size else self.val_size
        train_idx, val_idx = split_indices(n, val_size, self.seed)
        if self.train_subset is not None and not self.is_synthetic:  # smoke tests: any size
            check_subset_size("train_subset", self.train_subset, len(train_idx), "training")
            train_idx = train_idx[: self.train_subset]
        return train_idx, val_idx

    def _fit_sets(self) -> tuple[Dataset, Dataset | None]:
        images, labels = self._source(train=True)
        train_idx, val_idx = self._split(len(labels))
        augment = self._batch_augment() if self.augment else None
        train = ImageTensorDataset(images[train_idx], labels[train_idx], augment)
        val = ImageTensorDataset(images[val_idx], labels[val_idx]) if len(val_idx) else None
        return train, val

    def _test_set(self) -> Dataset:
        images, labels = self._source(train=False)
        if self.test_size is not None and not self.is_synthetic:
            check_subset_size("test_size", self.test_size, len(labels), "test")
        return ImageTensorDataset(images[: self.test_size], labels[: self.test_size])

    # --- Lightning hooks ------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs (all when ``None``); loads each split once."""
        needs_test = stage in (None, "test", "predict") or self.val_is_test
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set, self.val_set = self._fit_sets()
        if needs_test and self.test_set is None:
            self.test_set = self._test_set()
        if self.val_is_test and self.val_set is None:
            rank_zero_warn(
                f"{type(self).__name__}: val_size=0, validating on the TEST set (val_is_test=True);"
                " validation metrics are test metrics, do not select models on them."
            )
            self.val_set = self.test_set

    def serve_teacher_logits(self, teacher: nn.Module, device: torch.device) -> None:
        """Teacher-output caching: compute ``teacher``'s logits on the (un-augmented) training set
        once and serve training batches as ``(x, y, teacher_logits)`` from then on (idempotent)."""
        train_set = self._require(self.train_set, "train_set")
        if not isinstance(train_set, TeacherLogitsDataset):
            logits = compute_teacher_logits(teacher, train_set, device=device)
            self.train_set = TeacherLogitsDataset(train_set, logits)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }

    def _require(self, dataset: Dataset | None, name: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{name} is not set up: call setup() first")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader; the order of each epoch follows ``(seed, epoch)``, sharded over
        the trainer's processes under DDP.

        ``drop_last`` drops each epoch's last incomplete batch (``train_trades_cifar.py``'s loader:
        390 batches of 128 from 50,000 images instead of 391); a training set smaller than one
        batch is refused (synthetic smoke data keeps its one incomplete batch). After a restore
        from a checkpoint taken mid-epoch, the batches already trained on are skipped, so the run
        continues exactly (with ``num_workers=0``; worker processes draw their own augmentation
        seeds).
        """
        train_set = self._require(self.train_set, "train_set")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler_type = EpochSampler
        if self.instance_sample[0] is not None:
            from gkl.data.instance_sample import EpochKeySampler, instance_sample_set

            train_set = instance_sample_set(train_set, *self.instance_sample, self.seed)
            sampler_type = EpochKeySampler
        sampler = sampler_type(len(train_set), self.seed, replicas, rank)
        drop_last = self.drop_last
        if drop_last and sampler.num_samples < self.batch_size:
            if not self.is_synthetic:
                raise ValueError(
                    f"data.drop_last=true with data.batch_size={self.batch_size} leaves no "
                    f"training batch: each process has {sampler.num_samples} training images. "
                    "Lower data.batch_size or set data.drop_last=false"
                )
            drop_last = False  # a smoke test's few synthetic images still take a step
        if self._resume_position is not None:
            epoch, batches_done = self._resume_position
            sampler.resume(epoch, batches_done * self.batch_size)
            self._resume_position = None
        # A private generator keeps the DataLoader from drawing worker seeds from the global RNG.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            drop_last=drop_last,
            **self._loader_kwargs(),
        )

    def state_dict(self) -> dict[str, int]:
        """The training position, saved by Lightning in every checkpoint."""
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch = trainer.current_epoch
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict:
            self._resume_position = (state_dict["epoch"], state_dict["batches_done"])

    def val_dataloader(self) -> DataLoader:
        """Validation loader (the test set when ``val_is_test``)."""
        val_set = self._require(self.val_set, "val_set")
        return DataLoader(val_set, batch_size=self.batch_size, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        """Test loader."""
        test_set = self._require(self.test_set, "test_set")
        return DataLoader(test_set, batch_size=self.batch_size, **self._loader_kwargs())
