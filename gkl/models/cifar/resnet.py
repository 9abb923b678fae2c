"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4), layer names as in mdistiller."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """Three-stage CIFAR ResNet of depth ``6n + 2``; ``num_filters`` = (stem, stage1, 2, 3)."""

    def __init__(
        self,
        depth: int,
        num_filters: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (e.g. 20, 32, 56), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled penultimate features, shape ``(B, num_filters[3])``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def resnet8(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-8 (16-16-32-64 filters)."""
    return ResNet(8, (16, 16, 32, 64), num_classes, **kwargs)


def resnet14(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-14 (16-16-32-64 filters)."""
    return ResNet(14, (16, 16, 32, 64), num_classes, **kwargs)


def resnet20(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-20 (16-16-32-64 filters)."""
    return ResNet(20, (16, 16, 32, 64), num_classes, **kwargs)


def resnet32(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-32 (16-16-32-64 filters)."""
    return ResNet(32, (16, 16, 32, 64), num_classes, **kwargs)


def resnet44(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-44 (16-16-32-64 filters)."""
    return ResNet(44, (16, 16, 32, 64), num_classes, **kwargs)


def resnet56(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-56 (16-16-32-64 filters)."""
    return ResNet(56, (16, 16, 32, 64), num_classes, **kwargs)


def resnet110(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-110 (16-16-32-64 filters)."""
    return ResNet(110, (16, 16, 32, 64), num_classes, **kwargs)


def resnet8x4(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-8 with 4x wider filters (32-64-128-256)."""
    return ResNet(8, (32, 64, 128, 256), num_classes, **kwargs)


def resnet32x4(num_classes: int = 100, **kwargs: Any) -> ResNet:
    """ResNet-32 with 4x wider filters (32-64-128-256)."""
    return ResNet(32, (32, 64, 128, 256), num_classes, **kwargs)
