"""MobileNetV1 (Howard et al., 2017) for ImageNet, the student of the R50 -> MobileNetV1 KD row.

Layer layout and ``state_dict`` keys (``model.<i>...``, ``fc``) follow mdistiller's ImageNet
MobileNetV1, so its checkpoints load: a 3x3 stride-2 conv to 32 channels, 13 depthwise-separable
blocks (3x3 depthwise conv + BN + ReLU, 1x1 pointwise conv + BN + ReLU), global average pooling
and a linear classifier on 1024 features.
"""

from __future__ import annotations

from torch import Tensor, nn

# (output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """Normalised ``(B, in_channels, H, W)`` images (224 x 224 for ImageNet) -> logits."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 2)]
        channels = 32
        for out, stride in _BLOCKS:
            layers.append(_conv_dw(channels, out, stride))
            channels = out
        layers.append(nn.AdaptiveAvgPool2d(1))  # mdistiller: AvgPool2d(7) at 224 x 224, the same
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled 1024 features before ``fc``."""
        return self.model(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def mobilenet_v1(num_classes: int = 1000, **kwargs) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes, **kwargs)
