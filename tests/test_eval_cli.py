"""eval.py end to end: results.json, model cards, checkpoints, resume, backends, bad input."""

from __future__ import annotations

import enum
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from gkl.config import CONFIG_DIR, compose_config
from gkl.evaluate import autoattack_runner, validate_model_card
from gkl.evaluate.robustbench_backend import robustbench_available
from gkl.evaluate.run import (
    RESULTS_FILE,
    SMOKE_RESULTS_FILE,
    build_model,
    read_source,
    resolve_config,
    run,
)
from gkl.models import create_model

ROOT = Path(CONFIG_DIR).parent
CARD = [
    "card.id=Tiny2026Random_MLP",
    "card.name=A random MLP",
    "card.link=https://example.org/tiny",
    "card.authors=Nobody",
    "card.venue=tests",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_cifar10(root: Path, n: int = 48) -> Path:
    """A CIFAR-10 test split in torchvision's pickle format (random images), under root/data."""
    folder = root / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batch = {
        "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
        "labels": [int(v) for v in rng.integers(0, 10, n)],
    }
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    return root / "data"


# A 3072-32-10 MLP: evaluations of it take a second, and its random predictions depend on the
# input (random CNNs tend to predict one class whatever the input, which no attack changes).
MLP = ["model.name=fmnist_mlp", "+model.in_channels=3", "+model.image_size=32"]


def save_network(path: Path, name: str = "fmnist_mlp", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    kwargs = {"in_channels": 3, "image_size": 32} if name == "fmnist_mlp" else {}
    torch.save({"model": create_model(name, 10, **kwargs).state_dict()}, path)
    return path


def compose_eval(tmp_path: Path, overrides: list[str]):
    """Compose conf/eval.yaml as `python eval.py <overrides>` would, writing under tmp_path."""
    return compose_config(
        "eval.yaml",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'run'}",
            "++data.num_workers=0",
            *overrides,
        ],
    )


def cheap(checkpoint: Path, n: int = 24) -> list[str]:
    return [
        f"ckpt_path={checkpoint}",
        "data=cifar10",
        *MLP,
        f"n_examples={n}",
        "batch_size=12",
        "pgd.steps=2",
        "autoattack.version=custom",
        "autoattack.attacks=[apgd-ce]",
    ]


def test_cli_writes_results_and_a_valid_model_card(tmp_path):
    fake_cifar10(tmp_path)
    checkpoint = save_network(tmp_path / "net.pth")
    result = subprocess.run(
        [
            sys.executable,
            "eval.py",
            *cheap(checkpoint),
            *CARD,
            "++data.num_workers=0",
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert record["dataset"] == "cifar10" and record["eps"] == "8/255"
    assert record["n_examples"] == 24 and record["attacks"] == ["apgd-ce"]
    assert record["clean_acc"] >= record["pgd_acc"] >= record["autoattack_acc"]
    assert not record["order_violation"] and "NOT_A_RESULT" not in record
    assert record["weights"] == "network" and len(record["checkpoint_sha256"]) == 64
    card_path = tmp_path / "out" / "model_info" / "cifar10" / "Linf" / "Tiny2026Random_MLP.json"
    assert record["model_card"] == str(card_path)
    card = json.loads(card_path.read_text())
    validate_model_card(card)
    assert card["architecture"] == "fmnist_mlp" and card["eps"] == "8/255"
    assert card["clean_acc"] == f"{100 * record['clean_acc']:.2f}"
    assert "custom" in card["footnote"] and "first 24 test images" in card["footnote"]


def load_model(cfg, weights: str = "auto"):
    """The model eval.py would evaluate for ``cfg`` (checkpoint read once, run config merged)."""
    source = read_source(cfg)
    _, model_cfg = resolve_config(cfg, source)
    return build_model(model_cfg, source, weights)


def lightning_checkpoint(path: Path, trained: dict, averaged: dict | None = None) -> Path:
    """A checkpoint laid out as gkl's tasks save it: task.model (Normalized) and task.ema_model."""
    state = {f"model.model.{k}": v for k, v in trained.items()}
    if averaged is not None:
        state |= {f"ema_model.model.{k}": v for k, v in averaged.items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def test_lightning_checkpoint_gives_the_ema_weights_unless_told_otherwise(tmp_path):
    trained = create_model("resnet8", 10).state_dict()  # with BN buffers
    averaged = {k: v + 1 if v.is_floating_point() else v for k, v in trained.items()}
    path = lightning_checkpoint(tmp_path / "last.ckpt", trained, averaged)
    cfg = compose_eval(tmp_path, [f"ckpt_path={path}", "model.name=resnet8", "data=cifar10"])
    for weights, expected, chosen in (
        ("auto", averaged, "ema"),
        ("ema", averaged, "ema"),
        ("model", trained, "model"),
    ):
        model, what = load_model(cfg, weights)
        assert not model.training and what == chosen
        for key, value in model.model.state_dict().items():
            assert torch.equal(value, expected[key]), (weights, key)
    plain = save_network(tmp_path / "plain.pth", name="resnet8")
    cfg = compose_eval(tmp_path, [f"ckpt_path={plain}", "model.name=resnet8", "data=cifar10"])
    with pytest.raises(ValueError, match=f"weights=ema but {plain} holds no EMA weights"):
        load_model(cfg, "ema")


def test_second_run_with_the_same_state_path_resumes_without_attacking(tmp_path, monkeypatch):
    fake_cifar10(tmp_path)
    overrides = [*cheap(save_network(tmp_path / "net.pth")), f"state_path={tmp_path / 'aa.json'}"]
    first = run(compose_eval(tmp_path, overrides))
    assert json.loads((tmp_path / "aa.json").read_text())["finished"] == ["apgd-ce"]

    def no_attacks(*args, **kwargs):
        raise AssertionError("a resumed, finished evaluation must not attack again")

    monkeypatch.setattr(autoattack_runner.AutoAttack, "run_standard_evaluation", no_attacks)
    second = run(compose_eval(tmp_path, overrides))
    assert second["autoattack_acc"] == first["autoattack_acc"]
    assert second["clean_acc"] == first["clean_acc"]


@pytest.mark.skipif(
    not robustbench_available(),
    reason="robustbench (with its dependencies) not installed (scripts/install_robustbench.sh)",
)
@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_robustbench_backend(tmp_path):
    fake_cifar10(tmp_path)
    checkpoint = save_network(tmp_path / "net.pth")
    reference = run(compose_eval(tmp_path, cheap(checkpoint, n=16)))
    cfg = compose_eval(tmp_path, [*cheap(checkpoint, n=16), "backend=robustbench"])
    record = run(cfg)
    assert record["backend"] == "robustbench" and record["autoattack_version"] == "standard"
    assert record["clean_acc"] == reference["clean_acc"]
    assert record["autoattack_acc"] <= record["clean_acc"]


def fake_robustbench_zoo(monkeypatch, calls: list[dict], network) -> None:
    """A stand-in for robustbench's utils/model_zoo modules: one cifar10 Linf model whose
    load_model records its arguments and returns ``network()`` in training mode."""
    enums = types.ModuleType("robustbench.model_zoo.enums")
    enums.BenchmarkDataset = enum.Enum("BenchmarkDataset", {"cifar_10": "cifar10"})
    enums.ThreatModel = enum.Enum("ThreatModel", {"Linf": "Linf", "L2": "L2"})
    zoo = types.ModuleType("robustbench.model_zoo")
    zoo.model_dicts = {
        enums.BenchmarkDataset("cifar10"): {
            enums.ThreatModel("Linf"): {"Tiny2026Zoo": {}},
            enums.ThreatModel("L2"): {},
        }
    }
    utils = types.ModuleType("robustbench.utils")

    def load_model(**kwargs):
        calls.append(kwargs)
        return network().train()

    utils.load_model = load_model
    for name, module in [("model_zoo.enums", enums), ("model_zoo", zoo), ("utils", utils)]:
        monkeypatch.setitem(sys.modules, f"robustbench.{name}", module)


def test_robustbench_zoo_model_is_loaded_by_name(tmp_path, monkeypatch):
    checkpoint = save_network(tmp_path / "net.pth")
    settings = [*cheap(checkpoint, n=16)[1:], "data.synthetic=true"]
    reference_cfg = compose_eval(tmp_path, [*settings, f"ckpt_path={checkpoint}"])
    # The zoo serves the same network, normalisation included (as RobustBench's models do).
    served, _ = load_model(reference_cfg)
    calls: list[dict] = []
    fake_robustbench_zoo(monkeypatch, calls, lambda: served)
    record = run(compose_eval(tmp_path, [*settings, "robustbench_model=Tiny2026Zoo"]))
    assert calls == [
        {
            "model_name": "Tiny2026Zoo",
            "model_dir": str(tmp_path / "models"),
            "dataset": "cifar10",
            "threat_model": "Linf",
        }
    ]
    assert record["robustbench_model"] == "Tiny2026Zoo" and record["checkpoint"] is None
    assert record["architecture"] == "Tiny2026Zoo"
    own_state = f"state_path={tmp_path / 'reference_state.json'}"  # one state file per model
    reference = run(compose_eval(tmp_path, [*settings, f"ckpt_path={checkpoint}", own_state]))
    for key in ("clean_acc", "pgd_acc", "autoattack_acc"):
        assert record[key] == reference[key], key

    with pytest.raises(ValueError, match=r"unknown RobustBench model 'Nope'.*Tiny2026Zoo"):
        run(compose_eval(tmp_path, [*settings, "robustbench_model=Nope"]))
    with pytest.raises(ValueError, match="exactly one of ckpt_path"):
        run(compose_eval(tmp_path, settings))
    with pytest.raises(ValueError, match="exactly one of ckpt_path"):
        run(compose_eval(tmp_path, [*settings, f"ckpt_path={checkpoint}", "robustbench_model=X"]))


def test_synthetic_data_is_marked_and_gets_no_model_card(tmp_path):
    checkpoint = save_network(tmp_path / "net.pth")
    record = run(compose_eval(tmp_path, [*cheap(checkpoint, n=8), *CARD, "data.synthetic=true"]))
    assert "NOT_A_RESULT" in record and record["model_card"] is None
    assert (tmp_path / "run" / SMOKE_RESULTS_FILE).exists()
    assert not (tmp_path / "run" / RESULTS_FILE).exists()
    assert not (tmp_path / "run" / "model_info").exists()


# ----------------------------------------------------------------------------- bad input


def test_eps_written_as_a_decimal_warns_about_k_over_255(tmp_path):
    checkpoint = save_network(tmp_path / "net.pth")
    cfg = compose_eval(tmp_path, [*cheap(checkpoint, n=8), "data.synthetic=true", "eps=0.031"])
    with pytest.warns(UserWarning, match="8/255"):
        run(cfg)


def test_eps_in_pixel_units_is_refused_before_any_work(tmp_path):
    cfg = compose_eval(tmp_path, ["ckpt_path=/nonexistent.pth", "model.name=resnet8", "eps=8"])
    with pytest.raises(ValueError, match="write 8/255"):
        run(cfg)


def test_checkpoint_of_another_architecture_names_both(tmp_path):
    wrong = save_network(tmp_path / "wrn.pth", name="wrn_16_1")
    cfg = compose_eval(
        tmp_path,
        [f"ckpt_path={wrong}", "model.name=resnet8", "data=cifar10", "data.synthetic=true"],
    )
    with pytest.raises(ValueError, match=r"(?s)'resnet8'.*'wrn_16_1'"):
        run(cfg)


def test_incomplete_model_card_fails_before_evaluating(tmp_path):
    fake_cifar10(tmp_path)
    cfg = compose_eval(tmp_path, [*cheap(tmp_path / "missing.pth"), "card.id=X2026Y_Z"])
    with pytest.raises(ValueError, match=r"link must be str.*card\.link"):
        run(cfg)
    checkpoint = save_network(tmp_path / "net.pth")
    cfg = compose_eval(tmp_path, [*cheap(checkpoint), *CARD, "data=fmnist"])
    with pytest.raises(ValueError, match="model cards exist for.*not 'fmnist'"):
        run(cfg)
