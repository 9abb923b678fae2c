"""CIFAR ShuffleNet V1 (``ShuffleV1``: groups 3, 240-480-960), layer names as in mdistiller."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across ``groups``: [N, g*c, H, W] -> [N, c*g, H, W]."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an avg-pooled input.

    The first block of the network (``first=True``) uses an ungrouped first 1x1 convolution.
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, groups: int, first: bool = False
    ) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.shuffle_groups = 1 if first else groups
        self.conv1 = nn.Conv2d(
            in_planes, mid_planes, kernel_size=1, groups=self.shuffle_groups, bias=False
        )
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, 3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNet(nn.Module):
    """Three stages; each starts with a stride-2 block whose output is concatenated to its input."""

    def __init__(
        self,
        out_planes: tuple[int, int, int],
        num_blocks: tuple[int, int, int],
        groups: int,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups, first=True)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(
        self, out_planes: int, num_blocks: int, groups: int, first: bool = False
    ) -> nn.Sequential:
        layers = [Bottleneck(self.in_planes, out_planes - self.in_planes, 2, groups, first)]
        layers += [Bottleneck(out_planes, out_planes, 1, groups) for _ in range(1, num_blocks)]
        self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled penultimate features, shape ``(B, out_planes[2])``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.forward_features(x))


def ShuffleV1(num_classes: int = 100, **kwargs: Any) -> ShuffleNet:
    """ShuffleNet V1, groups=3, stage widths 240-480-960, blocks 4-8-4."""
    return ShuffleNet((240, 480, 960), (4, 8, 4), 3, num_classes, **kwargs)
