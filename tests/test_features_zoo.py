"""Feature access for the rest of mdistiller's zoo: ShuffleV1, ShuffleV2, MobileNetV2 (CIFAR),
the CIFAR resnetv2 ResNet18/ResNet50 and the ImageNet MobileNetV1.

The references transcribe the ``forward`` of mdistiller's models/cifar/ShuffleNetv1.py,
ShuffleNetv2.py, mobilenetv2.py, resnetv2.py and models/imagenet/mobilenetv1.py (what they put in
``feats["feats"]``, ``feats["preact_feats"]``, ``feats["pooled_feat"]``), walking gkl's ports,
whose module names and state_dicts are mdistiller's. The expected stage channels and BN layers are
those of mdistiller's ``get_stage_channels()`` and ``get_bn_before_relu()``. The smoke runs build
the feature baselines on the heterogeneous pairs through the Hydra config.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gkl.distillers import ReviewKD
from gkl.models import create_model
from gkl.models.factory import create_timm_model
from gkl.models.features import (
    bn_before_relu,
    forward_with_features,
    pooled_feature_dim,
    stage_channels,
)
from gkl.models.wrappers import FrozenTeacher
from gkl.train import run

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------- mdistiller's forwards, transcribed


def ref_shuffle(x, g):
    n, c, h, w = x.size()
    return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def ref_shufflev1(net, x):
    """ShuffleNetv1.py: ``Bottleneck.forward`` (``is_last`` returns ``(out, preact)``) and
    ``ShuffleNet.forward``."""

    def bottleneck(b, x, is_last):
        g = 1 if b.conv1.in_channels == 24 else 3  # mdistiller: g = 1 if in_planes == 24
        out = F.relu(b.bn1(b.conv1(x)))
        out = ref_shuffle(out, g)
        out = F.relu(b.bn2(b.conv2(out)))
        out = b.bn3(b.conv3(out))
        res = nn.AvgPool2d(3, stride=2, padding=1)(x) if b.stride == 2 else x
        preact = torch.cat([out, res], 1) if b.stride == 2 else out + res
        out = F.relu(preact)
        return (out, preact) if is_last else out

    def layer(stage, x):
        for i, b in enumerate(stage):
            x = bottleneck(b, x, i == len(stage) - 1)
        return x

    out = F.relu(net.bn1(net.conv1(x)))
    f0 = out
    out, f1_pre = layer(net.layer1, out)
    f1 = out
    out, f2_pre = layer(net.layer2, out)
    f2 = out
    out, f3_pre = layer(net.layer3, out)
    f3 = out
    out = F.avg_pool2d(out, 4)
    f4 = out.reshape(out.size(0), -1)
    return net.linear(f4), [f0, f1, f2, f3], [f0, f1_pre, f2_pre, f3_pre], f4


def ref_shufflev2(net, x):
    """ShuffleNetv2.py: ``SplitBlock``, ``BasicBlock`` (``is_last``), ``DownBlock``, forward."""

    def basic(b, x, is_last):
        c = int(x.size(1) * 0.5)
        x1, x2 = x[:, :c, :, :], x[:, c:, :, :]
        out = F.relu(b.bn1(b.conv1(x2)))
        out = b.bn2(b.conv2(out))
        preact = b.bn3(b.conv3(out))
        out = F.relu(preact)
        preact = torch.cat([x1, preact], 1)
        out = torch.cat([x1, out], 1)
        out = ref_shuffle(out, 2)
        return (out, preact) if is_last else out

    def down(b, x):
        out1 = b.bn1(b.conv1(x))
        out1 = F.relu(b.bn2(b.conv2(out1)))
        out2 = F.relu(b.bn3(b.conv3(x)))
        out2 = b.bn4(b.conv4(out2))
        out2 = F.relu(b.bn5(b.conv5(out2)))
        return ref_shuffle(torch.cat([out1, out2], 1), 2)

    def layer(stage, x):
        x = down(stage[0], x)
        for i, b in enumerate(stage[1:]):
            x = basic(b, x, i == len(stage) - 2)
        return x

    out = F.relu(net.bn1(net.conv1(x)))
    f0 = out
    out, f1_pre = layer(net.layer1, out)
    f1 = out
    out, f2_pre = layer(net.layer2, out)
    f2 = out
    out, f3_pre = layer(net.layer3, out)
    f3 = out
    out = F.relu(net.bn2(net.conv2(out)))
    out = F.avg_pool2d(out, 4)
    f4 = out.reshape(out.size(0), -1)
    return net.linear(f4), [f0, f1, f2, f3], [f0, f1_pre, f2_pre, f3_pre], f4


def ref_mobilenetv2(net, x):
    """mobilenetv2.py: ``InvertedResidual.forward`` and ``MobileNetV2.forward`` (no
    ``preact_feats``: gkl gives the features themselves, checked separately)."""

    def blocks(seq, x):
        for b in seq:
            stride, inp, oup = b.conv[3].stride[0], b.conv[0].in_channels, b.conv[6].out_channels
            x = x + b.conv(x) if stride == 1 and inp == oup else b.conv(x)
        return x

    out = net.conv1(x)
    f0 = out
    out = blocks(net.blocks[0], out)
    out = blocks(net.blocks[1], out)
    f1 = out
    out = blocks(net.blocks[2], out)
    f2 = out
    out = blocks(net.blocks[3], out)
    out = blocks(net.blocks[4], out)
    f3 = out
    out = blocks(net.blocks[5], out)
    out = blocks(net.blocks[6], out)
    f4 = out
    out = net.conv2(out)
    out = nn.AvgPool2d(32 // 16, ceil_mode=True)(out)  # H = input_size // (32 // 2)
    avg = out.reshape(out.size(0), -1)
    return net.classifier(avg), [f0, f1, f2, f3, f4], None, avg


def ref_resnetv2(net, x):
    """resnetv2.py: ``BasicBlock`` / ``Bottleneck.forward`` (``is_last``) and ``ResNet.forward``."""

    def block(b, x, is_last):
        out = F.relu(b.bn1(b.conv1(x)))
        if hasattr(b, "conv3"):
            out = F.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
        else:
            out = b.bn2(b.conv2(out))
        out = out + b.shortcut(x)
        preact = out
        out = F.relu(out)
        return (out, preact) if is_last else out

    def layer(stage, x):
        for i, b in enumerate(stage):
            x = block(b, x, i == len(stage) - 1)
        return x

    out = F.relu(net.bn1(net.conv1(x)))
    f0 = out
    out, f1_pre = layer(net.layer1, out)
    f1 = out
    out, f2_pre = layer(net.layer2, out)
    f2 = out
    out, f3_pre = layer(net.layer3, out)
    f3 = out
    out, f4_pre = layer(net.layer4, out)
    f4 = out
    avg = nn.AdaptiveAvgPool2d((1, 1))(out).reshape(out.size(0), -1)
    feats, preacts = [f0, f1, f2, f3, f4], [f0, f1_pre, f2_pre, f3_pre, f4_pre]
    return net.linear(avg), feats, preacts, avg


def ref_mobilenetv1(net, x):
    """imagenet/mobilenetv1.py ``forward`` (``AvgPool2d(7)`` at 224: the whole final map)."""
    m = net.model
    feat1 = m[3][:-1](m[0:3](x))
    feat2 = m[5][:-1](m[4:5](F.relu(feat1)))
    feat3 = m[11][:-1](m[6:11](F.relu(feat2)))
    feat4 = m[13][:-1](m[12:13](F.relu(feat3)))
    feat5 = F.avg_pool2d(F.relu(feat4), feat4.shape[-1])
    avg = feat5.reshape(-1, 1024)
    feats = [F.relu(feat1), F.relu(feat2), F.relu(feat3), F.relu(feat4)]
    return net.fc(avg), feats, [feat1, feat2, feat3, feat4], avg


def randomize_bn(net: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics (an untrained net has 1/0)."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=generator, dtype=m.weight.dtype)
            m.bias.data = 0.5 * torch.randn(c, generator=generator, dtype=m.weight.dtype)
            m.running_mean = 0.1 * torch.randn(c, generator=generator, dtype=m.weight.dtype)
            m.running_var = 0.5 + torch.rand(c, generator=generator, dtype=m.weight.dtype)


# name, input shape, reference, mdistiller's stage channels (None: no get_stage_channels), some
# mdistiller state_dict keys
FAMILIES = {
    "ShuffleV1": (
        (3, 32, 32),
        ref_shufflev1,
        None,  # ShuffleNetv1.py: `self.stage_channels` is commented out, no get_stage_channels
        ["layer1.0.conv1.weight", "layer3.3.bn3.running_var", "linear.weight"],
    ),
    "ShuffleV2": (
        (3, 32, 32),
        ref_shufflev2,
        [24, 116, 232, 464],  # [24] + list(stage_channels[:-1]), net size 1
        ["layer1.0.conv5.weight", "layer3.3.bn3.running_var", "bn2.weight", "linear.weight"],
    ),
    "MobileNetV2": (
        (3, 32, 32),
        ref_mobilenetv2,
        [16, 12, 16, 48, 160],  # [32, 24, 32, 96, 320] * width 0.5
        ["conv1.0.weight", "blocks.6.0.conv.7.running_var", "conv2.1.weight", "classifier.0.bias"],
    ),
    "ResNet50": (
        (3, 16, 16),  # adaptive pooling: any size; small for speed
        ref_resnetv2,
        [256, 512, 1024, 2048],  # mdistiller's list leaves out the stem (64) that feats has
        ["layer1.0.shortcut.0.weight", "layer4.2.bn3.running_var", "linear.weight"],
    ),
    "ResNet18": (
        (3, 16, 16),
        ref_resnetv2,
        None,  # mdistiller hard-codes ResNet50's [256, 512, 1024, 2048] for every depth
        ["layer2.0.shortcut.1.running_mean", "layer4.1.bn2.weight"],
    ),
    "MobileNetV1": (
        (3, 64, 64),  # ImageNet network, small input (final map 2x2 instead of 7x7)
        ref_mobilenetv1,
        [128, 256, 512, 1024],
        ["model.0.0.weight", "model.13.4.running_var", "fc.weight"],
    ),
}


def make(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = create_model(name, 1000 if name == "MobileNetV1" else 100).to(dtype)
    randomize_bn(net, torch.Generator().manual_seed(seed + 1))
    return net


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_are_the_models_and_state_dict_is_untouched(name):
    shape, _, _, keys = FAMILIES[name]
    net = make(name)
    before = list(net.state_dict())
    assert set(keys) <= set(before)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(2))
    for train in (False, True):
        plain, featured = copy.deepcopy(net).train(train), copy.deepcopy(net).train(train)
        logits, _ = forward_with_features(featured, x)
        assert torch.equal(logits, plain(x)), (name, train)
        # the same BN running statistics after one call each
        for (k, a), b in zip(
            plain.state_dict().items(), featured.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), (name, train, k)
    assert list(net.state_dict()) == before
    assert list(featured.state_dict()) == before


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_features_equal_mdistillers_forward(name, train):
    shape, reference, _, _ = FAMILIES[name]
    net = make(name, torch.float64).train(train)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref_net = copy.deepcopy(net)
    logits, f = forward_with_features(net, x)
    with torch.no_grad():
        ref_logits, feats, preacts, pooled = reference(ref_net, x)
    torch.testing.assert_close(logits, ref_logits)
    assert len(f.feats) == len(feats) and len(f.preact_feats) == len(feats)
    for ours, theirs in zip(f.feats, feats, strict=True):
        torch.testing.assert_close(ours, theirs)
    if preacts is None:  # MobileNetV2: no ReLU after its stages; gkl's preacts are the feats
        assert all(p is q for p, q in zip(f.preact_feats, f.feats, strict=True))
    else:
        for ours, theirs in zip(f.preact_feats, preacts, strict=True):
            torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(f.pooled_feat, pooled)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stage_channels_are_mdistillers(name):
    shape, _, expected, _ = FAMILIES[name]
    net = make(name)
    channels = stage_channels(net, shape)
    if name == "ShuffleV1":
        assert channels == [24, 240, 480, 960]
    elif name == "ResNet50":
        assert channels == [64, *expected]
    elif name == "ResNet18":
        assert channels == [64, 64, 128, 256, 512]
    else:
        assert channels == expected
    pooled = {"ShuffleV1": 960, "ShuffleV2": 1024, "MobileNetV2": 1280, "ResNet18": 512}
    assert pooled_feature_dim(net, shape) == pooled.get(name, 2048 if name == "ResNet50" else 1024)


def test_bn_before_relu_are_mdistillers_modules():
    # mobilenetv2.py get_bn_before_relu
    mv2 = make("MobileNetV2")
    expected = [mv2.blocks[1][-1].conv[-1], mv2.blocks[2][-1].conv[-1]]
    expected += [mv2.blocks[4][-1].conv[-1], mv2.blocks[6][-1].conv[-1]]
    assert all(a is b for a, b in zip(bn_before_relu(mv2), expected, strict=True))
    # resnetv2.py: bn3 of each stage's last Bottleneck, bn2 for BasicBlocks
    r50, r18 = make("ResNet50"), make("ResNet18")
    expected = [r50.layer1[-1].bn3, r50.layer2[-1].bn3, r50.layer3[-1].bn3, r50.layer4[-1].bn3]
    assert all(a is b for a, b in zip(bn_before_relu(r50), expected, strict=True))
    expected = [r18.layer1[-1].bn2, r18.layer2[-1].bn2, r18.layer3[-1].bn2, r18.layer4[-1].bn2]
    assert all(a is b for a, b in zip(bn_before_relu(r18), expected, strict=True))
    # imagenet/mobilenetv1.py
    mv1 = make("MobileNetV1")
    expected = [mv1.model[3][-2], mv1.model[5][-2], mv1.model[11][-2], mv1.model[13][-2]]
    assert all(a is b for a, b in zip(bn_before_relu(FrozenTeacher(mv1)), expected, strict=True))
    # ShuffleNetv1.py / ShuffleNetv2.py raise NotImplementedError ("Overhaul" teacher)
    for name in ("ShuffleV1", "ShuffleV2"):
        with pytest.raises(NotImplementedError, match="Overhaul"):
            bn_before_relu(make(name))


# ReviewKD's IN/OUT_CHANNELS, SHAPES, OUT_SHAPES: mdistiller has them only for the ImageNet pair
# (configs/imagenet/r50_mv1/reviewkd.yaml); the CIFAR ones are the ReviewKD authors'
# (dvlab-research/ReviewKD, CIFAR-100/model/reviewkd.py, build_review_kd).
REVIEWKD_SETTINGS = {
    ("resnet32x4", "ShuffleV1"): (
        [240, 480, 960, 960],
        [64, 128, 256, 256],
        [1, 4, 8, 16],
        [1, 8, 16, 32],
    ),
    ("wrn_40_2", "ShuffleV1"): (
        [240, 480, 960, 960],
        [32, 64, 128, 128],
        [1, 4, 8, 16],
        [1, 8, 16, 32],
    ),
    ("resnet32x4", "ShuffleV2"): (
        [116, 232, 464, 1024],
        [64, 128, 256, 256],
        [1, 4, 8, 16],
        [1, 8, 16, 32],
    ),
    ("vgg13", "MobileNetV2"): (
        [12, 16, 48, 160, 1280],
        [128, 256, 512, 512, 512],
        [1, 2, 4, 8, 16],
        [1, 4, 4, 8, 16],
    ),
    ("ResNet50", "MobileNetV2"): (
        [12, 16, 48, 160, 1280],
        [256, 512, 1024, 2048, 2048],
        [1, 2, 4, 8, 16],
        [1, 4, 8, 16, 32],
    ),
    ("resnet50", "MobileNetV1"): (
        [128, 256, 512, 1024, 1024],
        [256, 512, 1024, 2048, 2048],
        [1, 7, 14, 28, 56],
        [1, 7, 14, 28, 56],
    ),
}


@pytest.mark.parametrize("pair", list(REVIEWKD_SETTINGS))
def test_reviewkd_sizes_its_levels_as_the_authors_configs(pair):
    teacher_name, student_name = pair
    imagenet = student_name == "MobileNetV1"
    if imagenet:
        teacher, student = create_timm_model(teacher_name, 1000), create_model(student_name, 1000)
    else:
        teacher, student = create_model(teacher_name, 100), create_model(student_name, 100)
    loss = ReviewKD(input_shape=(3, 224, 224) if imagenet else (3, 32, 32))
    loss.setup(student, FrozenTeacher(teacher))
    in_channels, out_channels, shapes, out_shapes = REVIEWKD_SETTINGS[pair]
    abfs = list(loss.abfs)[::-1]  # shallowest first, as the configs list them
    assert [a.conv1[0].in_channels for a in abfs] == in_channels
    assert [a.conv2[0].out_channels for a in abfs] == out_channels
    assert {a.conv1[0].out_channels for a in abfs} == {min(512, in_channels[-1])}
    assert loss.shapes == shapes
    assert loss.out_shapes == out_shapes


# --------------------------------------------------- one training step through the Hydra config

PAIRS = [
    "cifar100_kd_res32x4_shuv1",
    "cifar100_kd_res32x4_shuv2",
    "cifar100_kd_wrn40_2_shuv1",
    "cifar100_kd_vgg13_mv2",
    "cifar100_kd_res50_mv2",
    "imagenet_kd_r50_mv1",
]
SMOKE = [(pair, method) for pair in PAIRS for method in ("ofd", "reviewkd")]
SMOKE.append(("cifar100_kd_res32x4_shuv2", "crd"))


@pytest.mark.parametrize("pair, method", SMOKE)
def test_feature_baseline_trains_one_step_on_the_pair(compose_cfg, tmp_path, pair, method):
    overrides = [f"+experiment={pair}", f"+baseline={method}", "data.synthetic=true"]
    overrides += ["trainer.fast_dev_run=true", "data.num_workers=0"]
    if pair.startswith("cifar"):
        overrides += ["data.batch_size=4", "++data.synthetic_sizes=[8,4,4]"]
    cfg = compose_cfg(tmp_path, overrides)
    assert cfg.loss._target_.rsplit(".", 1)[1].lower() == method
    if pair == "imagenet_kd_r50_mv1":  # mdistiller's configs/imagenet/r50_mv1/<method>.yaml
        expected = {"ofd": 0.0001, "reviewkd": 8.0}[method]
        assert cfg.loss.feat_weight == expected
        if method == "reviewkd":
            assert cfg.loss.stu_preact and cfg.task.warmup_epochs == 1
    metrics = run(cfg)
    assert math.isfinite(metrics["test/loss"])
