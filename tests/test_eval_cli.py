"""eval.py end to end: results.json, model cards, checkpoints, resume, backends, bad input."""

from __future__ import annotations

import enum
import json
import os
import pickle
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

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
        warnings.simplefilter("error")  # no "validating on the TEST set" during eval
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
