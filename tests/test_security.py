"""Nothing read from a run runs code (issue 20): crafted checkpoints, run config.yaml files,
results.json / model cards and CIFAR meta files, for every reader of a run. Each payload would
create ``marker``; every test checks it was refused (naming the file and key) and that the
marker does not exist. ``MALICIOUS_FILES`` counts the files tried."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gkl.config import CONFIG_DIR, compose_config
from gkl.evaluate.run import read_source, resolve_config
from gkl.evaluate.run import run as evaluate_run
from gkl.models import create_model
from gkl.stored_config import ALLOWED_TARGETS, StoredConfigError, check_stored_config

ROOT = Path(CONFIG_DIR).parent
MEAN, STD = [0.2860], [0.3530]
DATA = {"_target_": "gkl.data.FashionMNISTDataModule", "synthetic": True, "num_classes": 10}
MODEL = {
    "_target_": "gkl.models.build.build_classifier",
    "name": "fmnist_mlp",
    "num_classes": 10,
    "mean": MEAN,
    "std": STD,
}


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def payloads(tmp: Path, marker: Path) -> dict[str, dict]:
    """Configs that create ``marker`` when Hydra instantiates them."""
    pickled = tmp / "evil.pkl"
    torch.save(Payload(marker), pickled)  # torch.load(weights_only=False) unpickles it
    npy = tmp / "evil.npy"
    np.save(npy, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    return {
        "torch.load": {"_target_": "torch.load", "f": str(pickled), "weights_only": False},
        "numpy.load": {"_target_": "numpy.load", "file": str(npy), "allow_pickle": True},
        "builtins.exec": {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w')"]},
        "subprocess.Popen": {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]},
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
    }


KINDS = ["torch.load", "numpy.load", "builtins.exec", "subprocess.Popen", "os.system"]


def wait_for(marker: Path) -> bool:
    for _ in range(100):  # Popen runs "touch" in the background
        if marker.exists():
            return True
        time.sleep(0.05)
    return False


# Hydra 1.3.8's own blocklist stops these; torch.load and numpy.load it runs. gkl refuses all
# five before Hydra sees them (and would whatever Hydra's policy is).
HYDRA_BLOCKS = {"builtins.exec", "subprocess.Popen", "os.system"}


@pytest.mark.parametrize("kind", KINDS)
def test_each_payload_would_run_code_if_instantiated(tmp_path, kind):
    """The control: the payloads are real; the tests below show gkl never gets that far."""
    marker = tmp_path / "pwned"
    config = OmegaConf.create(payloads(tmp_path, marker)[kind])
    if kind in HYDRA_BLOCKS:
        with pytest.raises(Exception, match="blocklisted"):
            instantiate(config)
        return
    instantiate(config)
    assert wait_for(marker)


# ----------------------------------------------------------------------------- a crafted run


def make_run(
    root: Path,
    hparams: dict | None = None,
    config: dict | None = None,
    gkl_config: dict | None = None,
) -> Path:
    """``root/checkpoints/last.ckpt`` (loads with weights_only=True) and ``root/config.yaml``."""
    torch.manual_seed(0)
    network = create_model("fmnist_mlp", 10)
    state = {
        "state_dict": {f"model.model.{k}": v for k, v in network.state_dict().items()},
        "epoch": 1,
        "global_step": 6,
        "pytorch-lightning_version": "2.5.0",
        "hyper_parameters": hparams if hparams is not None else {"data": DATA, "model": MODEL},
    }
    if gkl_config is not None:
        state["gkl_config"] = gkl_config
    ckpt = root / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(state, ckpt)
    torch.load(ckpt, weights_only=True)  # a "safe" file as far as torch is concerned
    run_config = config if config is not None else {"data": DATA, "model": MODEL}
    (root / "config.yaml").write_text(yaml.safe_dump(run_config))
    return ckpt


def eval_cfg(ckpt: Path, out: Path, *overrides: str):
    return compose_config("eval.yaml", [f"ckpt_path={ckpt}", f"paths.output_dir={out}", *overrides])


def test_an_untampered_run_is_accepted(tmp_path):
    """The same files without a payload resolve (the refusals below are about the payload)."""
    ckpt = make_run(tmp_path / "run")
    data, model = resolve_config(eval_cfg(ckpt, tmp_path), read_source(eval_cfg(ckpt, tmp_path)))
    assert data._target_ == DATA["_target_"] and model.name == "fmnist_mlp"


def key_message(where: str, key: str, target: str) -> str:
    return rf"{re.escape(where)}.*: {re.escape(key)}='{re.escape(target)}' is not one of gkl's"


# Where the payload sits: the checkpoint's hyper-parameters or the run's config.yaml.
PLACES = ["hparams.data", "hparams.model", "config.data", "config.model", "config.callbacks"]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", KINDS)
def test_eval_refuses_a_crafted_checkpoint_or_run_config(tmp_path, kind, place):
    marker = tmp_path / "pwned"
    payload = payloads(tmp_path, marker)[kind]
    hparams = {"data": DATA, "model": MODEL}
    config = {"data": DATA, "model": MODEL}
    section = place.split(".")[1]
    if place.startswith("hparams"):
        hparams[section] = payload
        where, key = "last.ckpt (hyper_parameters)", f"hyper_parameters.{section}._target_"
    elif section == "callbacks":
        config["callbacks"] = {"last_checkpoint": payload}
        where, key = "config.yaml", "callbacks.last_checkpoint._target_"
    else:
        config[section] = payload
        where, key = "config.yaml", f"{section}._target_"
    ckpt = make_run(tmp_path / "run", hparams, config)
    with pytest.raises(StoredConfigError, match=key_message(where, key, kind)):
        evaluate_run(eval_cfg(ckpt, tmp_path / "eval"))
    assert not wait_for_absence_of(marker)


def wait_for_absence_of(marker: Path) -> bool:
    """True if ``marker`` appears within a short grace period (a background payload)."""
    time.sleep(0.05)
    return marker.exists()


# Targets that a prefix check ("gkl.*") would let through, and other disguises.
DISGUISES = {
    "gkl_module_attribute": {"_target_": "gkl.models.checkpoint.torch.load", "f": "x"},
    "gkl_instantiate": {"_target_": "gkl.data.build.instantiate", "config": {}},
    "interpolated_target": {"_target_": "${oc.env:EVIL_TARGET,builtins.exec}"},
    "oc_create": "${oc.create:'{_target_: builtins.exec, _args_: [x]}'}",
    "in_a_list": {"transforms": [{"_target_": "builtins.exec", "_args_": ["x"]}]},
    "non_string_target": {"_target_": ["builtins", "exec"]},
}


@pytest.mark.parametrize("disguise", sorted(DISGUISES))
def test_disguised_targets_in_a_run_config_are_refused(tmp_path, disguise):
    config = {"data": {**DATA, "extra": DISGUISES[disguise]}, "model": MODEL}
    ckpt = make_run(tmp_path / "run", config=config)
    with pytest.raises(StoredConfigError, match=r"config\.yaml: data\.extra.*"):
        evaluate_run(eval_cfg(ckpt, tmp_path / "eval"))


def test_gkl_config_stored_in_a_checkpoint_is_checked_too(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"data": payloads(tmp_path, marker)["builtins.exec"]}
    ckpt = make_run(tmp_path / "run", gkl_config=evil)
    with pytest.raises(
        StoredConfigError,
        match=key_message("(gkl_config)", "gkl_config.data._target_", "builtins.exec"),
    ):
        read_source(eval_cfg(ckpt, tmp_path))
    assert not marker.exists()


def test_a_yaml_python_tag_in_config_yaml_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = make_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text(
        f"data: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(Exception, match="python/object/apply"):
        evaluate_run(eval_cfg(ckpt, tmp_path / "eval"))
    assert not marker.exists()


def test_a_pickle_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = make_run(tmp_path / "run")
    torch.save({"state_dict": {}, "x": Payload(marker)}, ckpt)
    with pytest.raises(ValueError, match="weights_only"):
        evaluate_run(eval_cfg(ckpt, tmp_path / "eval"))
    assert not marker.exists()


def test_eval_py_command_refuses_a_crafted_checkpoint(tmp_path):
    """The command line, as a user runs it."""
    marker = tmp_path / "pwned"
    hparams = {"data": payloads(tmp_path, marker)["torch.load"], "model": MODEL}
    ckpt = make_run(tmp_path / "run", hparams)
    result = subprocess.run(
        [sys.executable, "eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "hyper_parameters.data._target_='torch.load' is not one of gkl's" in result.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------- other readers


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", KINDS)
def test_robustness_curve_refuses_a_crafted_checkpoint(tmp_path, kind):
    marker = tmp_path / "pwned"
    hparams = {"data": DATA, "model": payloads(tmp_path, marker)[kind]}
    ckpt = make_run(tmp_path / "run", hparams)
    script = load_script("robustness_curve")
    argv = ["--ckpt", str(ckpt), "--eps", "0", "--n-examples", "8", "--out"]
    argv += [str(tmp_path / "curve.png"), "--", "data=fmnist", "data.synthetic=true"]
    with pytest.raises(
        StoredConfigError,
        match=key_message("(hyper_parameters)", "hyper_parameters.model._target_", kind),
    ):
        script.main(argv)
    assert not wait_for_absence_of(marker)
    assert not (tmp_path / "curve.png").exists()


def results_json(tmp_path: Path, ckpt: Path, card: dict, **extra) -> Path:
    card_path = tmp_path / "eval" / "model_info" / "cifar10" / "Linf" / "m.json"
    card_path.parent.mkdir(parents=True)
    card_path.write_text(json.dumps(card))
    record = {
        "checkpoint": str(ckpt),
        "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "weights": "model",
        "model_card": str(card_path),
        "architecture": "fmnist_mlp",
        "threat_model": "Linf",
        **extra,
    }
    path = tmp_path / "eval" / "results.json"
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("where", ["results.json", "model card", "checkpoint"])
def test_export_robustbench_refuses_crafted_results_card_or_checkpoint(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = payloads(tmp_path, marker)["subprocess.Popen"]
    hparams = {"data": DATA, "model": payload if where == "checkpoint" else MODEL}
    ckpt = make_run(tmp_path / "run", hparams)
    card = {"name": "x", "extra": payload} if where == "model card" else {"name": "x"}
    extra = {"robustness": {"attack": payload}} if where == "results.json" else {}
    path = results_json(tmp_path, ckpt, card, **extra)
    expected = {
        "results.json": key_message(
            "results.json", "robustness.attack._target_", "subprocess.Popen"
        ),
        "model card": key_message("m.json", "extra._target_", "subprocess.Popen"),
        "checkpoint": key_message(
            "(hyper_parameters)", "hyper_parameters.model._target_", "subprocess.Popen"
        ),
    }[where]
    with pytest.raises(StoredConfigError, match=expected):
        load_script("export_robustbench").main([str(path)])
    assert not wait_for_absence_of(marker)


def test_export_robustbench_never_parses_the_checkpoint_as_an_override(tmp_path):
    ckpt = make_run(tmp_path / "run")
    path = results_json(tmp_path, ckpt, {"name": "x"})
    record = json.loads(path.read_text())
    record["checkpoint"] = "{_target_: builtins.exec}"  # Hydra's override grammar: a dict
    path.write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match=re.escape("{_target_: builtins.exec}")):
        load_script("export_robustbench").main([str(path)])


def test_teacher_checkpoint_hyper_parameters_are_never_instantiated(tmp_path):
    from gkl.models.build import build_teacher

    marker = tmp_path / "pwned"
    evil = payloads(tmp_path, marker)
    torch.manual_seed(0)
    weights = create_model("fmnist_mlp", 10).state_dict()
    path = tmp_path / "teacher.pth"
    torch.save({"model": weights, "hyper_parameters": {"data": evil["torch.load"]}}, path)
    teacher = build_teacher("fmnist_mlp", 10, MEAN, STD, checkpoint=str(path))
    assert torch.equal(next(iter(teacher.parameters())), next(iter(weights.values())))
    assert not marker.exists()


def test_resume_from_a_checkpoint_with_a_crafted_config_is_refused(compose_cfg, tmp_path):
    from gkl.train import run as train_run

    marker = tmp_path / "pwned"
    evil = {"data": payloads(tmp_path, marker)["builtins.exec"], "seed": 0}
    ckpt = make_run(tmp_path / "src", gkl_config=evil)
    cfg = compose_cfg(tmp_path, ["data.synthetic=true", f"ckpt_path={ckpt}"], tmp_path / "r")
    with pytest.raises(ValueError, match=r"data\._target_: 'builtins.exec' -> "):
        train_run(cfg)  # the config differs: refused before anything is built
    assert not marker.exists()


# ----------------------------------------------------------------------------- CIFAR meta


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_meta_with_a_payload_is_refused_also_with_download(tmp_path, monkeypatch, dataset):
    from torchvision.datasets import CIFAR10

    from gkl.data import CIFARDataModule

    marker = tmp_path / "pwned"
    folder, meta = {
        "cifar10": ("cifar-10-batches-py", "batches.meta"),
        "cifar100": ("cifar-100-python", "meta"),
    }[dataset]
    (tmp_path / folder).mkdir()
    (tmp_path / folder / meta).write_bytes(pickle.dumps({"x": Payload(marker)}, protocol=2))
    # An archive already on disk and intact as far as torchvision's download() can tell; its
    # constructor (which unpickles with plain pickle.load) must never be called.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(CIFAR10, "__init__", lambda *a, **k: pytest.fail("torchvision read"))
    datamodule = CIFARDataModule(dataset=dataset, data_dir=tmp_path, download=True)
    with pytest.raises(ValueError, match=rf"{meta} is not a plain CIFAR batch: it refers to"):
        datamodule.prepare_data()
    assert not marker.exists()


def test_cifar_meta_without_payload_gives_the_class_names(tmp_path):
    from gkl.data.cifar import read_cifar_classes

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    assert read_cifar_classes(tmp_path, "cifar10") == [f"class{i}" for i in range(10)]


# ----------------------------------------------------------------------------- the registry


def conf_targets() -> set[str]:
    found = set()
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        found |= set(re.findall(r"_target_:\s*([\w.]+)", path.read_text()))
    return found


def script_targets() -> set[str]:
    found = set()
    for path in (ROOT / "scripts").glob("*.py"):
        found |= set(re.findall(r"_target_=([\w.]+)", path.read_text()))
    return found


def test_every_target_in_conf_and_scripts_is_allowed_and_nothing_else():
    used = conf_targets() | script_targets()
    missing = used - ALLOWED_TARGETS
    assert not missing, f"add {sorted(missing)} to gkl.stored_config.ALLOWED_TARGETS"
    assert used == ALLOWED_TARGETS, f"unused: {sorted(ALLOWED_TARGETS - used)}"


def test_every_composed_config_passes_the_check():
    for overrides in (
        [],
        ["+experiment=fmnist_kd"],
        ["+experiment=fmnist_gkl_at"],
    ):
        cfg = compose_config("train.yaml", overrides)
        check_stored_config(OmegaConf.to_container(cfg, resolve=False), "composed")


MALICIOUS_FILES = (
    len(KINDS) * len(PLACES)  # eval: 5 payloads x 5 places (checkpoint hparams, config.yaml)
    + len(DISGUISES)  # gkl-prefixed and disguised targets
    + 1  # gkl_config in a checkpoint
    + 1  # YAML python tag
    + 1  # pickle checkpoint
    + 1  # eval.py on the command line
    + len(KINDS)  # robustness_curve.py
    + 3  # export_robustbench.py: results.json, model card, checkpoint
    + 1  # export_robustbench.py: a checkpoint path in override grammar
    + 1  # teacher checkpoint
    + 1  # resume checkpoint
    + 2  # CIFAR-10 / CIFAR-100 meta with download=true
)


def test_malicious_file_count():
    assert MALICIOUS_FILES >= 30
