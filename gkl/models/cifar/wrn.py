"""Wide ResNets: mdistiller's KD variants and the TRADES/RobustBench WRN-28-10 / WRN-34-10.

mdistiller, TRADES and RobustBench share one definition (same parameter names), so a single
class serves both: checkpoints from either source load with ``strict=True``.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv) x2; a 1x1 ``convShortcut`` when widths differ."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut: nn.Module | None = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        # With a projection, both branches start from the activated input (as in the reference).
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` blocks; only the first changes width/stride."""

    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                BasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(nb_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis), depth ``6n + 4``.

    ``sub_block1=True`` adds the unused ``sub_block1`` stage found in original TRADES checkpoints;
    ``bias_last=False`` drops the classifier bias (some RobustBench entries).

    ``mdistiller_bn_double_update=True`` reproduces mdistiller's ``models/cifar/wrn.py``, whose
    forward calls ``block2.layer[0].bn1``, ``block3.layer[0].bn1`` and the final ``bn1`` a second
    time on the same inputs (to return ``preact_feats``): in training mode those three BatchNorms
    update their running statistics twice per step (running = (1 - m)^2 * running + (1 - (1 -
    m)^2) * batch statistic, ``num_batches_tracked`` + 2); logits, gradients and the state_dict
    layout are unchanged. Off by default; on in the KD recipes whose WRN students and numbers come
    from mdistiller (``cifar100_kd_wrn40_2_wrn16_2``, ``cifar100_kd_wrn40_2_wrn40_1``).
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        in_channels: int = 3,
        sub_block1: bool = False,
        bias_last: bool = True,
        mdistiller_bn_double_update: bool = False,
    ) -> None:
        super().__init__()
        self.mdistiller_bn_double_update = mdistiller_bn_double_update
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 (e.g. 16, 28, 34, 40), got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes, bias=bias_last)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled penultimate features, shape ``(B, 64 * widen_factor)``."""
        f1 = self.block1(self.conv1(x))
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = F.relu(self.bn1(f3))
        if self.mdistiller_bn_double_update and self.training:
            with torch.no_grad():  # mdistiller's preact_feats: only the running statistics count
                self.block2.layer[0].bn1(f1)
                self.block3.layer[0].bn1(f2)
                self.bn1(f3)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def wrn_16_1(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes, **kwargs)


def wrn_16_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, **kwargs)


def wrn_40_1(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes, **kwargs)


def wrn_40_2(num_classes: int = 100, **kwargs: Any) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes, **kwargs)


def wrn_28_10(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-28-10 (TRADES / RobustBench adversarial-training backbone)."""
    return WideResNet(28, 10, num_classes, **kwargs)


def wrn_34_10(num_classes: int = 10, **kwargs: Any) -> WideResNet:
    """WRN-34-10 (TRADES / RobustBench adversarial-training backbone)."""
    return WideResNet(34, 10, num_classes, **kwargs)
