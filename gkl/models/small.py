"""Small Fashion-MNIST models (1x28x28 inputs, 10 classes by default)."""

from collections.abc import Callable, Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-MaxPool(2) blocks, flattened, optionally Linear-ReLU(hidden), linear head.

    Each block halves the spatial size (floor), so a 28x28 input ends at 3x3 after three blocks.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        if image_size < 2 ** len(channels):
            raise ValueError(
                f"image_size={image_size} is too small for {len(channels)} pooling stages: need "
                f">= {2 ** len(channels)} (each halves the image)"
            )
        blocks: list[nn.Module] = []
        size = image_size
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels, size = out_channels, size // 2
        blocks.append(nn.Flatten())
        width = in_channels * size * size
        if hidden is not None:
            blocks += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened feature maps (through the hidden layer, if any): the classifier's input."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear."""

    def __init__(
        self,
        hidden: int | Sequence[int] = 32,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if not widths or min(widths) < 1:
            raise ValueError(f"MLP hidden widths must be positive integers, got {hidden!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for out in widths:
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden-layer activations, the input of the classifier."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fmnist_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> SmallCNN:
    """KD teacher: 32-64-128 conv blocks, linear head (104,426 parameters for 10 classes)."""
    return SmallCNN((32, 64, 128), num_classes, in_channels, image_size)


def fmnist_mlp(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    hidden: int | Sequence[int] = 32,
) -> MLP:
    """KD student MLP: 784-32-10 by default (25,450 parameters for 10 classes).

    ``hidden=[512, 512]`` (conf/model/fmnist_mlp_wide.yaml, 669,706 parameters) is the demo's
    student: enough spare capacity to overfit a 10,000-image subset, the regime where a teacher's
    soft labels help (Hinton et al.'s MNIST setting).
    """
    return MLP(hidden, num_classes, in_channels, image_size)


def fmnist_cnn_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> SmallCNN:
    """Small CNN student: 8-16-32 conv blocks, linear head (8,834 parameters for 10 classes)."""
    return SmallCNN((8, 16, 32), num_classes, in_channels, image_size)


def fmnist_cnn_at(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> SmallCNN:
    """Adversarial-training CNN: 16-32-64 conv blocks, 256-unit hidden layer (173,690 parameters).

    Narrow convolutions keep the 5-step inner maximisation cheap on a CPU (about 260 TRADES
    images/s on one core); the parameters sit in the hidden layer.
    """
    return SmallCNN((16, 32, 64), num_classes, in_channels, image_size, hidden=256)


SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": fmnist_cnn,
    "fmnist_mlp": fmnist_mlp,
    "fmnist_cnn_small": fmnist_cnn_small,
    "fmnist_cnn_at": fmnist_cnn_at,
}
