"""Lightning data modules serving float images in [0, 1] (normalisation lives in the model)."""

from gkl.data.base import ImageDataModule, split_indices
from gkl.data.cifar import CIFARDataModule, read_cifar
from gkl.data.datasets import (
    ConcatImageDataset,
    ImageTensorDataset,
    RandomCropFlip,
    TransformSubset,
)
from gkl.data.fashion_mnist import FashionMNISTDataModule, read_idx
from gkl.data.generated import MixedBatchSampler, load_generated_npz
from gkl.data.imagenet import ImageNetDataModule
from gkl.data.imagenet_lt import ImageNetLTDataModule

__all__ = [
    "CIFARDataModule",
    "ConcatImageDataset",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "ImageNetLTDataModule",
    "ImageTensorDataset",
    "MixedBatchSampler",
    "RandomCropFlip",
    "TransformSubset",
    "load_generated_npz",
    "read_cifar",
    "read_idx",
    "split_indices",
]
