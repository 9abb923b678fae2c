"""CIFAR VGGs with batch norm (vgg8/11/13/16/19), layer names as in mdistiller's ``vggN_bn``."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Conv widths of the five blocks; a 2x2 max-pool follows blocks 0-2 (CIFAR layout).
_CONFIGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """(conv-BN-ReLU) per width, without the final ReLU (applied in ``forward``)."""
    layers: list[nn.Module] = []
    for w in widths:
        conv = nn.Conv2d(in_channels, w, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks (``block0`` ... ``block4``), global average pool, linear ``classifier``."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.block0 = _make_block(cfg[0], in_channels)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.classifier = nn.Linear(512, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled penultimate features, shape ``(B, 512)``."""
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block4(F.relu(self.block3(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def vgg8(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-8 with BN (config "S")."""
    return VGG(_CONFIGS["S"], num_classes, **kwargs)


def vgg11(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-11 with BN (config "A")."""
    return VGG(_CONFIGS["A"], num_classes, **kwargs)


def vgg13(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-13 with BN (config "B")."""
    return VGG(_CONFIGS["B"], num_classes, **kwargs)


def vgg16(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-16 with BN (config "D")."""
    return VGG(_CONFIGS["D"], num_classes, **kwargs)


def vgg19(num_classes: int = 100, **kwargs: Any) -> VGG:
    """VGG-19 with BN (config "E")."""
    return VGG(_CONFIGS["E"], num_classes, **kwargs)
