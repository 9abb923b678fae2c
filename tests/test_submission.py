"""RobustBench submission pieces: real card formats, ImageNet protocol, weight export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gkl.data import ImageNetDataModule
from gkl.data.imagenet import (
    PREPROCESSINGS,
    preprocessing_transform,
    read_test_ids,
    robustbench_test_ids_path,
)
from gkl.evaluate import model_card, robustbench_architecture, validate_model_card
from gkl.evaluate.export import export_robustbench, robustbench_network
from gkl.evaluate.robustbench_backend import _import_robustbench
from gkl.models import create_model
from gkl.models.wrappers import CIFAR10_MEAN, CIFAR10_STD, Normalized

FIXTURES = Path(__file__).parent / "fixtures" / "robustbench_model_info"
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:pkg_resources is deprecated"),
]


# ---------------------------------------------------------------- model cards


@pytest.mark.parametrize("path", sorted(FIXTURES.rglob("*.json")), ids=lambda p: p.stem)
def test_robustbench_real_cards_validate(path):
    card = json.loads(path.read_text())
    validate_model_card(card)
    assert path.parent.parent.name == card["dataset"]


def test_the_fixtures_cover_robustbench_formats():
    cards = [json.loads(p.read_text()) for p in FIXTURES.rglob("*.json")]
    assert any("footnote" not in c for c in cards)
    assert any("footnote" in c and c["footnote"] is None for c in cards)
    assert any("unreliable" not in c for c in cards)
    assert any("external" in c for c in cards)
    assert any(re.fullmatch(r"\d+\.\d", c["reported"] or "") for c in cards)
    assert any(c["reported"] == "" for c in cards)


def test_written_cards_follow_robustbench_style():
    common = {
        "name": "Decoupled Kullback-Leibler Divergence Loss",
        "link": "https://arxiv.org/abs/2305.13948",
        "authors": "Jiequan Cui, Zhuotao Tian",
        "architecture": "wrn_34_10",
        "venue": "NeurIPS 2024",
        "dataset": "cifar10",
        "eps": 8 / 255,
        "clean_acc": 0.8531,
        "autoattack_acc": 0.5709,
        "reported": 0.5709,
    }
    card = model_card(**common)
    reference = json.loads((FIXTURES / "cifar10/Linf/Cui2023Decoupled_WRN-34-10.json").read_text())
    for key in ("architecture", "eps", "clean_acc", "reported", "autoattack_acc", "unreliable"):
        assert card[key] == reference[key], key
    assert list(card) == list(reference)  # same fields, same order, no empty footnote
    marked = model_card(**common, footnote="Unreliable: PGD below AutoAttack.", unreliable=True)
    assert marked["unreliable"] is True and marked["footnote"].startswith("Unreliable")
    assert model_card(**common, external=0.55)["external"] == "55.00"


def test_robustbench_architecture_names():
    assert robustbench_architecture("wrn_34_10") == "WideResNet-34-10"
    assert robustbench_architecture("wrn_28_10") == "WideResNet-28-10"
    assert robustbench_architecture("resnet18") == "ResNet-18"
    assert robustbench_architecture("resnet8x4") == "ResNet-8x4"
    assert robustbench_architecture("WideResNet-70-16") == "WideResNet-70-16"


# ---------------------------------------------------------------- ImageNet protocol


def fake_imagenet(root: Path, ids: list[str], extra: int = 3) -> Path:
    """``root/val/<wnid>/<file>`` for ``ids`` plus ``extra`` unlisted images (random pixels)."""
    rng = np.random.default_rng(0)
    names = [*ids, *(f"{ids[0].split('/')[0]}/unlisted_{i}.JPEG" for i in range(extra))]
    for name in names:
        path = root / "val" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (300, 340, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG")
    return root


@pytest.mark.needs_robustbench
def test_robustbench_list_is_the_installed_packages_5000_ids():
    ids = read_test_ids("robustbench")
    assert len(ids) == 5000 and len(set(ids)) == 5000
    assert robustbench_test_ids_path().parts[-3:] == (
        "robustbench",
        "helper_files",
        "imagenet_test_image_ids.txt",
    )


def test_imagenet_test_set_follows_the_list_in_its_order(tmp_path):
    ids = [
        "n09468604/ILSVRC2012_val_00015253.JPEG",
        "n02823750/ILSVRC2012_val_00020685.JPEG",
        "n09468604/ILSVRC2012_val_00000001.JPEG",
        "n01440764/ILSVRC2012_val_00000293.JPEG",
    ]
    fake_imagenet(tmp_path, ids)
    listing = tmp_path / "ids.txt"
    listing.write_text("\n".join(ids) + "\n")
    dm = ImageNetDataModule(tmp_path, num_workers=0, num_classes=3, test_ids=str(listing))
    dm.setup("test")
    test = dm.test_dataloader().dataset
    assert len(test) == 4  # the listed images only, unlisted files ignored
    # Labels index the sorted class folders, as RobustBench's CustomImageFolder.
    classes = sorted(["n09468604", "n02823750", "n01440764"])
    assert [label for _, label in test.samples] == [classes.index(i.split("/")[0]) for i in ids]
    assert [p.relative_to(tmp_path / "val").as_posix() for p, _ in test.samples] == ids
    x, _ = test[0]
    assert x.shape == (3, 224, 224) and x.min() >= 0 and x.max() <= 1

    missing = tmp_path / "missing.txt"
    missing.write_text(ids[0] + "\nn01440764/ILSVRC2012_val_09999999.JPEG\n")
    dm = ImageNetDataModule(tmp_path, num_workers=0, num_classes=3, test_ids=str(missing))
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 listed test images are not under"):
        dm.setup("test")
        dm.test_dataloader()


@pytest.mark.needs_robustbench
@pytest.mark.parametrize("name", list(PREPROCESSINGS))
def test_preprocessings_match_robustbench(name):
    theirs = _import_robustbench("data").PREPROCESSINGS[name]
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (300, 333, 3), dtype=np.uint8))
    assert torch.equal(preprocessing_transform(name)(image), theirs(image))


def test_unknown_preprocessing_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'Res256'.*Res256Crop224.*BicubicRes256Crop224"):
        ImageNetDataModule(tmp_path, preprocessing="Res256")


def test_missing_robustbench_list_names_it(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"imagenet_test_image_ids\.txt.*not installed"):
        read_test_ids("robustbench")


# ---------------------------------------------------------------- export


def _card(dataset: str = "cifar10") -> dict:
    return model_card(
        name="A WRN",
        link="https://example.org",
        authors="Nobody",
        architecture="wrn_16_1",
        venue="tests",
        dataset=dataset,
        eps=8 / 255,
        clean_acc=0.5,
        autoattack_acc=0.25,
    )


def _randomised_wrn(num_classes: int = 10) -> torch.nn.Module:
    """WRN-16-1 with random BatchNorm statistics (so that running stats matter)."""
    torch.manual_seed(0)
    net = create_model("wrn_16_1", num_classes)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.needs_robustbench
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "identity-normalized"])
def test_exported_wrn_loads_strictly_into_robustbench_with_the_same_logits(tmp_path, wrapped):
    net = _randomised_wrn(num_classes=100)
    model = Normalized(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval() if wrapped else net
    files = export_robustbench(
        model,
        architecture="wrn_16_1",
        card=_card("cifar100"),
        card_id="Nobody2026Tiny_WRN-16-1",
        threat_model="Linf",
        out_dir=tmp_path,
    )
    saved = torch.load(files["weights"], map_location="cpu", weights_only=True)
    assert set(saved) == {"state_dict"}
    wide_resnet = _import_robustbench("model_zoo.architectures.wide_resnet")
    theirs = wide_resnet.WideResNet(depth=16, widen_factor=1, num_classes=100, sub_block1=False)
    theirs.load_state_dict(saved["state_dict"], strict=True)
    theirs.eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        # float32: the same function up to round-off (different pooling kernels) ...
        assert torch.allclose(model(x), theirs(x), rtol=0, atol=1e-5)
        assert torch.equal(model(x).argmax(1), theirs(x).argmax(1))
        # ... float64: equal to 1e-12.
        diff = (net.double()(x.double()) - theirs.double()(x.double())).abs().max()
    assert diff < 1e-12
    entry = Path(files["zoo_entry"]).read_text()
    assert "('Nobody2026Tiny_WRN-16-1', {" in entry
    assert "WideResNet(depth=16, widen_factor=1, num_classes=100, sub_block1=False)" in entry
    card = json.loads(Path(files["model_card"]).read_text())
    validate_model_card(card)
    assert card["architecture"] == "WideResNet-16-1"
    assert Path(files["model_card"]).parts[-4:] == (
        "model_info",
        "cifar100",
        "Linf",
        "Nobody2026Tiny_WRN-16-1.json",
    )


def test_export_refuses_real_normalisation_and_unknown_architectures(tmp_path):
    normalized = Normalized(_randomised_wrn(), CIFAR10_MEAN, CIFAR10_STD)
    with pytest.raises(ValueError, match=r"no normalisation.*model\.normalize=false"):
        robustbench_network(normalized)
    with pytest.raises(ValueError, match="no RobustBench architecture known for 'resnet8'"):
        export_robustbench(
            create_model("resnet8", 10),
            architecture="resnet8",
            card=_card(),
            card_id="X",
            threat_model="Linf",
            out_dir=tmp_path,
        )
