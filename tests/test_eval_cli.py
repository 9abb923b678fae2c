"""eval.py end to end: results.json, model cards, checkpoints, resume, backends, bad input."""

from __future__ import annotations

import enum
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gkl.config import CONFIG_DIR, compose_config
from gkl.evaluate import autoattack_runner, validate_model_card
from gkl.evaluate.run import (
    RESULTS_FILE,
    SMOKE_RESULTS_FILE,
    build_model,
    read_source,
    resolve_config,
    run,
)
from gkl.models import create_model
from gkl.models.wrappers import CIFAR10_MEAN, CIFAR10_STD, Normalized

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


@pytest.mark.needs_robustbench
@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
@pytest.mark.needs_robustbench
@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_robustbench_backend(tmp_path):
    """robustbench.eval.benchmark (standard AutoAttack) with gkl's shim, and with fra31's own
    package where it is installed: the same clean count as gkl, and never the shim under
    backend=robustbench."""
    from gkl.evaluate.robustbench_backend import fra31_installed

    fake_cifar10(tmp_path)
    checkpoint = save_network(tmp_path / "net.pth")
    reference = run(compose_eval(tmp_path, cheap(checkpoint, n=16)))
    standard = cheap(checkpoint, n=16)[:-2]  # RobustBench's protocol: standard AutoAttack
    backends = ["robustbench_shim", "robustbench"] if fra31_installed() else ["robustbench_shim"]
    for backend in backends:
        record = run(compose_eval(tmp_path, [*standard, f"backend={backend}"]))
        assert record["backend"] == backend and record["autoattack_version"] == "standard"
        assert record["counts"]["clean"] == reference["counts"]["clean"]
        assert record["counts"]["autoattack"] <= record["counts"]["clean"]
        shim = "gkl's pyautoattack shim" in record["autoattack_implementation"]
        assert shim is (backend == "robustbench_shim")
    with pytest.raises(ValueError, match="standard AutoAttack only"):
        run(compose_eval(tmp_path, [*cheap(checkpoint, n=16), "backend=robustbench_shim"]))


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


# ----------------------------------------------------------------------------- the run alone


def train_run(tmp_path: Path, overrides: list[str]) -> Path:
    """A real (tiny) train.py run; returns its last.ckpt (config.yaml lies in the run dir)."""
    from gkl.train import run as train

    cfg = compose_config(
        "train.yaml",
        [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'train'}",
            "~callbacks.progress_bar",
            "~callbacks.lr_monitor",
            "logger=none",
            "trainer.max_epochs=1",
            "test=false",
            "data.num_workers=0",
            *overrides,
        ],
    )
    train(cfg)
    checkpoint = tmp_path / "train" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file() and (tmp_path / "train" / "config.yaml").is_file()
    return checkpoint


AA_CHEAP = ["pgd.steps=2", "autoattack.version=custom", "autoattack.attacks=[apgd-ce]"]


@pytest.mark.needs_fmnist
def test_eval_of_a_fashion_mnist_run_needs_only_the_checkpoint(tmp_path):
    checkpoint = train_run(
        tmp_path,
        [
            "+experiment=fmnist_gkl_at",
            "model.name=fmnist_mlp",
            "data.train_subset=100",
            "data.val_size=50",
            "data.batch_size=50",
            "task.steps=1",
            "task.ema_decay=0.5",
            "task.val_pgd_subset=0",
        ],
    )
    record = run(compose_eval(tmp_path, [f"ckpt_path={checkpoint}", "n_examples=20", *AA_CHEAP]))
    assert record["dataset"] == "fmnist" and record["architecture"] == "fmnist_mlp"
    assert record["weights"] == "ema" and record["n_examples"] == 20
    assert "NOT_A_RESULT" not in record  # real Fashion-MNIST test images
    # The model eval.py built is the run's: same normalisation and the EMA weights.
    model, _ = load_model(compose_eval(tmp_path, [f"ckpt_path={checkpoint}"]))
    assert model.mean.flatten().tolist() == pytest.approx([0.2860])
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, saved[f"ema_model.model.{key}"]), key


def test_eval_of_a_cifar_run_needs_only_the_checkpoint(tmp_path):
    checkpoint = train_run(
        tmp_path,
        [
            "data=cifar10",
            "data.synthetic=true",
            "+data.synthetic_sizes=[64,16,32]",
            "model.in_channels=3",
            "+model.image_size=32",
        ],
    )
    record = run(compose_eval(tmp_path, [f"ckpt_path={checkpoint}", "n_examples=16", *AA_CHEAP]))
    assert record["dataset"] == "cifar10" and record["architecture"] == "fmnist_mlp"
    assert record["weights"] == "model" and "NOT_A_RESULT" in record  # synthetic run
    model, _ = load_model(compose_eval(tmp_path, [f"ckpt_path={checkpoint}"]))
    assert tuple(model.mean.flatten().tolist()) == pytest.approx(CIFAR10_MEAN)

    # Explicit settings win where they do not contradict the run; contradictions are errors.
    ok = run(
        compose_eval(
            tmp_path,
            [f"ckpt_path={checkpoint}", "n_examples=8", "++data.batch_size=4", *AA_CHEAP]
            + [f"state_path={tmp_path / 'second.json'}"],
        )
    )
    assert ok["n_examples"] == 8
    with pytest.raises(ValueError, match=r"model\.name='resnet8' disagrees with the run.*fmnist"):
        run(compose_eval(tmp_path, [f"ckpt_path={checkpoint}", "model.name=resnet8"]))
    with pytest.raises(ValueError, match=r"data\.dataset='cifar100' disagrees with the run"):
        run(compose_eval(tmp_path, [f"ckpt_path={checkpoint}", "data=cifar100"]))


def test_model_name_is_required_without_a_run_config(tmp_path):
    checkpoint = save_network(tmp_path / "net.pth")
    with pytest.raises(ValueError, match=r"model\.name is required.*no run config\.yaml"):
        run(compose_eval(tmp_path, [f"ckpt_path={checkpoint}", "data=cifar10"]))
    with pytest.raises(ValueError, match=r"no data set: set data="):
        run(compose_eval(tmp_path, [f"ckpt_path={checkpoint}", "model.name=fmnist_mlp"]))


def test_checkpoint_hyper_parameters_and_run_config_must_agree(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    net = create_model("fmnist_mlp", 10, in_channels=3, image_size=32)
    state = {f"model.model.{k}": v for k, v in net.state_dict().items()}
    hparams = {"model": {"name": "resnet8"}}
    path = run_dir / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    (run_dir / "config.yaml").write_text("model:\n  name: fmnist_mlp\n")
    with pytest.raises(ValueError, match=r"model\.name is 'fmnist_mlp' in .*config\.yaml but"):
        run(compose_eval(tmp_path, [f"ckpt_path={path}", "data=cifar10"]))


# ----------------------------------------------------------------------------- state binding


def test_autoattack_state_of_model_a_is_refused_for_model_b_and_other_weights(tmp_path):
    fake_cifar10(tmp_path)
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "image_size": 32}
    a = create_model("fmnist_mlp", 10, **kwargs).state_dict()
    a_ema = {k: v * 0.9 for k, v in a.items()}
    torch.manual_seed(1)
    b = create_model("fmnist_mlp", 10, **kwargs).state_dict()
    ckpt_a = lightning_checkpoint(tmp_path / "a.ckpt", a, a_ema)
    ckpt_b = lightning_checkpoint(tmp_path / "b.ckpt", b)
    state = tmp_path / "aa.json"
    common = [*cheap(ckpt_a)[1:], f"state_path={state}"]
    first = run(compose_eval(tmp_path, [f"ckpt_path={ckpt_a}", "weights=model", *common]))
    written = state.read_text()
    for other in ([f"ckpt_path={ckpt_b}"], [f"ckpt_path={ckpt_a}", "weights=ema"]):
        with pytest.raises(ValueError, match=rf"another model.*Delete {re.escape(str(state))}"):
            run(compose_eval(tmp_path, [*other, *common]))
        assert state.read_text() == written  # the state is left as it was
    again = run(compose_eval(tmp_path, [f"ckpt_path={ckpt_a}", "weights=model", *common]))
    assert again["autoattack_resumed"] and again["autoattack_acc"] == first["autoattack_acc"]


# ----------------------------------------------------------------------------- verdict and card


def saturated_checkpoint(tmp_path: Path, n: int = 24) -> Path:
    """An MLP whose logits are scaled by 1e4 (saturated softmax: CE gradients vanish, so PGD-CE
    looks robust while APGD-DLR is not fooled) and CIFAR test labels equal to its predictions."""
    torch.manual_seed(0)
    net = create_model("fmnist_mlp", 10, in_channels=3, image_size=32)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e4)
        last.bias.mul_(1e4)
    folder = fake_cifar10(tmp_path, n=n) / "cifar-10-batches-py"
    batch = pickle.loads((folder / "test_batch").read_bytes())
    x = torch.tensor(np.asarray(batch["data"])).float().div(255).view(n, 3, 32, 32)
    with torch.no_grad():
        batch["labels"] = Normalized(net, CIFAR10_MEAN, CIFAR10_STD)(x).argmax(1).tolist()
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    return lightning_checkpoint(tmp_path / "masked.ckpt", net.state_dict())


def test_unreliable_result_writes_no_card_unless_allowed(tmp_path):
    checkpoint = saturated_checkpoint(tmp_path)
    settings = [
        *cheap(checkpoint),
        "autoattack.attacks=[apgd-ce,apgd-dlr]",
        "eps=16/255",
        *CARD,
        "allow_off_leaderboard=true",
    ]
    with pytest.raises(RuntimeError, match=r"no model card for an unreliable result.*masking"):
        run(compose_eval(tmp_path, settings))
    record = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert record["gradient_masking"] and record["unreliable"] and record["model_card"] is None
    assert record["clean_acc"] == 1.0 and record["pgd_acc"] - record["autoattack_acc"] > 0.10
    assert not (tmp_path / "run" / "model_info").exists()

    record = run(compose_eval(tmp_path, [*settings, "allow_unreliable=true"]))
    card = json.loads(Path(record["model_card"]).read_text())
    validate_model_card(card)
    assert card["unreliable"] is True
    assert "Unreliable evaluation: possible gradient masking" in card["footnote"]


# ----------------------------------------------------------------------------- export


@pytest.mark.needs_robustbench
@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_eval_export_robustbench_writes_a_zoo_ready_submission(tmp_path):
    fake_cifar10(tmp_path, n=8)
    torch.manual_seed(0)
    checkpoint = tmp_path / "wrn.pth"
    torch.save({"model": create_model("wrn_16_1", 10).state_dict()}, checkpoint)
    overrides = [
        f"ckpt_path={checkpoint}",
        "data=cifar10",
        "model.name=wrn_16_1",
        "model.mean=[0,0,0]",  # trained without normalisation, as RobustBench's WideResNet
        "model.std=[1,1,1]",
        "n_examples=8",
        "batch_size=8",
        *AA_CHEAP,
        *CARD[1:],
        "card.id=Nobody2026Tiny_WRN-16-1",
        "export=robustbench",
        "allow_unreliable=true",  # a random WRN may predict one class: the export is under test
    ]
    record = run(compose_eval(tmp_path, overrides))
    files = record["export"]
    saved = torch.load(files["weights"], weights_only=True)
    wide_resnet = pytest.importorskip("robustbench.model_zoo.architectures.wide_resnet")
    theirs = wide_resnet.WideResNet(depth=16, widen_factor=1, num_classes=10)
    theirs.load_state_dict(saved["state_dict"], strict=True)
    assert "WideResNet(depth=16, widen_factor=1" in Path(files["zoo_entry"]).read_text()
    assert json.loads(Path(files["model_card"]).read_text())["architecture"] == "WideResNet-16-1"

    # The same files from the evaluation's results.json, by scripts/export_robustbench.py.
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import export_robustbench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    results = tmp_path / "run" / RESULTS_FILE
    bare_file = ["data=cifar10", "model.name=wrn_16_1", "model.mean=[0,0,0]", "model.std=[1,1,1]"]
    again = export_robustbench.main(
        [str(results), "--out", str(tmp_path / "again"), "--", *bare_file]
    )
    assert Path(again["weights"]).read_bytes() == Path(files["weights"]).read_bytes()

    normalised = [o for o in overrides if not o.startswith(("model.mean", "model.std"))]
    with pytest.raises(ValueError, match="model.normalize=false"):
        run(compose_eval(tmp_path, normalised))


# ----------------------------------------------------------------------------- more bad input


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("n_examples=0", "n_examples must be a positive integer, got 0"),
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
        ("export=onnx", "unknown export 'onnx'"),
    ],
)
def test_bad_sizes_and_options_fail_before_any_work(tmp_path, override, message):
    cfg = compose_eval(tmp_path, ["ckpt_path=/nonexistent.pth", "data=cifar10", override])
    with pytest.raises(ValueError, match=re.escape(message)):
        run(cfg)


def test_more_images_than_the_protocol_for_a_card_is_refused(tmp_path):
    checkpoint = save_network(tmp_path / "net.pth")
    fake_cifar10(tmp_path)
    cfg = compose_eval(tmp_path, [*cheap(checkpoint), *CARD, "n_examples=10001"])
    with pytest.raises(ValueError, match=r"n_examples=10001 exceeds RobustBench's cifar10"):
        run(cfg)


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_unreadable_checkpoints_name_the_file(tmp_path, kind):
    good = save_network(tmp_path / "good.pth").read_bytes()
    path = tmp_path / f"{kind}.ckpt"
    rng = np.random.default_rng(0)
    path.write_bytes(
        {"empty": b"", "truncated": good[: len(good) // 2], "random": rng.bytes(4096)}[kind]
    )
    cfg = compose_eval(tmp_path, [f"ckpt_path={path}", "data=cifar10", *MLP])
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))}"):
        run(cfg)


# ----------------------------------------------------------------------------- issue 22


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pgd.steps=0", "pgd.steps=0 must be an integer >= 1"),
        ("masking_threshold=-1", "masking_threshold=-1 must be a fraction in [0, 1]"),
        ("norm=L3", "unknown norm 'L3'"),
        ("backend=autoattack", "unknown backend 'autoattack'"),
    ],
)
def test_bad_attack_settings_fail_before_any_work(tmp_path, override, message):
    cfg = compose_eval(tmp_path, ["ckpt_path=/nonexistent.pth", "data=cifar10", override])
    with pytest.raises(ValueError, match=re.escape(message)):
        run(cfg)


def test_imagenet_preprocessing_on_another_data_set_is_refused(tmp_path):
    checkpoint = save_network(tmp_path / "net.pth")
    cfg = compose_eval(tmp_path, [*cheap(checkpoint), "data=fmnist", "preprocessing=Crop288"])
    with pytest.raises(ValueError, match=r"preprocessing=Crop288 is RobustBench's ImageNet.*drop"):
        run(cfg)


def test_a_tie_is_consistent_and_gets_a_card_with_its_leaderboard_row(tmp_path):
    """eps = 0: PGD and AutoAttack leave exactly the clean points standing (a three-way tie).
    As fractions the float32 AutoAttack mean exceeds the float64 ones for most counts, which
    was called an order violation; the counts tie, the result is reliable, the card written."""
    fake_cifar10(tmp_path, n=100)
    checkpoint = save_network(tmp_path / "net.pth")
    settings = [*cheap(checkpoint, n=100), "batch_size=50", "eps=0", *CARD]
    with pytest.raises(ValueError, match=r"budget no RobustBench leaderboard uses.*8/255"):
        run(compose_eval(tmp_path, settings))
    record = run(compose_eval(tmp_path, [*settings, "allow_off_leaderboard=true"]))
    counts = record["counts"]
    assert counts["clean"] == counts["pgd"] == counts["autoattack"] > 0 and counts["n"] == 100
    assert not record["unreliable"] and record["warnings"] == []
    card = json.loads(Path(record["model_card"]).read_text())
    assert "Off-leaderboard budget: Linf eps 0/255, while RobustBench" in card["footnote"]
    assert "AutoAttack custom (apgd-ce), not standard." in card["footnote"]
    rows = Path(record["leaderboard_row"]).read_text().splitlines()
    assert rows[0] == (
        "| Rank | Method | Standard accuracy | AA accuracy | AA + external accuracy | Raised flags "
        "| Extra data | Architecture | Venue |"
    )
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    assert cells[1] == f"[{card['name']}]({card['link']})<br>{card['footnote']}"
    assert cells[2:4] == [f"{card['clean_acc']}%", f"{card['autoattack_acc']}%"]
    assert cells[6:] == ["&#215;", "fmnist_mlp", "tests"]
    # The record: per-attack breakdown, stage times and the versions behind the numbers.
    assert [a["attack"] for a in record["autoattack_per_attack"]] == ["apgd-ce"]
    assert record["autoattack_per_attack"][0]["robust"] == counts["autoattack"]
    assert set(record["seconds"]) == {"load", "clean", "pgd", "autoattack", "total"}
    assert record["versions"]["torch"] == torch.__version__.split("+")[0]
    assert record["threat_model_source"]["eps"] == "command line"


@pytest.mark.parametrize(
    ("threat", "message"),
    [(["eps=4/255"], "Linf eps 4/255, while"), (["norm=L2", "eps=8/255"], "L2 eps 0.0313725")],
)
def test_off_leaderboard_budgets_get_no_card_without_the_switch(tmp_path, threat, message):
    checkpoint = save_network(tmp_path / "net.pth")
    cfg = compose_eval(tmp_path, [*cheap(checkpoint), *CARD, *threat])
    fake_cifar10(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message) + ".*allow_off_leaderboard=true"):
        run(cfg)


@pytest.mark.needs_fmnist
def test_eps_and_norm_default_to_the_runs_threat_model(tmp_path, caplog):
    checkpoint = train_run(
        tmp_path,
        [
            "+experiment=fmnist_trades",
            "model.name=fmnist_mlp",
            "data.train_subset=100",
            "data.val_size=0",  # validation on the test set: a training warning, not eval's
            "data.batch_size=50",
            "task.steps=1",
            "task.val_pgd_subset=0",
        ],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*validating on the TEST set")  # not in eval
        record = run(compose_eval(tmp_path, [f"ckpt_path={checkpoint}", "n_examples=8", *AA_CHEAP]))
    assert (record["eps"], record["eps_value"], record["threat_model"]) == ("0.1", 0.1, "Linf")
    assert record["threat_model_source"] == {"eps": "run", "norm": "run"}
    assert record["run_threat_model"]["file"] == str(tmp_path / "train" / "config.yaml")
    assert record["threat_model_note"] is None
    with caplog.at_level("WARNING", logger="gkl.evaluate.run"):
        other = run(
            compose_eval(
                tmp_path,
                [f"ckpt_path={checkpoint}", "n_examples=8", "eps=8/255", *AA_CHEAP]
                + [f"state_path={tmp_path / 'other.json'}"],
            )
        )
    note = (
        "evaluating Linf eps 8/255 (command line), not the run's training threat model Linf eps 0.1"
    )
    assert other["threat_model_note"].startswith(note)
    assert any(r.getMessage().startswith(note) for r in caplog.records)


# ----------------------------------------------------------------------------- documented commands

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(
    r"(?:python\s+)?(?:eval\.py|scripts/(?:robustness_curve|export_robustbench)\.py)"
    r"(?=[\s`])[^`#\n]*"
)
# Every evaluation command README.md and docs/*.md give (file, command with continuation lines
# joined); test_documented_evaluation_command runs each one.
DOCUMENTED = [
    ("README.md", "eval.py ckpt_path=<run>/checkpoints/last.ckpt"),
    (
        "README.md",
        "python eval.py ckpt_path=<run>/released.pth data=cifar100 model.name=wrn_34_10 "
        "model.normalize=false",
    ),
    ("README.md", "python eval.py ckpt_path=<run>/checkpoints/last.ckpt eps=8/255"),
    (
        "README.md",
        "python eval.py ckpt_path=<run>/checkpoints/last.ckpt export=robustbench card.id=...",
    ),
    ("README.md", "python eval.py ... backend=robustbench"),
    ("README.md", "python eval.py robustbench_model=Carmon2019Unlabeled data=cifar10"),
    ("README.md", "python eval.py ckpt_path=<run>/checkpoints/last.ckpt"),
    (
        "README.md",
        "python eval.py ckpt_path=<run>/checkpoints/last.ckpt card.id=<Name2026Title_WRN-34-10> "
        'card.name="<paper title>" card.link=<url> \'card.authors="<names>"\' '
        'card.venue="<venue>"',
    ),
    (
        "README.md",
        "python eval.py ckpt_path=<run>/checkpoints/last.ckpt export=robustbench card.id=... "
        "card.name=...",
    ),
    ("adversarial.md", "python eval.py ckpt_path=<run>/checkpoints/last.ckpt"),
    ("adversarial.md", "python eval.py robustbench_model=Carmon2019Unlabeled data=cifar10"),
    (
        "adversarial.md",
        "python eval.py ckpt_path=<run>/checkpoints/last.ckpt n_examples=10000 "
        'export=robustbench card.id=Cui2023Decoupled_WRN-34-10 card.name="Decoupled '
        'Kullback-Leibler Divergence Loss" card.link=https://arxiv.org/abs/2305.13948 '
        '\'card.authors="Jiequan Cui, ..."\' card.venue="NeurIPS 2024" card.reported=0.5709',
    ),
    ("adversarial.md", "python scripts/export_robustbench.py <eval run>/results.json"),
    (
        "adversarial.md",
        "python scripts/robustness_curve.py --ckpt <trades run>/checkpoints/last.ckpt --ckpt "
        "<gkl run>/checkpoints/last.ckpt --eps 0 0.05 0.1 0.15 0.2 --n-examples 1000 "
        "--autoattack apgd-ce,apgd-t --out docs/figures/fmnist_robustness.png",
    ),
    (
        "architecture.md",
        "python eval.py ckpt_path=... data=cifar10 model.name=wrn_34_10 eps=8/255",
    ),
    (
        "reproduce.md",
        "python eval.py ckpt_path=<run>/released.pth data=<cifar10|cifar100> "
        "model.name=wrn_34_10 model.normalize=false hydra.run.dir=<run>/eval",
    ),
]


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command) for each evaluation command in README.md and docs/*.md: inline or in
    a code block, continuation lines joined; mentions without arguments are not commands."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            for match in COMMAND.finditer(line):
                text, j = match.group(0).rstrip(), i
                while text.endswith("\\"):
                    j += 1
                    text = text[:-1].rstrip() + " " + lines[j].split("  #")[0].strip()
                args = text.split()[2 if text.startswith("python") else 1 :]
                if any("=" in a or a.startswith(("--", "<", "...")) for a in args):
                    found.append((path.name, " ".join(text.split())))
    return found


# Documented commands that another test runs as written: (file, command) -> (test file, test).
RUN_ELSEWHERE = {
    (
        "reliability.md",
        "python eval.py ckpt_path=/tmp/h20camp/cli2/torch_load/ckpt_run/checkpoints/last.ckpt",
    ): ("test_security.py", "test_eval_py_command_refuses_a_crafted_checkpoint"),
}


def test_the_list_of_documented_evaluation_commands_is_complete():
    found = documented_commands()
    assert [c for c in found if c not in RUN_ELSEWHERE] == DOCUMENTED
    assert set(RUN_ELSEWHERE) <= set(found)
    for test_file, test_name in RUN_ELSEWHERE.values():
        assert f"def {test_name}(" in (Path(__file__).parent / test_file).read_text()


def fake_run(root: Path, name: str, overrides: list[str]) -> tuple[Path, torch.nn.Module]:
    """A run directory as train.py leaves it (config.yaml, checkpoints/last.ckpt, released.pth)
    for the composed training config, with freshly initialised weights; and its classifier."""
    from gkl.models.build import build_classifier

    run_dir = root / name
    cfg = compose_config(
        "train.yaml", [f"paths.root_dir={root}", f"paths.output_dir={run_dir}", *overrides]
    )
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(0)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("_target_")
    model = build_classifier(**model_cfg).eval()
    lightning_checkpoint(run_dir / "checkpoints" / "last.ckpt", model.model.state_dict())
    torch.save({"model": model.model.state_dict()}, run_dir / "released.pth")
    return run_dir, model


def fake_test_set(root: Path, dataset: str, model: torch.nn.Module, n: int = 8) -> None:
    """A CIFAR test split in torchvision's format whose labels ``model`` gets all wrong: clean,
    PGD and AutoAttack accuracy are 0 (a tie) and AutoAttack has nothing to attack, so the
    commands on a WRN cost seconds."""
    folder, file, key, classes = {
        "cifar10": ("cifar-10-batches-py", "test_batch", "labels", 10),
        "cifar100": ("cifar-100-python", "test", "fine_labels", 100),
    }[dataset]
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        predicted = model(torch.from_numpy(images).float() / 255).argmax(1)
    labels = ((predicted + 1) % classes).tolist()
    (root / "data" / folder).mkdir(parents=True, exist_ok=True)
    batch = {"data": images.reshape(n, -1), key: labels}
    (root / "data" / folder / file).write_bytes(pickle.dumps(batch))


@pytest.fixture(scope="module")
def documented_setup(tmp_path_factory):
    """Runs the documented commands refer to: CIFAR-10 and -100 GKL-AT runs (WRN-16-1 for
    WRN-34-10, no normalisation, as the recipes), a CIFAR-10 TRADES run of another architecture
    (an MLP), a bare weights file; fake CIFAR test sets (see fake_test_set)."""
    root = tmp_path_factory.mktemp("documented")
    wrn = ["model.name=wrn_16_1", "data.num_workers=0"]
    runs = {}
    for dataset in ("cifar10", "cifar100"):
        runs[dataset], model = fake_run(
            root, f"{dataset}_run", [f"+experiment={dataset}_gkl_at", *wrn]
        )
        fake_test_set(root, dataset, model)
    runs["mlp"], _ = fake_run(
        root,
        "mlp_run",
        ["+experiment=cifar10_trades", "data.num_workers=0", "model.name=fmnist_mlp"]
        + ["+model.in_channels=3", "+model.image_size=32"],
    )
    (root / "bare.pth").write_bytes((runs["cifar10"] / "released.pth").read_bytes())
    return root, runs


CARD_FIELDS = dict(c.split("=", 1) for c in CARD)
SMALL = ["batch_size=4", "pgd.steps=1", "autoattack.version=custom", "autoattack.attacks=[apgd-ce]"]


def substitute(command: str, root: Path, runs: dict[str, Path]) -> tuple[str, list[str]]:
    """The command's script and arguments with its placeholders filled in (``<run>``: the run of
    its data set; ``...``: a value or the card fields), WRN-34-10 as WRN-16-1, smaller sizes."""
    for name, path in (("<trades run>", runs["cifar10"]), ("<gkl run>", runs["mlp"])):
        command = command.replace(name, str(path))
    tokens = shlex.split(command.replace("<eval run>", "<eval_run>"))
    tokens = tokens[1:] if tokens[0] == "python" else tokens
    script, args = tokens[0], tokens[1:]
    run_dir = runs["cifar100" if "data=cifar100" in command else "cifar10"]
    filled = []
    for arg in args:
        arg = arg.replace("<run>", str(run_dir)).replace("<cifar10|cifar100>", "cifar10")
        arg = arg.replace("wrn_34_10", "wrn_16_1")
        key, _, value = arg.partition("=")
        if arg == "...":
            arg = f"ckpt_path={run_dir}/checkpoints/last.ckpt"
        elif arg == "ckpt_path=...":
            arg = f"ckpt_path={root / 'bare.pth'}"
        elif key in CARD_FIELDS and (value == "..." or value.strip('"').startswith("<")):
            arg = f"{key}={CARD_FIELDS[key]}"
        elif key in ("n_examples", "hydra.run.dir"):
            continue
        filled.append(arg)
    if any(a.startswith("card.id=") for a in filled):  # "card.id=...": the card's fields
        given = {a.split("=", 1)[0] for a in filled}
        filled += [f"{k}={v}" for k, v in CARD_FIELDS.items() if k not in given]
    return script, filled


@pytest.mark.parametrize(
    ("doc", "command"), DOCUMENTED, ids=[f"{d}:{i}" for i, (d, _) in enumerate(DOCUMENTED)]
)
@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_documented_evaluation_command(doc, command, documented_setup, tmp_path, monkeypatch):
    """Each evaluation command of README.md and docs/ runs as written (placeholders filled in,
    4 test images, custom AutoAttack APGD-CE: small sizes)."""
    root, runs = documented_setup
    script, args = substitute(command, root, runs)
    out = [f"paths.root_dir={root}", f"paths.output_dir={tmp_path}", "++data.num_workers=0"]
    if script == "eval.py":
        if "backend=robustbench" in args:
            from gkl.evaluate.robustbench_backend import fra31_installed, robustbench_available

            if not (robustbench_available() and fra31_installed()):
                pytest.skip("needs robustbench and fra31's autoattack")
            sizes = ["n_examples=2", "batch_size=2"]  # RobustBench's protocol: standard AA
        else:
            sizes = ["n_examples=4", *SMALL]
        if any(a.startswith("robustbench_model=") for a in args):
            from gkl.evaluate import robustbench_backend

            def zoo(name, **kwargs):  # offline: the CIFAR-10 run's network stands in
                assert name == "Carmon2019Unlabeled" and kwargs["dataset"] == "cifar10"
                released = f"ckpt_path={runs['cifar10']}/released.pth"
                return load_model(compose_eval(tmp_path, [released]))[0]

            monkeypatch.setattr(robustbench_backend, "load_zoo_model", zoo)
        record = run(compose_config("eval.yaml", [*args, *out, *sizes]))
        assert 0 <= record["autoattack_acc"] <= record["pgd_acc"] <= record["clean_acc"]
        if any(a.startswith("card.id=") for a in args):
            validate_model_card(json.loads(Path(record["model_card"]).read_text()))
        if "export=robustbench" in args:
            assert Path(record["export"]["weights"]).is_file()
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        module = __import__(Path(script).stem)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    if script.endswith("export_robustbench.py"):
        evaluated = run(
            compose_config(
                "eval.yaml",
                [f"ckpt_path={runs['cifar10']}/checkpoints/last.ckpt", *CARD, *out, "n_examples=4"]
                + SMALL,
            )
        )
        results = Path(evaluated["model_card"]).parents[3] / RESULTS_FILE
        args = [a.replace("<eval_run>/results.json", str(results)) for a in args]
        files = module.main([*args, "--out", str(tmp_path / "again")])
        assert Path(files["weights"]).is_file()
    else:  # robustness_curve.py: two runs of different architectures, fewer budgets
        cut = args.index("--eps")
        args = [*args[: cut + 1], "0", "0.1", *args[cut + 6 :]]
        args = [
            {"1000": "4", "apgd-ce,apgd-t": "apgd-ce"}.get(a, a)
            for a in args
            if a != "docs/figures/fmnist_robustness.png"
        ]
        args[args.index("--out")] = "--pgd-steps"
        args += ["2", "--out", str(tmp_path / "curve.png")]
        record = module.main(args)
        assert list(record["curves"]) == [
            f"cifar10_gkl_at ({runs['cifar10'].name})",
            f"cifar10_trades ({runs['mlp'].name})",
        ]
        curves = record["curves"].values()
        assert {c["architecture"] for c in curves} == {"wrn_16_1", "fmnist_mlp"}
        assert all(c["trained_eps"] == pytest.approx(8 / 255) for c in curves)
        assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("version", "attacks", "note"),
    [
        ("rand", ["apgd-ce", "apgd-dlr"], "AutoAttack rand (apgd-ce, apgd-dlr), not standard."),
        ("rand", [], "AutoAttack rand, not standard."),
        ("standard", ["apgd-ce", "apgd-t", "fab-t", "square"], None),
    ],
)
def test_footnote_names_the_attacks_without_empty_brackets(tmp_path, version, attacks, note):
    from gkl.attacks import ThreatModel
    from gkl.evaluate.run import protocol_notes

    cfg = compose_eval(tmp_path, ["ckpt_path=x", f"autoattack.version={version}"])
    notes = protocol_notes(cfg, "cifar10", 10000, attacks, ThreatModel(8 / 255))
    assert notes == ([note] if note else [])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ("[1, 2]", "holds a list, not eval.py's results record"),
        ('{"eps": "8/255"}', "is not eval.py's results.json (no model_card"),
    ],
)
def test_export_robustbench_names_a_results_file_it_cannot_use(tmp_path, content, message):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import export_robustbench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    results = tmp_path / "results.json"
    results.write_text(content)
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(results))} {re.escape(message)}"):
        export_robustbench.main([str(results)])


def test_fra31_backend_through_eval(tmp_path):
    """backend=fra31 on the same images as backend=gkl: fra31's own package where installed
    (the same robust count and per-attack accuracies), else a clear install message."""
    from gkl.evaluate.robustbench_backend import fra31_installed

    fake_cifar10(tmp_path)
    checkpoint = save_network(tmp_path / "net.pth")
    reference = run(compose_eval(tmp_path, cheap(checkpoint, n=48)))
    assert reference["counts"]["autoattack"] < reference["counts"]["clean"]  # a real attack
    cfg = compose_eval(tmp_path, [*cheap(checkpoint, n=48), "backend=fra31"])
    if not fra31_installed():
        with pytest.raises(ModuleNotFoundError, match="install_robustbench.sh"):
            run(cfg)
        return
    record = run(cfg)
    assert record["counts"] == reference["counts"]
    assert record["autoattack_implementation"].startswith("autoattack ")
    ours = [(a["attack"], round(a["robust_acc"], 4)) for a in reference["autoattack_per_attack"]]
    assert [(a["attack"], a["robust_acc"]) for a in record["autoattack_per_attack"]] == ours
    assert (tmp_path / "run" / "autoattack_fra31.log").is_file()
