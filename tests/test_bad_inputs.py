"""The bad-input campaign of issue 20 kept as a table: every row is a value a user can type (a
config key, an argument of an exported function) or a file with bad content, and the error it
must give: one that names the key / argument / file, the value and the valid range.

Rows call the constructor or function where the value enters (no training), so the table runs
in seconds; a few rows go through the composed config (``conf/train.yaml``) as ``train.py``
builds it.
"""

from __future__ import annotations

import functools
import gzip
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from gkl import losses as L
from gkl.attacks import ThreatModel, parse_eps, parse_number, pgd, trades_perturb
from gkl.data import (
    CIFARDataModule,
    FashionMNISTDataModule,
    ImageTensorDataset,
    MixedBatchSampler,
    RandomCropFlip,
    split_indices,
)
from gkl.data.build import build_datamodule
from gkl.data.cifar import read_cifar
from gkl.data.generated import load_generated_npz
from gkl.models.build import build_classifier, build_teacher
from gkl.models.checkpoint import load_mdistiller_checkpoint
from gkl.models.factory import create_model
from gkl.models.wrappers import Normalized
from gkl.tasks import AdversarialTask, ClassificationTask, DistillationTask

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
ROWS: list = []


def row(name: str, match: str, exc: type[BaseException] = ValueError):
    """Register ``fn(tmp_path)`` as a row that must raise ``exc`` matching ``match``."""

    def register(fn):
        ROWS.append(pytest.param(fn, exc, match, id=name))
        return fn

    return register


def add(name: str, fn, match: str, exc: type[BaseException] = ValueError) -> None:
    ROWS.append(pytest.param(fn, exc, match, id=name))


def logits(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def labels(n: int = 8) -> torch.Tensor:
    return torch.arange(n) % 10


# ------------------------------------------------------------------------------------- losses
# Every exported pure loss: (name, call(s, t, **options)).
PAIR_LOSSES = {
    "soft_cross_entropy": L.soft_cross_entropy,
    "kl_divergence": L.kl_divergence,
    "kd_loss": L.kd_loss,
    "trades_kl": L.trades_kl,
    "dkl_loss": L.dkl_loss,
    "gkl_loss": partial(L.gkl_loss, alpha=1.0, beta=1.0, gamma=1.0, temperature=4.0),
    "dkd_loss": lambda s, t, **kw: L.dkd_loss(s, t, labels(8), **kw),
}
BAD_PAIRS = {  # (student, teacher), expected message
    "broadcast": (lambda: (logits(8, 10), logits(1, 10)), r"must have the same shape.*\(8, 10\)"),
    "nan": (
        lambda: (logits(8, 10).index_fill(0, torch.tensor([3]), NAN), logits(8, 10)),
        r"student_logits|adversarial_logits has 10 non-finite entries",
    ),
    "inf": (
        lambda: (logits(8, 10), logits(8, 10).index_fill(1, torch.tensor([2]), INF)),
        r"teacher_logits|natural_logits has 8 non-finite entries",
    ),
    "empty_batch": (lambda: (logits(0, 10), logits(0, 10)), r"is empty \(shape \(0, 10\)\)"),
    "integer": (
        lambda: (torch.ones(8, 10, dtype=torch.long), logits(8, 10)),
        r"must be a floating-point tensor of logits, got dtype torch.int64",
    ),
    "1d": (lambda: (logits(10), logits(10)), r"must be 2-D \(batch, classes\), got shape \(10,\)"),
    "list": (lambda: ([[0.0, 1.0]], logits(1, 2)), r"must be a torch.Tensor, got list"),
}
for loss_name, fn in PAIR_LOSSES.items():
    for bad, (make, match) in BAD_PAIRS.items():
        add(f"{loss_name}-{bad}", lambda _, fn=fn, make=make: fn(*make()), match)

TEMPERATURE_LOSSES = {k: v for k, v in PAIR_LOSSES.items() if k != "trades_kl"}
BAD_POSITIVE = {
    "neg": (-4.0, r"must be > 0, got -4\.0"),
    "zero": (0.0, r"must be > 0, got 0\.0"),
    "nan": (NAN, r"must be a finite number > 0, got nan"),
    "inf": (INF, r"must be a finite number > 0, got inf"),
    "str": ("4", r"must be a finite number > 0, got '4'"),
}
for loss_name, fn in TEMPERATURE_LOSSES.items():
    for bad, (value, match) in BAD_POSITIVE.items():
        add(
            f"{loss_name}-temperature-{bad}",
            lambda _, fn=fn, value=value: fn(logits(8, 10), logits(8, 10), temperature=value),
            f"temperature {match}",
        )

BAD_WEIGHT = {
    "neg": (-1.0, r"must be >= 0, got -1\.0"),
    "inf": (INF, r"must be a finite number >= 0, got inf"),
    "nan": (NAN, r"must be a finite number >= 0, got nan"),
}
WEIGHTED = {"dkd_loss": ("alpha", "beta"), "dkl_loss": ("alpha", "beta")}
WEIGHTED["gkl_loss"] = ("alpha", "beta", "gamma")
for loss_name, keys in WEIGHTED.items():
    for key in keys:
        for bad, (value, match) in BAD_WEIGHT.items():
            add(
                f"{loss_name}-{key}-{bad}",
                lambda _, fn=PAIR_LOSSES[loss_name], key=key, value=value: fn(
                    logits(8, 10), logits(8, 10), **{key: value}
                ),
                f"{key} {match}",
            )
for bad, (value, match) in BAD_POSITIVE.items():
    add(
        f"gkl_loss-temperature2-{bad}",
        lambda _, value=value: PAIR_LOSSES["gkl_loss"](
            logits(8, 10), logits(8, 10), temperature2=value
        ),
        f"temperature2 {match}",
    )

BAD_TARGETS = {
    "float": (torch.zeros(8), r"target must be an integer tensor of class indices"),
    "shape": (torch.zeros(8, 1, dtype=torch.long), r"target must have shape \(8,\)"),
    "range": (torch.full((8,), 10), r"labels in \[10, 10\].*must lie in \[0, 9\]"),
    "negative": (torch.full((8,), -1), r"labels in \[-1, -1\].*must lie in \[0, 9\]"),
}
for bad, (target, match) in BAD_TARGETS.items():
    add(
        f"dkd_loss-target-{bad}",
        lambda _, target=target: L.dkd_loss(logits(8, 10), logits(8, 10), target),
        match,
    )
add(
    "dkd_loss-one-class",
    lambda _: L.dkd_loss(logits(8, 1), logits(8, 1), torch.zeros(8, dtype=torch.long)),
    r"dkd_loss needs >= 2 classes",
)
BAD_PRIORS = {
    "shape": (torch.full((8, 5), 0.2), r"class_prior must have the logits' shape \(8, 10\)"),
    "negative": (torch.full((8, 10), -0.1), r"class_prior has 80 negative entries"),
    "nan": (torch.full((8, 10), NAN), r"class_prior has 80 non-finite entries"),
    "zero_rows": (torch.zeros(8, 10), r"class_prior rows \[0, 1, 2"),
    "integer": (torch.ones(8, 10, dtype=torch.long), r"class_prior must be a floating-point"),
}
for bad, (prior, match) in BAD_PRIORS.items():
    add(
        f"gkl_loss-class_prior-{bad}",
        lambda _, prior=prior: PAIR_LOSSES["gkl_loss"](
            logits(8, 10), logits(8, 10), class_prior=prior
        ),
        match,
    )

# Loss modules: the value is refused when the module is built from the config.
LOSS_MODULE_ROWS = [
    ("KDLoss", L.KDLoss, "temperature", -1.0, r"must be > 0, got -1\.0"),
    ("KDLoss", L.KDLoss, "temperature", INF, r"must be a finite number > 0, got inf"),
    ("DKDLoss", L.DKDLoss, "beta", INF, r"must be a finite number >= 0, got inf"),
    ("DKDLoss", L.DKDLoss, "alpha", -1.0, r"must be >= 0, got -1\.0"),
    ("DKDLoss", L.DKDLoss, "temperature", 0, r"must be > 0, got 0"),
    ("DKLLoss", L.DKLLoss, "alpha", NAN, r"must be a finite number >= 0, got nan"),
    ("DKLLoss", L.DKLLoss, "beta", -2.0, r"must be >= 0, got -2\.0"),
    ("DKLLoss", L.DKLLoss, "temperature", -1.0, r"must be > 0, got -1\.0"),
    ("GKLLoss", L.GKLLoss, "alpha", -1.0, r"must be >= 0, got -1\.0"),
    ("GKLLoss", L.GKLLoss, "beta", INF, r"must be a finite number >= 0, got inf"),
    ("GKLLoss", L.GKLLoss, "gamma", NAN, r"must be a finite number >= 0, got nan"),
    ("GKLLoss", L.GKLLoss, "temperature", 0.0, r"must be > 0, got 0\.0"),
    ("GKLLoss", L.GKLLoss, "temperature2", INF, r"must be a finite number > 0, got inf"),
    ("GKLLoss", L.GKLLoss, "temperature", "4", r"must be a finite number > 0, got '4'"),
]
for cls_name, cls, key, value, match in LOSS_MODULE_ROWS:
    add(
        f"{cls_name}-{key}-{value}",
        lambda _, cls=cls, key=key, value=value: cls(**{key: value}),
        rf"{cls_name}\.{key} {match}",
    )
add("ClassPrior-0-classes", lambda _: L.ClassPrior(0), r"num_classes must be >= 1, got 0")
add(
    "ClassPrior-temperature-inf",
    lambda _: L.ClassPrior(10, temperature=INF),
    r"temperature must be a finite number > 0, got inf",
)
add(
    "ClassPrior-update-labels",
    lambda _: L.ClassPrior(10).update(logits(8, 10), torch.full((8,), 12)),
    r"labels in \[12, 12\].*must lie in \[0, 9\]",
)
add(
    "class_prior_for-two-temperatures",
    lambda _: L.class_prior_for(
        10,
        L.GKLLoss(use_class_prior=True, temperature2=1.0),
        L.GKLLoss(use_class_prior=True, temperature2=2.0),
    ),
    r"different temperatures \[1\.0, 2\.0\]",
)


# -------------------------------------------------------------------------------------- tasks
def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 10))


def sgd(**options) -> partial:
    return partial(torch.optim.SGD, **{"lr": 0.1, **options})


def adversarial(**options) -> AdversarialTask:
    return AdversarialTask(tiny_model(), 10, sgd(), **options)


def distill(**options) -> DistillationTask:
    return DistillationTask(tiny_model(), tiny_model(), L.KDLoss(), 10, sgd(), **options)


WEIGHT_MATCH = {-6.0: r">= 0, got -6\.0", INF: r"a finite number >= 0, got inf"}
WEIGHT_MATCH[NAN] = r"a finite number >= 0, got nan"
ADVERSARIAL_ROWS = [
    *[("trades_beta", v, m) for v, m in WEIGHT_MATCH.items()],
    ("trades_beta", "6", r"a finite number >= 0, got '6'"),
    *[("ce_weight", v, m) for v, m in WEIGHT_MATCH.items()],
    ("aug_weight", -1.0, r">= 0, got -1\.0"),
    ("aug_weight", INF, r"a finite number >= 0, got inf"),
    ("awp_gamma", -0.01, r">= 0, got -0\.01"),
    ("awp_gamma", INF, r"a finite number >= 0, got inf"),
    ("awp_gamma", NAN, r"a finite number >= 0, got nan"),
    ("awp_warmup_epoch", -1, r"an integer >= 0, got -1"),
    ("awp_warmup_epoch", 1.5, r"an integer >= 0, got 1\.5"),
    ("steps", 0, r"an integer >= 1, got 0"),
    ("steps", -1, r"an integer >= 1, got -1"),
    ("steps", 2.5, r"an integer >= 1, got 2\.5"),
    ("steps", "10", r"an integer >= 1, got '10'"),
    ("val_pgd_steps", 0, r"an integer >= 1, got 0"),
    ("val_pgd_subset", -1, r"an integer >= 0, got -1"),
    ("val_pgd_subset", 0.5, r"an integer >= 0, got 0\.5"),
    ("val_pgd_seed", -1, r"an integer >= 0, got -1"),
    ("eps_ramp_epochs", -1, r"an integer >= 0, got -1"),
    ("eps_ramp_epochs", 1.5, r"an integer >= 0, got 1\.5"),
    ("ema_decay", 1.0, r"in \[0, 1\).*got 1\.0"),
    ("ema_decay", -0.1, r"in \[0, 1\).*got -0\.1"),
    ("ema_decay", NAN, r"in \[0, 1\).*got nan"),
    ("weight_average", 1.0, r"in \[0, 1\).*got 1\.0"),
    ("weight_average", NAN, r"in \[0, 1\).*got nan"),
    ("weight_average", -0.5, r"in \[0, 1\).*got -0\.5"),
    ("weight_average_start", 0, r"an integer >= 1, got 0"),
    ("weight_average_start", 1.5, r"an integer >= 1, got 1\.5"),
    ("eps", -0.1, r"must be >= 0, got -0\.1"),
    ("eps", INF, r"must be finite, got inf"),
    ("eps", 8, r"=8 looks like 0-255 pixel units.*8/255"),
    ("eps", 2.0, r"=2\.0: eps is in \[0,1\] pixel units; did you mean 2/255"),
    ("eps", "abc", r"='abc'; use a number or a fraction like '8/255'"),
    ("step_size", -0.01, r"must be >= 0, got -0\.01"),
    ("step_size", INF, r"must be finite, got inf"),
    ("step_size", "x/255", r"='x/255'; use a number or a fraction"),
]
for key, value, match in ADVERSARIAL_ROWS:
    add(
        f"AdversarialTask-{key}-{value}",
        lambda _, key=key, value=value: adversarial(**{key: value}),
        rf"task\.{key}\b.*{match}",
    )
add(
    "AdversarialTask-objective",
    lambda _: adversarial(objective="madry"),
    r"unknown objective 'madry'; valid names: \['trades', 'gkl', 'pgd_at'\]",
)
add("AdversarialTask-norm", lambda _: adversarial(norm="L1"), r"unknown norm 'L1'")
add(
    "AdversarialTask-ema-and-average",
    lambda _: adversarial(ema_decay=0.9, weight_average=0.9),
    r"task\.ema_decay and task\.weight_average both",
)
add(
    "AdversarialTask-gkl-without-gkl-loss",
    lambda _: adversarial(objective="gkl", loss=L.KDLoss()),
    r"objective='gkl' needs loss=gkl",
)
add(
    "AdversarialTask-attack_loss-pgd_at",
    lambda _: adversarial(objective="pgd_at", attack_loss=L.GKLLoss()),
    r"task\.attack_loss=GKLLoss is not used by objective='pgd_at'",
)

DISTILL_ROWS = [
    ("ce_weight", -1.0, r">= 0, got -1\.0"),
    ("ce_weight", NAN, r"a finite number >= 0, got nan"),
    ("distill_weight", -1.0, r">= 0, got -1\.0"),
    ("distill_weight", INF, r"a finite number >= 0, got inf"),
    ("warmup_epochs", -1, r"an integer >= 0, got -1"),
    ("warmup_epochs", 2.5, r"an integer >= 0, got 2\.5"),
]
for key, value, match in DISTILL_ROWS:
    add(
        f"DistillationTask-{key}-{value}",
        lambda _, key=key, value=value: distill(**{key: value}),
        rf"task\.{key} must be {match}",
    )
add(
    "DistillationTask-ce-loss",
    lambda _: DistillationTask(tiny_model(), tiny_model(), L.CrossEntropyLoss(), 10, sgd()),
    r"CrossEntropyLoss ignores the teacher",
)
for value, match in ((0, r"got 0"), (-3, r"got -3"), (2.5, r"got 2\.5"), ("10", r"got '10'")):
    add(
        f"ClassificationTask-num_classes-{value}",
        lambda _, value=value: ClassificationTask(tiny_model(), value, sgd()),
        rf"num_classes must be an integer >= 1, {match}",
    )
OPTIMIZER_ROWS = [
    ("SGD", "lr", INF, r"a finite number > 0, got inf"),
    ("SGD", "lr", NAN, r"a finite number > 0, got nan"),
    ("SGD", "lr", -0.1, r"> 0, got -0\.1"),
    ("SGD", "lr", 0.0, r"> 0, got 0\.0"),
    ("SGD", "lr", "0.1", r"a finite number > 0, got '0\.1'"),
    ("SGD", "weight_decay", -5e-4, r">= 0, got -0\.0005"),
    ("SGD", "weight_decay", INF, r"a finite number >= 0, got inf"),
    ("SGD", "momentum", -0.9, r"in \[0, 1\], got -0\.9"),
    ("SGD", "momentum", NAN, r"a finite number in \[0, 1\], got nan"),
    ("Adam", "lr", INF, r"a finite number > 0, got inf"),
    ("Adam", "eps", -1e-8, r"> 0, got -1e-08"),
    ("Adam", "betas", (1.0, 0.999), r"in \[0, 1\), got 1\.0"),
    ("Adam", "betas", (0.9, -0.5), r"in \[0, 1\), got -0\.5"),
]
for opt, key, value, match in OPTIMIZER_ROWS:
    add(
        f"optim.{opt}-{key}-{value}",
        lambda _, opt=opt, key=key, value=value: ClassificationTask(
            tiny_model(), 10, partial(getattr(torch.optim, opt), **{"lr": 0.1, key: value})
        ).configure_optimizers(),
        rf"optim\.optimizer\.{key}.* must be {match}",
    )


# --------------------------------------------------------------------------------------- data
def fmnist(**options) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(**{"synthetic": True, **options})


DATA_ROWS = [
    ("batch_size", 0, r"an integer >= 1, got 0"),
    ("batch_size", -1, r"an integer >= 1, got -1"),
    ("batch_size", 1.5, r"an integer >= 1, got 1\.5"),
    ("batch_size", "big", r"an integer >= 1, got 'big'"),
    ("batch_size", True, r"an integer >= 1, got True"),
    ("num_workers", -1, r"an integer >= 0, got -1"),
    ("num_workers", 1.5, r"an integer >= 0, got 1\.5"),
    ("seed", -1, r"an integer >= 0, got -1"),
    ("seed", "x", r"an integer >= 0, got 'x'"),
]
for key, value, match in DATA_ROWS:
    add(
        f"data-{key}-{value}",
        lambda _, key=key, value=value: fmnist(**{key: value}),
        rf"data\.{key} must be {match}",
    )
for key, value in (
    ("train_subset", 0),
    ("train_subset", -5),
    ("train_subset", 2.5),
    ("test_size", 0),
    ("test_size", "all"),
):
    add(
        f"data-{key}-{value}",
        lambda _, key=key, value=value: fmnist(**{key: value}),
        rf"data\.{key}={value!r} must be a positive number of images",
    )
add("data-val_size--1", lambda _: fmnist(val_size=-1), r"data\.val_size=-1 must be an integer")
add("data-val_size-1.5", lambda _: fmnist(val_size=1.5), r"data\.val_size=1\.5 must be an integer")
add(
    "data-synthetic_sizes-length",
    lambda _: fmnist(synthetic_sizes=(10, 5)),
    r"synthetic_sizes must be \(train, val, test\)",
)
add(
    "data-synthetic_sizes-zero",
    lambda _: fmnist(synthetic_sizes=(0, 5, 5)),
    r"data\.synthetic_sizes must be .*>= 1.*got \(0, 5, 5\)",
)
add(
    "data-cifar-dataset",
    lambda _: CIFARDataModule(dataset="cifar1000", synthetic=True),
    r"dataset must be one of \['cifar10', 'cifar100'\], got 'cifar1000'",
)
for value in (0.0, 1.0, NAN, -0.5):
    add(
        f"data-generated_fraction-{value}",
        lambda _, value=value: CIFARDataModule(
            synthetic=True, generated_path="x.npz", generated_fraction=value
        ),
        rf"data\.generated_fraction must be (a finite number )?in \(0, 1\), got {value}",
    )


add("RandomCropFlip-padding--1", lambda _: RandomCropFlip(-1), r"padding must be an integer >= 0")
add("RandomCropFlip-padding-1.5", lambda _: RandomCropFlip(1.5), r"padding must be an integer >= 0")
add(
    "split_indices-val_size",
    lambda _: split_indices(10, 10, 0),
    r"val_size=10 must be in \[0, 10\)",
)
add(
    "ImageTensorDataset-float-images",
    lambda _: ImageTensorDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)),
    r"images must be uint8 NCHW, got torch\.float32",
)
add(
    "ImageTensorDataset-label-count",
    lambda _: ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3)),
    r"labels shape \(3,\) != \(2,\)",
)
add(
    "MixedBatchSampler-fraction",
    lambda _: MixedBatchSampler(
        num_real=100, num_generated=100, batch_size=10, fraction=1.5, seed=0
    ),
    r"generated_fraction=1\.5 must be in \(0, 1\)",
)


def data_cfg(**changes):
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / "fmnist.yaml")
    cfg.data_dir, cfg.seed, cfg.synthetic = "unused", 0, True
    for key, value in changes.items():
        cfg[key] = value
    return cfg


add(
    "build_datamodule-input_shape",
    lambda _: build_datamodule(data_cfg(input_shape=[3, 32, 32])),
    r"data\.input_shape=\[3, 32, 32\] .*\(1, 28, 28\)",
)
add(
    "build_datamodule-num_classes",
    lambda _: build_datamodule(data_cfg(num_classes=100)),
    r"data\.num_classes=100 in the config disagrees with the data module's 10",
)
add(
    "build_datamodule-mean-length",
    lambda _: build_datamodule(data_cfg(mean=[0.5, 0.5], std=[0.3, 0.3])),
    r"data\.mean has 2 values but the images have 1 channel",
)
add(
    "build_datamodule-std-zero",
    lambda _: build_datamodule(data_cfg(std=[0.0])),
    r"data\.std must be .*> 0, got 0\.0",
)
add(
    "build_datamodule-std-nan",
    lambda _: build_datamodule(data_cfg(std=[NAN])),
    r"data\.std must be a finite number > 0, got nan",
)
add(
    "build_datamodule-mean-inf",
    lambda _: build_datamodule(data_cfg(mean=[INF])),
    r"data\.mean must be a finite number, got inf",
)


# ---------------------------------------------------------------------------------- data files
def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fmnist_dir(root: Path, train_labels=None, test_labels=None, image_size: int = 28) -> Path:
    """Four IDX files: 12 training and 6 test images."""
    root.mkdir(exist_ok=True)
    for split, n, given in (("train", 12, train_labels), ("t10k", 6, test_labels)):
        images = np.zeros((n, image_size, image_size), np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        lab = np.arange(n) % 10 if given is None else np.asarray(given)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", lab)
    return root


def fmnist_split(root: Path, train: bool = True):
    return FashionMNISTDataModule(root, val_size=2)._read_split(train)


add(
    "fmnist-file-train-label-10",
    lambda tmp: fmnist_split(fmnist_dir(tmp / "f", train_labels=[10] + [0] * 11)),
    r"train-labels-idx1-ubyte\.gz holds labels in \[0, 10\].*\[0, 9\]",
)
add(
    "fmnist-file-test-label-255",
    lambda tmp: fmnist_split(fmnist_dir(tmp / "f", test_labels=[255] * 6), train=False),
    r"t10k-labels-idx1-ubyte\.gz holds labels in \[255, 255\].*\[0, 9\]",
)
add(
    "fmnist-file-label-count",
    lambda tmp: fmnist_split(fmnist_dir(tmp / "f", train_labels=[0] * 11)),
    r"train-labels-idx1-ubyte\.gz has 11 labels .*train-images-idx3-ubyte\.gz has 12 images",
)
add(
    "fmnist-file-image-size",
    lambda tmp: fmnist_split(fmnist_dir(tmp / "f", image_size=32)),
    r"train-images-idx3-ubyte\.gz.*\(12, 32, 32\).*28, 28",
)


@row("fmnist-file-truncated", r"train-images-idx3-ubyte\.gz is truncated or corrupt")
def _(tmp):
    root = fmnist_dir(tmp / "f")
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    fmnist_split(root)


@row("fmnist-file-magic", r"train-labels-idx1-ubyte\.gz is not an unsigned-byte IDX file")
def _(tmp):
    root = fmnist_dir(tmp / "f")
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + (12).to_bytes(4, "big") + bytes(48))
    fmnist_split(root)


@row("fmnist-file-size", r"t10k-images-idx3-ubyte\.gz: header says shape \(6, 28, 28\)")
def _(tmp):
    root = fmnist_dir(tmp / "f")
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (6, 28, 28)))
    fmnist_split(root, train=False)


add(
    "fmnist-file-missing",
    lambda tmp: fmnist_split(tmp),
    r"Fashion-MNIST IDX files .* not found in ",
    FileNotFoundError,
)
add(
    "fmnist-val_size-beyond-split",
    lambda tmp: FashionMNISTDataModule(fmnist_dir(tmp / "f"), val_size=50).setup("fit"),
    r"data\.val_size=50 must be in \[0, 12\)",
)
add(
    "fmnist-test_size-beyond-split",
    lambda tmp: FashionMNISTDataModule(fmnist_dir(tmp / "f"), val_size=2, test_size=7).setup(
        "test"
    ),
    r"data\.test_size=7 is more than the 6 test images; set data\.test_size<=6",
)
add(
    "fmnist-train_subset-beyond-split",
    lambda tmp: FashionMNISTDataModule(fmnist_dir(tmp / "f"), val_size=2, train_subset=11).setup(
        "fit"
    ),
    r"data\.train_subset=11 is more than the 10 training images",
)


@row(
    "fmnist-drop_last-no-batch",
    r"data\.drop_last=true with data\.batch_size=16 leaves no training batch: "
    r"each process has 10 training images",
)
def _(tmp):
    module = FashionMNISTDataModule(
        fmnist_dir(tmp / "f"), val_size=2, batch_size=16, drop_last=True, num_workers=0
    )
    module.setup("fit")
    module.train_dataloader()


def cifar_dir(root: Path, batch: object, raw: bytes | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(raw if raw is not None else pickle.dumps(batch))
    return root


def cifar_batch(n_images: int = 3, n_labels: int = 3, label: int = 1, **extra) -> dict:
    data = np.zeros((n_images, 3072), np.uint8)
    return {"data": data, "labels": [label] * n_labels, **extra}


def read_cifar_test(root: Path):
    return read_cifar(root, "cifar10", train=False)


CIFAR_ROWS = [
    ("label-count", cifar_batch(n_labels=2), r"test_batch: 3 images but 2 labels"),
    ("label-range", cifar_batch(label=10), r"test_batch holds labels in \[10, 10\].*\[0, 9\]"),
    ("label-negative", cifar_batch(label=-1), r"test_batch holds labels in \[-1, -1\]"),
    ("missing-key", {"data": np.zeros((1, 3072), np.uint8)}, r"test_batch: not a CIFAR-10 batch"),
    ("data-shape", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, r"\(N, 3072\) uint8"),
    ("not-a-dict", [1, 2, 3], r"test_batch is not a CIFAR batch: expected a dict, got list"),
]
for name, batch, match in CIFAR_ROWS:
    add(
        f"cifar-file-{name}",
        lambda tmp, batch=batch: read_cifar_test(cifar_dir(tmp, batch)),
        match,
    )
add(
    "cifar-file-garbage",
    lambda tmp: read_cifar_test(cifar_dir(tmp, None, raw=b"not a pickle at all")),
    r"test_batch is not a (plain|readable) CIFAR batch",
)
add(
    "cifar-file-missing",
    lambda tmp: read_cifar_test(tmp),
    r"CIFAR-10 not found: missing \['test_batch'\]",
    FileNotFoundError,
)


def npz(tmp: Path, **arrays) -> Path:
    path = tmp / "gen.npz"
    np.savez(path, **arrays)
    return path


NPZ_IMAGES = np.zeros((4, 32, 32, 3), np.uint8)
NPZ_ROWS = [
    ("label-range", {"image": NPZ_IMAGES, "label": np.full(4, 10)}, r"labels span \[10, 10\]"),
    ("label-float", {"image": NPZ_IMAGES, "label": np.zeros(4)}, r"'label' must be integers"),
    (
        "image-nchw",
        {"image": np.zeros((4, 3, 32, 32), np.uint8), "label": np.zeros(4, int)},
        "NHWC",
    ),
    ("missing-label", {"image": NPZ_IMAGES}, r"missing key\(s\) \['label'\]"),
    ("empty", {"image": NPZ_IMAGES[:0], "label": np.zeros(0, int)}, r"contains no samples"),
]
for name, arrays, match in NPZ_ROWS:
    add(
        f"npz-file-{name}",
        lambda tmp, arrays=arrays: load_generated_npz(npz(tmp, **arrays), 10, (3, 32, 32)),
        rf"gen\.npz.*{match}",
    )


add(
    "npz-file-missing",
    lambda tmp: load_generated_npz(tmp / "gen.npz", 10, (3, 32, 32)),
    r"generated data file not found: .*gen\.npz \(data\.generated_path\)",
    FileNotFoundError,
)


@row("npz-file-not-zip", r"gen\.npz is not a readable \.npz archive")
def _(tmp):
    (tmp / "gen.npz").write_bytes(b"junk")
    load_generated_npz(tmp / "gen.npz", 10, (3, 32, 32))


# -------------------------------------------------------------------------------------- models
for value, match in ((0, r"got 0"), (-1, r"got -1"), (2.5, r"got 2\.5"), ("10", r"got '10'")):
    add(
        f"create_model-fmnist_cnn-num_classes-{value}",
        lambda _, value=value: create_model("fmnist_cnn", num_classes=value),
        rf"num_classes must be an integer >= 1, {match}",
    )
for name in ("fmnist_mlp", "resnet8", "wrn_16_1", "vgg8", "ShuffleV1", "MobileNetV2"):
    add(
        f"create_model-{name}-num_classes-0",
        lambda _, name=name: create_model(name, num_classes=0),
        r"num_classes must be an integer >= 1, got 0",
    )
add(
    "create_model-in_channels-0",
    lambda _: create_model("fmnist_cnn", num_classes=10, in_channels=0),
    r"in_channels must be an integer >= 1, got 0",
)
add(
    "create_model-image_size-0",
    lambda _: create_model("fmnist_mlp", num_classes=10, image_size=0),
    r"image_size must be an integer >= 1, got 0",
)
add(
    "create_model-image_size-too-small",
    lambda _: create_model("fmnist_cnn", num_classes=10, image_size=4),
    r"image_size=4 is too small for 3 pooling stages: need >= 8",
)
add(
    "create_model-mlp-hidden-0",
    lambda _: create_model("fmnist_mlp", num_classes=10, hidden=0),
    r"MLP hidden widths must be positive integers, got 0",
)
add(
    "create_model-mlp-hidden-empty",
    lambda _: create_model("fmnist_mlp", num_classes=10, hidden=[]),
    r"MLP hidden widths must be positive integers, got \[\]",
)
add(
    "create_model-unknown",
    lambda _: create_model("fmnist_cnnn", num_classes=10),
    r"Unknown model 'fmnist_cnnn'\. Did you mean: fmnist_cnn",
)
add(
    "create_model-timm-prefix",
    lambda _: create_model("timm/resnet18", num_classes=10),
    r"model\.source=timm model\.name=resnet18",
)
NORMALIZED_ROWS = [
    ("std-zero", [0.5], [0.0], r"std must be > 0, got 0\.0"),
    ("std-nan", [0.5], [NAN], r"std must be a finite number > 0, got nan"),
    ("std-negative", [0.5], [-0.3], r"std must be > 0, got -0\.3"),
    ("mean-inf", [INF], [0.3], r"mean must be a finite number, got inf"),
    ("lengths", [0.5, 0.5], [0.3], r"mean and std lengths differ: 2 vs 1"),
]
for name, mean, std, match in NORMALIZED_ROWS:
    add(
        f"Normalized-{name}",
        lambda _, mean=mean, std=std: Normalized(nn.Identity(), mean, std),
        match,
    )
add(
    "build_classifier-source",
    lambda _: build_classifier("fmnist_mlp", 10, [0.5], [0.3], source="hub"),
    r"unknown model source 'hub'; valid choices: \['zoo', 'timm'\]",
)
add(
    "build_teacher-no-weights",
    lambda _: build_teacher("fmnist_cnn", 10, [0.5], [0.3], checkpoint=None),
    r"teacher 'fmnist_cnn' has neither a checkpoint nor pretrained=true",
)


# --------------------------------------------------------------------------------- checkpoints
def mlp_weights(poison: float | None = None) -> dict[str, torch.Tensor]:
    state = create_model("fmnist_mlp", num_classes=10).state_dict()
    if poison is not None:
        state["features.1.weight"][0, 0] = poison
    return state


def save(tmp: Path, obj, name: str = "w.pth") -> Path:
    path = tmp / name
    torch.save(obj, path)
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def teacher_from(path: Path):
    return build_teacher("fmnist_mlp", 10, [0.5], [0.3], checkpoint=str(path))


for value in (NAN, INF):
    add(
        f"teacher-checkpoint-{value}-weights",
        lambda tmp, value=value: teacher_from(save(tmp, {"model": mlp_weights(value)})),
        r"w\.pth: 1 non-finite value \(NaN or Inf\) in features\.1\.weight",
    )
    add(
        f"eval-checkpoint-{value}-weights",
        lambda tmp, value=value: load_model_for_eval(save(tmp, mlp_weights(value))),
        r"w\.pth: 1 non-finite value \(NaN or Inf\) in features\.1\.weight",
    )


def load_model_for_eval(path: Path):
    """What eval.py does with ``ckpt_path``: read the file, load the chosen weights strictly."""
    from gkl.evaluate.run import Source, build_model
    from gkl.models.checkpoint import read_checkpoint

    model_cfg = OmegaConf.create(
        {
            "_target_": "gkl.models.build.build_classifier",
            "name": "fmnist_mlp",
            "num_classes": 10,
            "mean": [0.5],
            "std": [0.3],
        }
    )
    state, sha256 = read_checkpoint(path)
    return build_model(model_cfg, Source(ckpt_path=path, state=state, sha256=sha256), "auto")


add(
    "teacher-checkpoint-other-architecture",
    lambda tmp: teacher_from(
        save(tmp, {"model": create_model("fmnist_cnn", num_classes=10).state_dict()})
    ),
    r"does not match the expected architecture 'fmnist_mlp'(.|\n)*looks like 'fmnist_cnn'"
    r"(.|\n)*w\.pth",
)
add(
    "teacher-checkpoint-classes",
    lambda tmp: teacher_from(
        save(tmp, {"model": create_model("fmnist_mlp", num_classes=100).state_dict()})
    ),
    r"checkpoint has 100 classes, model has 10",
)
add(
    "teacher-checkpoint-empty",
    lambda tmp: teacher_from(write(tmp / "w.pth", b"")),
    r"checkpoint .*w\.pth is empty \(0 bytes\)",
)
add(
    "teacher-checkpoint-garbage",
    lambda tmp: teacher_from(write(tmp / "w.pth", b"garbage")),
    r"cannot read checkpoint .*w\.pth \(7 bytes",
)
add(
    "teacher-checkpoint-missing",
    lambda tmp: teacher_from(tmp / "absent.pth"),
    r"checkpoint for 'fmnist_mlp' not found at .*absent\.pth",
    FileNotFoundError,
)
add(
    "teacher-checkpoint-list",
    lambda tmp: teacher_from(save(tmp, [1, 2])),
    r"Unrecognised checkpoint: expected a dict, got list \(file: .*w\.pth\)",
)
add(
    "load_mdistiller_checkpoint-prefix",
    lambda tmp: load_mdistiller_checkpoint(
        create_model("fmnist_mlp", num_classes=10), save(tmp, mlp_weights()), prefix="student."
    ),
    r"No checkpoint key starts with prefix 'student\.' \(file: .*w\.pth\)",
)


# ------------------------------------------------------------------------------------- attacks
def attack_inputs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    return model, torch.full((2, 1, 2, 2), 0.5), torch.tensor([0, 1])


def run_pgd(**options):
    model, x, y = attack_inputs()
    return pgd(model, x, y, **{"eps": 8 / 255, "step_size": 2 / 255, "steps": 1, **options})


def run_trades(**options):
    model, x, _ = attack_inputs()
    defaults = {"eps": 8 / 255, "step_size": 2 / 255, "steps": 1}
    return trades_perturb(model, x, **{**defaults, **options})


ATTACK_ROWS = [
    ("pgd", run_pgd, {"eps": -0.1}, r"eps=-0\.1 must be a finite number >= 0"),
    ("pgd", run_pgd, {"eps": INF}, r"eps=inf must be in \[0, 1\] pixel units"),
    ("pgd", run_pgd, {"eps": NAN}, r"eps=nan must be a finite number >= 0"),
    ("pgd", run_pgd, {"eps": 8}, r"eps=8 must be in \[0, 1\] pixel units; write 8/255"),
    ("pgd", run_pgd, {"eps": "8/255"}, r"eps='8/255': attacks take a parsed float"),
    ("pgd", run_pgd, {"step_size": NAN}, r"step_size=nan must be a finite number >= 0"),
    ("pgd", run_pgd, {"steps": -1}, r"need steps >= 0 and restarts >= 1, got steps=-1"),
    ("pgd", run_pgd, {"restarts": 0}, r"need steps >= 0 and restarts >= 1, got .*restarts=0"),
    ("pgd", run_pgd, {"norm": "L1"}, r"norm must be one of \('Linf', 'L2'\), got 'L1'"),
    ("pgd", run_pgd, {"loss": "mse"}, r"unknown loss 'mse'; valid names: ce, kl"),
    ("trades", run_trades, {"steps": 0}, r"TRADES needs steps >= 1, got 0"),
    ("trades", run_trades, {"eps": -1.0}, r"eps=-1\.0 must be a finite number >= 0"),
    ("trades", run_trades, {"step_size": INF}, r"step_size=inf must be in \[0, 1\]"),
    ("trades", run_trades, {"norm": "Linf2"}, r"norm must be one of .*got 'Linf2'"),
]
for name, fn, options, match in ATTACK_ROWS:
    exc = TypeError if options.get("eps") == "8/255" else ValueError
    add(f"{name}-{options}", lambda _, fn=fn, options=options: fn(**options), match, exc)


@row("pgd-x-out-of-range", r"x must lie in \[0, 1\].*got range \[0\.5, 255\]")
def _(_):
    model, x, y = attack_inputs()
    x[0, 0, 0, 0] = 255
    pgd(model, x, y, eps=0.1, step_size=0.01, steps=1)


@row("pgd-y-shape", r"y must have shape \(2,\), got \(3,\)")
def _(_):
    model, x, _ = attack_inputs()
    pgd(model, x, torch.tensor([0, 1, 2]), eps=0.1, step_size=0.01, steps=1)


PARSE_ROWS = [
    ("parse_number-text", lambda: parse_number("abc", "eps"), r"cannot parse eps='abc'"),
    ("parse_number-zero-den", lambda: parse_number("8/0", "eps"), r"cannot parse eps='8/0'"),
    ("parse_number-nan", lambda: parse_number("nan", "eps"), r"eps must be finite, got 'nan'"),
    ("parse_number-negative", lambda: parse_number(-1, "eps"), r"eps must be >= 0, got -1"),
    ("parse_eps-255-units", lambda: parse_eps(8), r"eps=8 looks like 0-255 pixel units"),
    ("parse_eps-above-1", lambda: parse_eps(1.5), r"eps=1\.5: eps is in \[0,1\] pixel units"),
    ("ThreatModel-norm", lambda: ThreatModel.parse("8/255", norm="L3"), r"unknown norm 'L3'"),
]
for name, fn, match in PARSE_ROWS:
    add(name, lambda _, fn=fn: fn(), match)
add("parse_number-bool", lambda _: parse_number(True, "eps"), r"eps must be a number", TypeError)


# ------------------------------------------------------------------------ the composed config
@functools.cache
def base_config(*groups: str):
    from gkl.config import compose_config

    return compose_config(
        "train.yaml", [*groups, "data.synthetic=true", "paths.output_dir=/nonexistent/run"]
    )


def built(groups: tuple[str, ...], **changes):
    """Build what ``train.py`` builds before fitting from ``conf/train.yaml`` + ``groups`` with
    ``changes`` (dotted keys) applied: the checked inputs, data (set up), model, loss, task."""
    from gkl.train import build_task, check_inputs

    cfg = base_config(*groups).copy()
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    check_inputs(cfg)
    datamodule = build_datamodule(cfg.data)
    model = instantiate(cfg.model)
    loss = instantiate(cfg.loss) if cfg.get("loss") else None
    teacher = tiny_model() if "task=distill" in groups else None
    build_task(cfg, model, teacher, loss, datamodule.num_classes)
    for callback in (cfg.get("callbacks") or {}).values():
        instantiate(callback)
    datamodule.setup("fit")


ADV = ("task=adversarial", "loss=trades_kl", "model=fmnist_cnn")
KD = ("task=distill", "loss=kd")
CONFIG_ROWS = [
    ((), {"seed": -1}, r"seed must be an integer in \[0, 4294967295\], got -1"),
    ((), {"seed": 2**40}, r"seed must be an integer in \[0, 4294967295\], got 1099511627776"),
    ((), {"seed": 1.5}, r"seed=1\.5: the seed must be an integer"),
    ((), {"trainer.max_epochs": -2}, r"trainer\.max_epochs=-2 must be an integer >= 0"),
    ((), {"trainer.max_epochs": 1.5}, r"trainer\.max_epochs=1\.5 must be an integer >= 0"),
    ((), {"trainer.max_steps": -5}, r"trainer\.max_steps=-5 must be an integer >= 0"),
    ((), {"trainer.accumulate_grad_batches": 0}, r"trainer\.accumulate_grad_batches must be"),
    ((), {"trainer.gradient_clip_val": -1.0}, r"trainer\.gradient_clip_val must be >= 0"),
    ((), {"trainer.check_val_every_n_epoch": 0}, r"trainer\.check_val_every_n_epoch must be"),
    ((), {"trainer.log_every_n_steps": -1}, r"trainer\.log_every_n_steps must be"),
    ((), {"data.batch_size": "big"}, r"data\.batch_size must be an integer >= 1, got 'big'"),
    ((), {"data.batch_size": 0}, r"data\.batch_size must be an integer >= 1, got 0"),
    ((), {"data.input_shape": [3, 32, 32]}, r"data\.input_shape=\[3, 32, 32\]"),
    ((), {"optim.optimizer.lr": INF}, r"optim\.optimizer\.lr must be a finite number > 0"),
    ((), {"optim.optimizer.lr": -0.001}, r"optim\.optimizer\.lr must be > 0, got -0\.001"),
    ((), {"optim.optimizer.weight_decay": -1.0}, r"optim\.optimizer\.weight_decay must be >= 0"),
    ((), {"model.num_classes": 0}, r"num_classes must be an integer >= 1, got 0"),
    ((), {"callbacks.mid_epoch_checkpoint.every_n_train_steps": -1}, r"every_n_train_steps=-1"),
    ((), {"callbacks.model_checkpoint.save_top_k": -2}, r"save_top_k=-2. Must be >= -1"),
    (ADV, {"task.trades_beta": -6.0}, r"task\.trades_beta must be >= 0, got -6\.0"),
    (ADV, {"task.ce_weight": NAN}, r"task\.ce_weight must be a finite number >= 0, got nan"),
    (ADV, {"task.steps": 0}, r"task\.steps must be an integer >= 1, got 0"),
    (ADV, {"task.eps": "8"}, r"task\.eps='8' looks like 0-255 pixel units"),
    (ADV, {"task.awp_gamma": -0.005}, r"task\.awp_gamma must be >= 0, got -0\.005"),
    (KD, {"task.distill_weight": -1.0}, r"task\.distill_weight must be >= 0, got -1\.0"),
    (KD, {"loss.temperature": 0.0}, r"KDLoss\.temperature must be > 0, got 0\.0"),
    (("loss=gkl",) + KD[:1], {"loss.beta": INF}, r"GKLLoss\.beta must be a finite number >= 0"),
]
for groups, changes, match in CONFIG_ROWS:
    ((key, value),) = changes.items()
    add(
        f"config-{'+'.join(groups) or 'default'}-{key}={value}",
        lambda _, groups=groups, changes=changes: built(groups, **changes),
        match,
        Exception,  # Hydra's InstantiationException carries the builder's ValueError message
    )


@row("config-data.train_subset-beyond-real-split", r"data\.train_subset=10000000 is more than")
def _(tmp):
    changes = {"data.synthetic": False, "data.data_dir": str(fmnist_dir(tmp / "f"))}
    built((), **changes, **{"data.val_size": 2, "data.train_subset": 10_000_000})


@row("config-ckpt_path-bare-state_dict", r"ckpt_path=.*w\.pth holds a bare state_dict")
def _(tmp):
    from gkl.config import compose_config
    from gkl.train import run

    path = save(tmp, mlp_weights())
    overrides = ["data.synthetic=true", f"paths.output_dir={tmp / 'run'}", f"ckpt_path={path}"]
    run(compose_config("train.yaml", [*overrides, "trainer.max_epochs=1", "logger=none"]))


@row("config-ckpt_path-mdistiller-file", r"ckpt_path=.*w\.pth holds \{'model': state_dict\}")
def _(tmp):
    from gkl.config import compose_config
    from gkl.train import run

    path = save(tmp, {"model": mlp_weights()})
    overrides = ["data.synthetic=true", f"paths.output_dir={tmp / 'run'}", f"ckpt_path={path}"]
    run(compose_config("train.yaml", [*overrides, "trainer.max_epochs=1", "logger=none"]))


# -------------------------------------------------------------------------------------- table
def test_the_table_has_the_campaign_size():
    """Issue 20 asks for at least 150 of the project's own cases."""
    assert len(ROWS) >= 150, len(ROWS)


@pytest.mark.parametrize(("make", "exc", "match"), ROWS)
def test_bad_input_is_refused_naming_it(make, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        make(tmp_path)
