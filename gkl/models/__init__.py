"""Model zoo (mdistiller CIFAR names, Fashion-MNIST models, timm), wrappers and checkpoints."""

from gkl.models.checkpoint import load_mdistiller_checkpoint
from gkl.models.factory import MODEL_REGISTRY, create_model, create_timm_model, list_models
from gkl.models.wrappers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FMNIST_MEAN,
    FMNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FrozenTeacher,
    Normalized,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_REGISTRY",
    "FrozenTeacher",
    "Normalized",
    "create_model",
    "create_timm_model",
    "list_models",
    "load_mdistiller_checkpoint",
]
