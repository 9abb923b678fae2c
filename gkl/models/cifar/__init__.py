"""mdistiller's model zoo under its names (the CIFAR networks, and the ImageNet MobileNetV1
student of :mod:`gkl.models.mobilenetv1`); state_dict keys and shapes match mdistiller.

All models map normalised ``(B, C, 32, 32)`` images to logits. ``wrn_28_10`` / ``wrn_34_10``
follow the TRADES / RobustBench WideResNet definition.
"""

from collections.abc import Callable

from torch import nn

from gkl.models.cifar.mobilenetv2 import MobileNetV2, mobile_half
from gkl.models.cifar.resnet import (
    ResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from gkl.models.cifar.resnetv2 import ResNet18, ResNet50
from gkl.models.cifar.shufflenetv1 import ShuffleNet, ShuffleV1
from gkl.models.cifar.shufflenetv2 import ShuffleNetV2, ShuffleV2
from gkl.models.cifar.vgg import VGG, vgg8, vgg11, vgg13, vgg16, vgg19
from gkl.models.cifar.wrn import (
    WideResNet,
    wrn_16_1,
    wrn_16_2,
    wrn_28_10,
    wrn_34_10,
    wrn_40_1,
    wrn_40_2,
)
from gkl.models.mobilenetv1 import mobilenet_v1

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "wrn_28_10": wrn_28_10,
    "wrn_34_10": wrn_34_10,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
    "ResNet18": ResNet18,
    "ResNet50": ResNet50,
    "MobileNetV1": mobilenet_v1,  # ImageNet (224 x 224)
}

__all__ = [
    "CIFAR_MODELS",
    "VGG",
    "MobileNetV2",
    "ResNet",
    "ShuffleNet",
    "ShuffleNetV2",
    "WideResNet",
]
