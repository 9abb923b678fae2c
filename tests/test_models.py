"""Model zoo, factory, wrappers and checkpoint loading."""

import hashlib

import pytest
import torch
from torch import nn

from gkl.models import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    FMNIST_MEAN,
    FMNIST_STD,
    FrozenTeacher,
    Normalized,
    create_model,
    create_timm_model,
    list_models,
    load_mdistiller_checkpoint,
)
from gkl.models.cifar import CIFAR_MODELS
from gkl.models.small import SMALL_MODELS

# (parameters for num_classes=100, digest of the sorted "key:shape" state_dict layout), both
# computed from mdistiller's own definitions (megvii-research/mdistiller, models/cifar); the
# WRN-28-10/34-10 rows come from the same WideResNet class, which is also TRADES'/RobustBench's.
MDISTILLER_LAYOUT = {
    "resnet8": (83_892, "166d31a811b31c5f"),
    "resnet14": (181_108, "8525efa6fc491f19"),
    "resnet20": (278_324, "6db44f39e3bff21f"),
    "resnet32": (472_756, "325ee6108709f7b5"),
    "resnet44": (667_188, "f1263f7b0ed71e1a"),
    "resnet56": (861_620, "3977b81559d8630f"),
    "resnet110": (1_736_564, "7f8e5ac1814e480a"),
    "resnet8x4": (1_233_540, "5d5871b403f3a649"),
    "resnet32x4": (7_433_860, "610ad29043c56b33"),
    "wrn_16_1": (180_916, "f6cf46040022f13d"),
    "wrn_16_2": (703_284, "bdbc50a2b3205f84"),
    "wrn_40_1": (569_780, "deef22602ae7584b"),
    "wrn_40_2": (2_255_156, "bf5731c8e8e2b95f"),
    "wrn_28_10": (36_536_884, "305a91f235396918"),
    "wrn_34_10": (46_218_164, "0889c341d7f66b4c"),
    "vgg8": (3_965_028, "d9f8d7533423754e"),
    "vgg11": (9_277_284, "6592bd1869a5938f"),
    "vgg13": (9_462_180, "7bec65f1ca17a0bf"),
    "vgg16": (14_774_436, "b420ddff7e4306ec"),
    "vgg19": (20_086_692, "2d318270df30c723"),
    "MobileNetV2": (812_836, "10e9036e17013c38"),
    "ShuffleV1": (949_258, "eb3bcbc847930cce"),
    "ShuffleV2": (1_355_528, "b7e2c3e764687767"),
    "ResNet18": (11_220_132, "bb5021dad9541605"),
    "ResNet50": (23_705_252, "d4a9e0738c8f8385"),
    # mdistiller's models/imagenet/mobilenetv1.py with its fc resized to 100 classes.
    "MobileNetV1": (3_309_476, "abb444bd6ce39566"),
}
FMNIST_PARAMS = {
    "fmnist_cnn": 104_426,
    "fmnist_mlp": 25_450,
    "fmnist_cnn_small": 8_834,
    "fmnist_cnn_at": 173_690,
}
# Real CPU forward passes: the biggest run a batch of one; the costliest are marked slow (their
# shapes are still checked on the meta device by test_zoo_shapes_on_meta_device).
BIG = {"wrn_28_10", "wrn_34_10", "ResNet50"}
SLOW = BIG | {"ResNet18", "vgg16", "vgg19", "resnet110"}


def _meta_model(name: str, num_classes: int) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _save(tmp_path, obj, name: str = "ckpt.pth") -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_registry_lists_zoo_and_fmnist_models():
    assert set(list_models()) == set(MDISTILLER_LAYOUT) | set(FMNIST_PARAMS)
    assert set(CIFAR_MODELS) == set(MDISTILLER_LAYOUT)


@pytest.mark.parametrize("name", list(MDISTILLER_LAYOUT))
def test_zoo_matches_mdistiller_layout(name):
    params, digest = MDISTILLER_LAYOUT[name]
    model = _meta_model(name, 100)
    assert _n_params(model) == params
    layout = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    assert hashlib.sha256(layout.encode()).hexdigest()[:16] == digest


@pytest.mark.parametrize("name", list(MDISTILLER_LAYOUT))
def test_zoo_shapes_on_meta_device(name):
    model = _meta_model(name, 7)
    x = torch.empty(2, 3, 32, 32, device="meta")
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert model.forward_features(x).shape == (2, head.in_features)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MDISTILLER_LAYOUT],
)
def test_zoo_forward(name):
    num_classes = 10 if name in SLOW else 100
    batch = 1 if name in BIG else 2
    model = create_model(name, num_classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(batch, 3, 32, 32))
    assert logits.shape == (batch, num_classes)
    assert torch.isfinite(logits).all()


def test_zoo_in_channels_and_other_resolution():
    model = create_model("resnet8", 10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", list(FMNIST_PARAMS))
def test_fmnist_models(name):
    model = create_model(name, 10)
    assert _n_params(model) == FMNIST_PARAMS[name]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert set(SMALL_MODELS) == set(FMNIST_PARAMS)


def test_unknown_name_lists_choices_and_suggests():
    with pytest.raises(ValueError) as info:
        create_model("resnet8x5", 100)
    msg = str(info.value)
    assert "Did you mean: resnet8x4" in msg
    assert all(name in msg for name in list_models())
    with pytest.raises(ValueError, match="Did you mean: MobileNetV2"):
        create_model("mobilenetv2", 100)


def test_timm_model_offline():
    model = create_timm_model("resnet18", num_classes=10, pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    gray = create_timm_model("resnet18", 10, in_chans=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="resnet18"):
        create_timm_model("resnet81", 10)
    with pytest.raises(ValueError, match="source=timm"):
        create_model("timm/resnet18", 10)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics so that eval-mode logits depend on every buffer."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def test_mdistiller_checkpoint_roundtrip(tmp_path):
    source = create_model("resnet8x4", 100).eval()
    _randomise_bn(source)
    path = _save(tmp_path, {"model": source.state_dict(), "epoch": 240, "best_acc": 73.1})
    target = create_model("resnet8x4", 100).eval()
    assert load_mdistiller_checkpoint(target, path, arch_name="resnet8x4") is target
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_bare_and_lightning_checkpoints(tmp_path):
    student, teacher = create_model("resnet8", 10), create_model("resnet20", 10)
    _randomise_bn(student)
    _randomise_bn(teacher)
    bare = _save(tmp_path, {f"module.{k}": v for k, v in student.state_dict().items()}, "bare")
    loaded = load_mdistiller_checkpoint(create_model("resnet8", 10), bare)
    torch.testing.assert_close(loaded.state_dict(), student.state_dict())

    lightning = {
        "state_dict": {
            **{f"student.model.{k}": v for k, v in student.state_dict().items()},
            **{f"teacher.model.model.{k}": v for k, v in teacher.state_dict().items()},
        },
        "epoch": 3,
    }
    path = _save(tmp_path, lightning, "lightning.ckpt")
    loaded = load_mdistiller_checkpoint(create_model("resnet20", 10), path)
    torch.testing.assert_close(loaded.state_dict(), teacher.state_dict())
    wrapped = Normalized(create_model("resnet20", 10), CIFAR100_MEAN, CIFAR100_STD)
    load_mdistiller_checkpoint(wrapped, path, prefix="teacher.model.")
    torch.testing.assert_close(wrapped.model.state_dict(), teacher.state_dict())


def test_checkpoint_class_count_mismatch(tmp_path):
    path = _save(tmp_path, {"model": create_model("resnet8x4", 10).state_dict()})
    with pytest.raises(ValueError) as info:
        load_mdistiller_checkpoint(create_model("resnet8x4", 100), path, arch_name="resnet8x4")
    msg = str(info.value)
    assert "checkpoint has 10 classes, model has 100" in msg
    assert "'resnet8x4'" in msg and "fc.weight" in msg


def test_checkpoint_other_architecture(tmp_path):
    path = _save(tmp_path, {"model": create_model("wrn_16_1", 10).state_dict()})
    model = create_model("resnet8", 100)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_mdistiller_checkpoint(model, path, arch_name="resnet8")
    msg = str(info.value)
    assert "expected architecture 'resnet8'" in msg
    assert "looks like 'wrn_16_1'" in msg
    assert "checkpoint has 10 classes, model has 100" in msg
    assert "missing keys (48)" in msg and "unexpected keys (74)" in msg
    torch.testing.assert_close(model.state_dict(), before)  # untouched on failure


def test_normalized_applies_mean_std():
    inner = create_model("resnet8", 10).eval()
    model = Normalized(inner, CIFAR100_MEAN, CIFAR100_STD).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), inner((x - mean) / std))
    assert list(model.state_dict()) == [f"model.{k}" for k in inner.state_dict()]
    assert model.double().mean.dtype == torch.float64

    gray = Normalized(nn.Identity(), FMNIST_MEAN, FMNIST_STD)
    y = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(gray(y), (y - 0.2860) / 0.3530)
    with pytest.raises(ValueError):
        Normalized(nn.Identity(), (0.5, 0.5), (0.5,))


def test_frozen_teacher_stays_eval_without_grads():
    teacher = FrozenTeacher(create_model("resnet8", 10))
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    stats = teacher.model.bn1.running_mean.clone()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad
    torch.testing.assert_close(teacher.model.bn1.running_mean, stats)
    parent = nn.ModuleDict({"student": nn.Linear(2, 2), "teacher": teacher}).train()
    assert parent["student"].training and not parent["teacher"].training


def test_imagenet_mobilenet_v1_has_mdistillers_layout_and_parameter_count():
    from gkl.models import create_model

    model = create_model("MobileNetV1", num_classes=1000)
    blocks = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
    blocks += [(512, 512)] * 5 + [(512, 1024), (1024, 1024)]
    # conv 3x3 (3 -> 32) + BN; per block: depthwise 3x3 + BN, pointwise 1x1 + BN; fc 1024 -> 1000.
    expected = 3 * 32 * 9 + 2 * 32
    expected += sum(i * 9 + 2 * i + i * o + 2 * o for i, o in blocks)
    expected += 1024 * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) == expected
    keys = model.state_dict().keys()
    assert {"model.0.0.weight", "model.13.0.weight", "model.13.4.running_var", "fc.weight"} <= keys
    model.eval()
    assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1000)


def test_normalize_false_feeds_the_images_unchanged():
    from gkl.models.build import build_classifier

    torch.manual_seed(0)
    wrapped = build_classifier("resnet8", 10, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), normalize=False)
    wrapped.eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(wrapped(x), wrapped.model(x))
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in wrapped.model.state_dict()}


def test_select_weights_prefers_the_started_weight_average_then_the_ema():
    from gkl.models.checkpoint import select_weights

    def ckpt(count=None, ema=False):
        state = {"model.w": torch.tensor(1.0)}
        if ema:
            state["ema_model.w"] = torch.tensor(2.0)
        if count is not None:
            state["averaged_model.model.w"] = torch.tensor(3.0)
            state["averaged_model.count"] = torch.tensor(count)
        return {"state_dict": state}

    def value(obj, weights="auto"):
        sd, chosen = select_weights(obj, weights)
        return float(sd["w"]), chosen

    assert value(ckpt()) == (1.0, "model")
    assert value(ckpt(ema=True)) == (2.0, "ema")
    assert value(ckpt(count=2, ema=True)) == (3.0, "average")
    assert value(ckpt(count=0)) == (1.0, "model")  # the average has not started yet
    assert value(ckpt(count=2), "model") == (1.0, "model")
    with pytest.raises(ValueError, match="weights=average"):
        select_weights(ckpt(count=0), "average")
