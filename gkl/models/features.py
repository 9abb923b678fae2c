"""Intermediate features of zoo networks in mdistiller's format, for the feature distillers.

:func:`forward_with_features` runs a network's own modules in their own order and returns
``(logits, Features)``: ``feats`` (the stem's output then each stage's output, as mdistiller's
``feats["feats"]``), ``preact_feats`` (the same before the stage's last ReLU, mdistiller's
``feats["preact_feats"]``) and ``pooled_feat`` (the globally pooled penultimate feature). The
logits equal ``model(x)``; the networks' ``forward`` and state_dicts are untouched, so the logits
path costs the same when no feature method is chosen. :func:`bn_before_relu` and
:func:`stage_channels` give what OFD and ReviewKD read from the teacher / student.

Supported families: mdistiller's CIFAR zoo ``ResNet`` (resnet8 ... resnet110, resnet8x4,
resnet32x4), ``WideResNet`` (wrn_16_1 ... wrn_40_2) and ``VGG`` (vgg8 ... vgg19); on ImageNet
timm's ``ResNet`` (``model=timm``: resnet18, resnet34, resnet50, ...) in the layout of
mdistiller's ImageNet ResNet (stem before ReLU and the four stages, pre-ReLU and after); and
the Fashion-MNIST ``SmallCNN`` (fmnist_cnn, fmnist_cnn_small, ...): one feature per
conv-BN-ReLU-pool block (``maxpool(BN output)`` before the ReLU, which commutes with the pool),
the classifier's input as ``pooled_feat``.

Also, as mdistiller's ``forward`` returns them (models/cifar/ShuffleNetv1.py, ShuffleNetv2.py,
mobilenetv2.py, resnetv2.py, models/imagenet/mobilenetv1.py): CIFAR ``ShuffleNet`` (ShuffleV1)
and ``ShuffleNetV2`` (ShuffleV2): the stem then the three stages, ``preact_feats`` the last
block's value before its final ReLU (ShuffleV2: ``cat(x1, branch)`` before the channel shuffle);
CIFAR ``MobileNetV2`` (MobileNetV2 = mobile_half): the stem and the outputs of blocks 1, 2, 4 and 6
(linear bottlenecks, no ReLU after them: ``preact_feats`` are the same tensors, mdistiller has
none); the CIFAR ``resnetv2.ResNet`` (ResNet18, ResNet50): the stem and the four stages; and
ImageNet ``MobileNetV1``: four stages (blocks 3, 5, 11, 13; no stem entry, as mdistiller), pre-ReLU
and after. ShuffleNets have no :func:`bn_before_relu` (mdistiller raises: no OFD teacher).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gkl.models.cifar.mobilenetv2 import MobileNetV2
from gkl.models.cifar.resnet import BasicBlock as ResNetBlock
from gkl.models.cifar.resnet import ResNet
from gkl.models.cifar.resnetv2 import ResNet as ResNetV2
from gkl.models.cifar.shufflenetv1 import Bottleneck as ShuffleV1Block
from gkl.models.cifar.shufflenetv1 import ShuffleNet, channel_shuffle
from gkl.models.cifar.shufflenetv2 import BasicBlock as ShuffleV2Block
from gkl.models.cifar.shufflenetv2 import ShuffleNetV2
from gkl.models.cifar.vgg import VGG
from gkl.models.cifar.wrn import WideResNet
from gkl.models.mobilenetv1 import MobileNetV1
from gkl.models.small import SmallCNN
from gkl.models.wrappers import FrozenTeacher, Normalized


def _is_timm_resnet(net: nn.Module) -> bool:
    return type(net).__name__ == "ResNet" and type(net).__module__.startswith("timm.")


@dataclass
class Features:
    """mdistiller's feature dict: stage features, their pre-ReLU values, the pooled feature."""

    feats: list[torch.Tensor]
    preact_feats: list[torch.Tensor]
    pooled_feat: torch.Tensor


def _unwrap(model: nn.Module) -> tuple[nn.Module, Normalized | None]:
    """The bare network inside ``FrozenTeacher`` / ``Normalized`` wrappers, and the normaliser."""
    if isinstance(model, FrozenTeacher):
        model = model.model
    norm = None
    if isinstance(model, Normalized):
        norm, model = model, model.model
    return model, norm


def bare_network(model: nn.Module) -> nn.Module:
    """The zoo network inside the wrappers; a ``ValueError`` for families without features."""
    net, _ = _unwrap(model)
    if not isinstance(net, SUPPORTED) and not _is_timm_resnet(net):
        names = ", ".join(c.__name__ for c in SUPPORTED) + ", timm ResNet"
        raise ValueError(
            f"feature distillers need a network with feature access; {type(net).__name__} has no "
            f"feature access (supported families: {names}). Choose a pair of those, or a logit "
            "loss (+baseline=kd|dkd, loss=gkl)."
        )
    return net


def has_stem_feature(model: nn.Module) -> bool:
    """Whether ``feats[0]`` is the stem's output: every family but mdistiller's ImageNet
    ``MobileNetV1``, whose ``feats`` are its four stages only."""
    return not isinstance(bare_network(model), MobileNetV1)


def supports_features(model: nn.Module) -> bool:
    """Whether :func:`forward_with_features` can run ``model``."""
    net = _unwrap(model)[0]
    return isinstance(net, SUPPORTED) or _is_timm_resnet(net)


def _resnet_block_preact(block: ResNetBlock, x: torch.Tensor) -> torch.Tensor:
    """``bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)``: the block's output before its ReLU."""
    out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    return out + (x if block.downsample is None else block.downsample(x))


def _residual_stages(
    x: torch.Tensor,
    stages: tuple[nn.Sequential, ...],
    last_block_preact: Callable[[nn.Module, torch.Tensor], torch.Tensor],
) -> Features:
    """The stem output ``x``, then each stage's output (after / before its last block's ReLU)."""
    feats, preacts = [x], [x]
    for stage in stages:
        for block in stage[:-1]:
            x = block(x)
        pre = last_block_preact(stage[-1], x)
        x = F.relu(pre)
        feats.append(x)
        preacts.append(pre)
    return Features(feats, preacts, torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet(net: ResNet, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    stages = (net.layer1, net.layer2, net.layer3)
    features = _residual_stages(F.relu(net.bn1(net.conv1(x))), stages, _resnet_block_preact)
    return net.fc(features.pooled_feat), features


def _wrn(net: WideResNet, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    f0 = net.conv1(x)
    f1 = net.block1(f0)
    f2 = net.block2(f1)
    f3 = net.block3(f2)
    pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(net.bn1(f3)), 1), 1)
    # mdistiller: the pre-activations are the next BN's outputs on the stage features.
    preacts = [f0, net.block2.layer[0].bn1(f1), net.block3.layer[0].bn1(f2), net.bn1(f3)]
    return net.fc(pooled), Features([f0, f1, f2, f3], preacts, pooled)


def _vgg(net: VGG, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    x = F.relu(net.block0(x))
    feats, preacts = [x], [x]
    for i, block in enumerate((net.block1, net.block2, net.block3, net.block4)):
        if i < 3:
            x = F.max_pool2d(x, 2)
        pre = block(x)
        x = F.relu(pre)
        feats.append(x)
        preacts.append(pre)
    pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return net.classifier(pooled), Features(feats, preacts, pooled)


def _small_cnn(net: SmallCNN, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    layers = list(net.features)
    feats, preacts = [], []
    i = 0
    while isinstance(layers[i], nn.Conv2d):  # conv, BN, ReLU, pool per block
        pre = layers[i + 3](layers[i + 1](layers[i](x)))
        x = F.relu(pre)
        feats.append(x)
        preacts.append(pre)
        i += 4
    pooled = nn.Sequential(*layers[i:])(x)
    return net.classifier(pooled), Features(feats, preacts, pooled)


def _shufflev1_block_preact(block: ShuffleV1Block, x: torch.Tensor) -> torch.Tensor:
    """A ShuffleV1 block's output before its final ReLU (mdistiller's ``preact``: the concat with
    the avg-pooled input for stride 2, else the sum with the input)."""
    out = channel_shuffle(F.relu(block.bn1(block.conv1(x))), block.shuffle_groups)
    out = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(out)))))
    if block.stride == 2:
        return torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
    return out + x


def _shufflev1(net: ShuffleNet, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    # mdistiller: the is_last block's preact; its avg_pool2d(4) at 4x4 is the global pool
    stages = (net.layer1, net.layer2, net.layer3)
    features = _residual_stages(F.relu(net.bn1(net.conv1(x))), stages, _shufflev1_block_preact)
    return net.linear(features.pooled_feat), features


def _shufflev2(net: ShuffleNetV2, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    x = F.relu(net.bn1(net.conv1(x)))
    feats, preacts = [x], [x]
    for stage in (net.layer1, net.layer2, net.layer3):
        for block in stage[:-1]:
            x = block(x)
        block: ShuffleV2Block = stage[-1]
        x1, x2 = x.chunk(2, dim=1)
        out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x2)))))
        pre = block.bn3(block.conv3(out))
        x = channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        feats.append(x)
        # mdistiller's is_last preact: cat(x1, branch before its ReLU), *not* channel-shuffled
        # (so its channel order differs from the stage output's).
        preacts.append(torch.cat([x1, pre], 1))
    out = F.relu(net.bn2(net.conv2(x)))
    pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
    return net.linear(pooled), Features(feats, preacts, pooled)


def _mobilenetv2(net: MobileNetV2, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    x = net.conv1(x)
    feats = [x]
    for i, block in enumerate(net.blocks):
        x = block(x)
        if i in (1, 2, 4, 6):
            feats.append(x)
    pooled = torch.flatten(F.adaptive_avg_pool2d(net.conv2(x), 1), 1)
    # mdistiller's MobileNetV2 returns no preact_feats: its stage outputs are linear bottlenecks
    # (BN, + residual) with no ReLU after them, so the pre-activations are the features themselves
    # (the stem's, after its ReLU, as every family's first entry).
    return net.classifier(pooled), Features(feats, list(feats), pooled)


def _resnetv2_block_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A resnetv2 BasicBlock / Bottleneck's output before its final ReLU."""
    out = F.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):  # Bottleneck
        out = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(out)))))
    else:
        out = block.bn2(block.conv2(out))
    return out + block.shortcut(x)


def _resnetv2(net: ResNetV2, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    stages = (net.layer1, net.layer2, net.layer3, net.layer4)
    features = _residual_stages(F.relu(net.bn1(net.conv1(x))), stages, _resnetv2_block_preact)
    return net.linear(features.pooled_feat), features


# mdistiller's MobileNetV1 features: the outputs of blocks 3, 5, 11 and 13 (no stem entry).
_MOBILENETV1_STAGE_ENDS = (3, 5, 11, 13)


def _mobilenetv1(net: MobileNetV1, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    feats, preacts = [], []
    start = 0
    for end in _MOBILENETV1_STAGE_ENDS:
        x = net.model[start:end](x)
        pre = net.model[end][:-1](x)  # the block without its final ReLU
        x = F.relu(pre)
        feats.append(x)
        preacts.append(pre)
        start = end + 1
    pooled = net.model[start:](x).flatten(1)  # the average pool
    return net.fc(pooled), Features(feats, preacts, pooled)


def _timm_block_preact(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm BasicBlock / Bottleneck's output before its final activation."""
    shortcut = x if block.downsample is None else block.downsample(x)
    x = block.act1(block.drop_block(block.bn1(block.conv1(x))))
    if hasattr(block, "conv3"):  # Bottleneck
        x = block.aa(block.act2(block.drop_block(block.bn2(block.conv2(x)))))
        x = block.bn3(block.conv3(x))
    else:
        x = block.bn2(block.conv2(block.aa(x)))
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    return x + shortcut


def _timm_resnet(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    stem = net.bn1(net.conv1(x))
    x = net.maxpool(net.act1(stem))
    feats, preacts = [F.relu(stem)], [stem]
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in stage[:-1]:
            x = block(x)
        pre = _timm_block_preact(stage[-1], x)
        x = stage[-1].act3(pre) if hasattr(stage[-1], "act3") else stage[-1].act2(pre)
        feats.append(x)
        preacts.append(pre)
    pooled = net.forward_head(x, pre_logits=True)
    return net.fc(pooled), Features(feats, preacts, pooled)


# Each family's feature forward, in the order ``isinstance`` is tried; timm's ResNet is the rest.
_FAMILY_FORWARDS: dict[type[nn.Module], Callable[..., tuple[torch.Tensor, Features]]] = {
    ResNet: _resnet,
    WideResNet: _wrn,
    VGG: _vgg,
    SmallCNN: _small_cnn,
    ShuffleNet: _shufflev1,
    ShuffleNetV2: _shufflev2,
    MobileNetV2: _mobilenetv2,
    ResNetV2: _resnetv2,
    MobileNetV1: _mobilenetv1,
}
SUPPORTED = tuple(_FAMILY_FORWARDS)


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Features]:
    """``(model(x), Features)`` for a zoo network (bare, ``Normalized`` or ``FrozenTeacher``).

    A ``FrozenTeacher`` runs under ``torch.no_grad`` (its features carry no graph).
    """
    net = bare_network(model)
    _, norm = _unwrap(model)
    if isinstance(model, FrozenTeacher):
        with torch.no_grad():
            return forward_with_features(model.model, x)
    if norm is not None:
        x = (x - norm.mean) / norm.std
    for family, forward in _FAMILY_FORWARDS.items():
        if isinstance(net, family):
            return forward(net, x)
    return _timm_resnet(net, x)


def bn_before_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN layers before the stages' last ReLU (mdistiller's ``get_bn_before_relu``)."""
    net = bare_network(model)
    if isinstance(net, ResNet):
        return [stage[-1].bn2 for stage in (net.layer1, net.layer2, net.layer3)]
    if isinstance(net, WideResNet):
        return [net.block2.layer[0].bn1, net.block3.layer[0].bn1, net.bn1]
    if isinstance(net, VGG):
        return [block[-1] for block in (net.block1, net.block2, net.block3, net.block4)]
    if isinstance(net, SmallCNN):
        return [m for m in net.features if isinstance(m, nn.BatchNorm2d)][1:]
    if isinstance(net, (ShuffleNet, ShuffleNetV2)):
        # mdistiller's get_bn_before_relu raises for both: a stage's pre-activation concatenates
        # the input (V1, stride 2) or its first half (V2) to one BN's output.
        raise NotImplementedError(
            f"{type(net).__name__} has no BN before each stage's ReLU (mdistiller: not supported "
            'for "Overhaul" teacher); use it as the student'
        )
    if isinstance(net, MobileNetV2):  # the last block's projection BN of blocks 1, 2, 4, 6
        return [net.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]
    if isinstance(net, MobileNetV1):  # the pointwise BN of blocks 3, 5, 11, 13
        return [net.model[i][-2] for i in _MOBILENETV1_STAGE_ENDS]
    # CIFAR ResNetV2 and timm's ResNet: each stage's last block's last BN
    stages = (net.layer1, net.layer2, net.layer3, net.layer4)
    return [s[-1].bn3 if hasattr(s[-1], "bn3") else s[-1].bn2 for s in stages]


def _probe(model: nn.Module, input_shape: Sequence[int]) -> Features:
    """Features of one zero ``input_shape`` image, in eval mode (BN statistics untouched)."""
    net = bare_network(model)
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters())
        x = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
        with torch.no_grad():
            return forward_with_features(model, x)[1]
    finally:
        net.train(was_training)


def feature_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[torch.Size]:
    """Shapes of ``feats`` for one ``input_shape`` (C, H, W) image, batch dimension 1.

    Runs the network once in eval mode (BN statistics untouched) and restores its mode.
    """
    return [f.shape for f in _probe(model, input_shape).feats]


def pooled_feature_dim(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Length of ``pooled_feat`` for ``input_shape`` images."""
    return _probe(model, input_shape).pooled_feat.shape[1]


def stage_channels(model: nn.Module, input_shape: Sequence[int]) -> list[int]:
    """Channel count of each of ``feats``."""
    return [s[1] for s in feature_shapes(model, input_shape)]
