"""Robustness evaluation entry point (``python eval.py``, config ``conf/eval.yaml``).

One straight line: parse the threat model -> read the run (checkpoint once, its ``config.yaml``)
-> data and model -> protocol check -> clean -> PGD -> AutoAttack -> one verdict -> one record
(``results.json``) -> the RobustBench model card ``<output_dir>/model_info/<dataset>/<norm>/
<card.id>.json`` (only for a reliable result, unless ``allow_unreliable``) -> with
``export=robustbench`` the zoo-ready weights. Synthetic data (smoke tests) give
``results.smoke.json`` marked ``NOT_A_RESULT`` and no card.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import subprocess
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gkl.attacks import ThreatModel, parse_number
from gkl.attacks.defaults import default_step_size
from gkl.config import CONFIG_DIR
from gkl.data import FashionMNISTDataModule, ImageNetDataModule
from gkl.data.build import build_datamodule
from gkl.data.imagenet import ROBUSTBENCH_IDS
from gkl.evaluate.model_card import DATASETS, model_card, write_model_card
from gkl.evaluate.protocol import check_protocol, check_sizes, count_correct, pgd_correct
from gkl.evaluate.robustness import check_masking_threshold, check_pgd_steps, evaluate, verdict
from gkl.io import atomic_write_json, atomic_write_text
from gkl.models.checkpoint import load_state_dict_strict, read_checkpoint, select_weights
from gkl.models.wrappers import Normalized
from gkl.stored_config import check_stored_config

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SMOKE_RESULTS_FILE = "results.smoke.json"
RUN_CONFIG_FILE = "config.yaml"  # what train.py writes in its output directory
# gkl: gkl's resumable runner (pyautoattack); fra31: fra31's own autoattack package;
# robustbench: robustbench.eval.benchmark with fra31's package; robustbench_shim: the same with
# gkl's pyautoattack shim serving its `autoattack` import (not an independent check).
BACKENDS = ("gkl", "fra31", "robustbench", "robustbench_shim")
LEADERBOARD_FILE = "leaderboard.md"
# RobustBench's L-inf/L2 leaderboards: (dataset, norm) -> the one eps each is ranked at.
LEADERBOARDS = {
    ("cifar10", "Linf"): ThreatModel(8 / 255, "Linf"),
    ("cifar10", "L2"): ThreatModel(0.5, "L2"),
    ("cifar100", "Linf"): ThreatModel(8 / 255, "Linf"),
    ("imagenet", "Linf"): ThreatModel(4 / 255, "Linf"),
}
# Without a run that says otherwise: RobustBench's CIFAR L-inf budget.
DEFAULT_THREAT = ThreatModel(8 / 255, "Linf")
EXPORTS = ("robustbench",)
PROTOCOL_SIZE = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}  # RobustBench
DEFAULT_MODEL = {  # conf/model/zoo.yaml, for checkpoints without a run config
    "_target_": "gkl.models.build.build_classifier",
    "num_classes": "${data.num_classes}",
    "mean": "${data.mean}",
    "std": "${data.std}",
}
# Keys that say which data set a data config is; they must agree between the run and eval.py.
DATA_IDENTITY = ("_target_", "dataset", "num_classes", "mean", "std", "input_shape")


@dataclass
class Source:
    """What is evaluated: a checkpoint (its state, hash and run config) or a zoo model name."""

    ckpt_path: Path | None
    state: Any = None
    sha256: str | None = None
    run_config: DictConfig | None = None
    run_config_path: Path | None = None
    zoo_name: str | None = None


def read_source(cfg: DictConfig) -> Source:
    """Read the checkpoint once (clear errors for missing, empty, truncated or foreign files)
    and the run's ``config.yaml`` (``<run>/config.yaml`` for ``<run>/checkpoints/x.ckpt``, or
    beside the file)."""
    zoo_name = cfg.get("robustbench_model")
    if (cfg.get("ckpt_path") is None) == (zoo_name is None):
        raise ValueError(
            "give exactly one of ckpt_path=<checkpoint> and "
            "robustbench_model=<RobustBench zoo name, e.g. Carmon2019Unlabeled>"
        )
    if zoo_name is not None:
        return Source(ckpt_path=None, zoo_name=zoo_name)
    path = Path(cfg.ckpt_path).expanduser()
    state, sha256 = read_checkpoint(path)
    if isinstance(state, Mapping):  # stored configs never choose code (gkl.stored_config)
        for key in ("hyper_parameters", "gkl_config"):
            check_stored_config(state.get(key), f"{path} ({key})", f"{key}.")
    source = Source(ckpt_path=path, state=state, sha256=sha256)
    for candidate in (path.parent.parent / RUN_CONFIG_FILE, path.parent / RUN_CONFIG_FILE):
        if candidate.is_file():
            source.run_config = OmegaConf.load(candidate)
            check_stored_config(source.run_config, str(candidate))
            source.run_config_path = candidate
            break
    return source


def _stored(source: Source, key: str) -> tuple[dict[str, Any], str]:
    """The run's ``key`` section (``model`` / ``data``) from its config.yaml and the checkpoint's
    hyper-parameters (which must agree), and where it came from."""
    found: list[tuple[dict[str, Any], str]] = []
    if source.run_config is not None and source.run_config.get(key) is not None:
        section = OmegaConf.to_container(source.run_config[key], resolve=False)
        found.append((section, str(source.run_config_path)))
    hparams = source.state.get("hyper_parameters") if isinstance(source.state, Mapping) else None
    if isinstance(hparams, Mapping) and isinstance(hparams.get(key), Mapping):
        found.append((dict(hparams[key]), f"{source.ckpt_path} (hyper_parameters)"))
    if len(found) == 2:
        (a, where_a), (b, where_b) = found
        clash = [k for k in a.keys() & b.keys() if a[k] != b[k]]
        if clash:
            raise ValueError(
                f"{key}.{clash[0]} is {a[clash[0]]!r} in {where_a} but {b[clash[0]]!r} in "
                f"{where_b}: the run's records disagree; give {key} explicitly"
            )
        return a | b, f"{where_a} and {where_b}"
    return found[0] if found else ({}, "")


def _explicit(section: DictConfig | None) -> dict[str, Any]:
    """The keys a user set on the command line (``???`` and ``null`` placeholders dropped)."""
    if section is None:
        return {}
    given = [k for k in section if not OmegaConf.is_missing(section, k)]
    values = OmegaConf.to_container(section, resolve=True, throw_on_missing=False)
    return {k: values[k] for k in given if values[k] is not None}


def _merge(key: str, stored: dict, where: str, explicit: dict, identity=None) -> dict:
    """``stored`` overlaid with ``explicit``; an explicit value of an identity key that differs
    from the stored one is an error (it would evaluate another model or data set)."""
    for k, value in explicit.items():
        if (identity is None or k in identity) and k in stored and stored[k] != value:
            raise ValueError(
                f"{key}.{k}={value!r} disagrees with the run, which has {key}.{k}="
                f"{stored[k]!r} ({where}); drop the override or evaluate the matching checkpoint"
            )
    return stored | explicit


def resolve_config(cfg: DictConfig, source: Source) -> tuple[DictConfig, DictConfig]:
    """(data config, model config): the run's (config.yaml / checkpoint hyper-parameters) with
    the user's explicit settings on top; disagreements are errors."""
    stored_data, data_where = _stored(source, "data") if source.state is not None else ({}, "")
    stored_model, model_where = _stored(source, "model") if source.state is not None else ({}, "")
    data = _merge("data", stored_data, data_where, _explicit(cfg.get("data")), DATA_IDENTITY)
    if "_target_" not in data:
        raise ValueError(
            "no data set: set data=<cifar10|cifar100|imagenet|fmnist> (nothing found "
            f"{'in ' + data_where if data_where else 'beside the checkpoint (no config.yaml)'})"
        )
    if data["_target_"].endswith("ImageNetDataModule"):  # RobustBench's ImageNet protocol
        data.setdefault("test_ids", ROBUSTBENCH_IDS)
        data["test_size"] = None
        if cfg.get("preprocessing"):
            data["preprocessing"] = cfg.preprocessing
    elif cfg.get("preprocessing"):
        raise ValueError(
            f"preprocessing={cfg.preprocessing} is RobustBench's ImageNet test preprocessing; "
            f"this run's data ({data['_target_'].rsplit('.', 1)[-1]}) has none: drop it"
        )
    model = _merge("model", stored_model, model_where, _explicit(cfg.get("model")))
    if source.zoo_name is None:
        model = {**DEFAULT_MODEL, **model} if not stored_model else model
        if "name" not in model:
            raise ValueError(
                "model.name is required: the checkpoint's architecture, e.g. model.name="
                "wrn_34_10 (gkl.models.list_models()); no run config.yaml was found beside "
                f"{source.ckpt_path} to supply it"
            )
    tree = OmegaConf.create({"data": data, "model": model})
    OmegaConf.resolve(tree)
    check_stored_config(tree, f"{data_where or 'the eval config'} (resolved)")
    return tree.data, tree.model


def dataset_name(datamodule) -> str:
    """``cifar10`` / ``cifar100`` / ``imagenet`` (RobustBench's names) or ``fmnist``."""
    if isinstance(getattr(datamodule, "dataset", None), str):
        return datamodule.dataset
    if isinstance(datamodule, ImageNetDataModule):
        return "imagenet"
    if isinstance(datamodule, FashionMNISTDataModule):
        return "fmnist"
    return type(datamodule).__name__


def test_tensors(datamodule, n_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_examples`` test images (in [0, 1], loader order) and their labels."""
    with warnings.catch_warnings():  # training's "validating on the TEST set" is not for eval
        warnings.filterwarnings("ignore", message=".*validating on the TEST set")
        datamodule.setup("test")
    xs, ys, count = [], [], 0
    for x, y in datamodule.test_dataloader():
        xs.append(x)
        ys.append(y)
        count += len(y)
        if count >= n_examples:
            break
    if not ys:
        raise ValueError("the test split is empty: check data.data_dir")
    x, y = torch.cat(xs)[:n_examples], torch.cat(ys)[:n_examples]
    if len(y) < n_examples:
        warnings.warn(
            f"the test split has {len(y)} images, fewer than n_examples={n_examples}", stacklevel=2
        )
    return x, y


def build_model(model_cfg: DictConfig, source: Source, weights: str) -> tuple[Any, str]:
    """The classifier of ``model_cfg`` with the chosen ``weights`` of the checkpoint loaded
    strictly (a mismatch names both architectures and the file), in eval mode."""
    state, chosen = select_weights(source.state, weights, source=str(source.ckpt_path))
    model = instantiate(model_cfg)
    network = model.model if isinstance(model, Normalized) else model
    load_state_dict_strict(network, state, model_cfg.get("name"), source=str(source.ckpt_path))
    return model.eval(), chosen


def load_model(model_cfg: DictConfig, path: str | Path, weights: str = "auto") -> torch.nn.Module:
    """The classifier eval.py evaluates for checkpoint ``path``: ``model_cfg`` is the ``model``
    node of a composed ``eval.yaml`` (its data and the run's config.yaml beside ``path`` fill
    in the rest, as in :func:`run`); in eval mode."""
    cfg = model_cfg._get_root().copy()
    OmegaConf.update(cfg, "ckpt_path", str(path), force_add=True)
    source = read_source(cfg)
    _, resolved = resolve_config(cfg, source)
    return build_model(resolved, source, weights)[0]


def protocol_notes(
    cfg: DictConfig, dataset: str, n: int, attacks: list[str], threat: ThreatModel
) -> list[str]:
    """Where the evaluation departs from RobustBench's protocol, for the card's footnote."""
    notes = []
    version = cfg.autoattack.version
    if cfg.backend in ("gkl", "fra31") and version != "standard":
        listed = f" ({', '.join(attacks)})" if attacks else ""
        notes.append(f"AutoAttack {version}{listed}, not standard.")
    if n != PROTOCOL_SIZE[dataset]:
        notes.append(f"Evaluated on the first {n} test images, not {PROTOCOL_SIZE[dataset]}.")
    off = off_leaderboard(dataset, threat)
    if off:
        notes.append(f"Off-leaderboard budget: {off}.")
    return notes


def off_leaderboard(dataset: str, threat: ThreatModel) -> str | None:
    """Why ``threat`` on ``dataset`` is not a RobustBench leaderboard's budget, else ``None``."""
    board = LEADERBOARDS.get((dataset, threat.norm))
    if board is None:
        return f"RobustBench has no {dataset} {threat.norm} leaderboard"
    if abs(board.eps - threat.eps) > 1e-6:
        return (
            f"{threat.norm} eps {threat}, while RobustBench's {dataset} {threat.norm} "
            f"leaderboard is at eps {board}"
        )
    return None


def build_card(
    cfg: DictConfig,
    dataset: str,
    threat: ThreatModel,
    architecture: str | None,
    record: Mapping[str, Any],
    notes: list[str],
    unreliable: bool,
) -> dict[str, Any]:
    """The validated RobustBench card from ``cfg.card`` and the record's accuracies."""
    card = cfg.card
    footnote = " ".join(([card.footnote] if card.footnote else []) + notes) or None
    return model_card(
        name=card.name,
        link=card.link,
        authors=card.authors,
        architecture=card.architecture or architecture,
        venue=card.venue,
        dataset=dataset,
        eps=threat,
        clean_acc=record["clean_acc"],
        autoattack_acc=record["autoattack_acc"],
        reported=card.reported,
        norm=threat.norm,
        additional_data=card.additional_data,
        number_forward_passes=card.number_forward_passes,
        footnote=footnote,
        unreliable=unreliable,
        external=card.get("external"),
    )


# RobustBench's leaderboard columns (robustbench/leaderboard/leaderboard.html.j2), in order.
LEADERBOARD_COLUMNS = (
    "Rank",
    "Method",
    "Standard accuracy",
    "AA accuracy",
    "AA + external accuracy",
    "Raised flags",
    "Extra data",
    "Architecture",
    "Venue",
)


def leaderboard_row(card: Mapping[str, Any]) -> str:
    """The card as a markdown table (header and one row) in RobustBench's column order, the
    cells as its template renders them (rank ``?``: it depends on the other entries)."""
    method = f"[{card['name']}]({card['link']})"
    if card.get("footnote"):
        method += f"<br>{card['footnote']}"
    cells = [
        "?",
        method,
        f"{card['clean_acc']}%",
        f"{card['autoattack_acc']}%",
        f"{card['external']}%" if card.get("external") else "N/A",
        "unreliable" if card.get("unreliable") else "none",
        "&#9745;" if card["additional_data"] else "&#215;",
        card["architecture"],
        card["venue"],
    ]
    rows = [LEADERBOARD_COLUMNS, ["---"] * len(LEADERBOARD_COLUMNS), cells]
    return "".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |\n" for r in rows)


def check_request(cfg: DictConfig) -> None:
    """Everything about the request that can be wrong before any file is read."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.backend!r}; valid choices: {list(BACKENDS)}")
    if cfg.get("export") not in (None, *EXPORTS):
        raise ValueError(f"unknown export {cfg.export!r}; valid choices: {list(EXPORTS)}")
    if cfg.get("export") and cfg.card.id is None:
        raise ValueError("export=robustbench writes a submission: set card.id and the card fields")
    check_sizes(cfg.n_examples, cfg.batch_size)
    check_pgd_steps(cfg.pgd.steps)
    check_masking_threshold(cfg.masking_threshold)
    if cfg.get("norm") is not None or cfg.get("eps") is not None:  # typos fail now
        norm = cfg.get("norm") or DEFAULT_THREAT.norm
        ThreatModel.parse(cfg.eps if cfg.get("eps") is not None else 0, norm)
    if cfg.card.id is not None:
        try:  # fail now, not after hours of AutoAttack (dataset and architecture: stand-ins)
            placeholder = {"clean_acc": 1.0, "autoattack_acc": 0.0}
            build_card(cfg, "cifar10", DEFAULT_THREAT, "architecture", placeholder, [], False)
        except ValueError as error:
            raise ValueError(
                f"{error}. Set card.name, card.link, card.authors and card.venue for the model "
                "card, or drop card.id to evaluate without one"
            ) from None


def run_threat_model(source: Source) -> ThreatModel | None:
    """The budget the run trained against (``task.eps`` / ``task.norm`` of its config.yaml), or
    ``None`` for a run that trained without one (or a checkpoint without a run)."""
    run_cfg = source.run_config
    task = run_cfg.get("task") if run_cfg is not None else None
    if not isinstance(task, DictConfig) or task.get("eps") is None:
        return None
    name = f"task.eps in {source.run_config_path}"
    return ThreatModel.parse(task.eps, task.get("norm") or "Linf", name=name)


def threat_model(cfg: DictConfig, source: Source) -> tuple[ThreatModel, dict[str, Any]]:
    """The evaluated budget: the run's training threat model, with ``eps=`` / ``norm=`` on the
    command line on top (else RobustBench's default for the norm), and a record of where each
    part came from (``threat_model_source``) and of any departure from the run (``note``)."""
    trained = run_threat_model(source)
    norm = cfg.get("norm") or (trained.norm if trained else DEFAULT_THREAT.norm)
    if cfg.get("eps") is not None:
        threat, eps_from = ThreatModel.parse(cfg.eps, norm), "command line"
    elif trained is not None and trained.norm == norm:
        threat, eps_from = ThreatModel(trained.eps, norm), "run"
    else:
        default = LEADERBOARDS[("cifar10", norm)]
        threat, eps_from = default, f"default (RobustBench's CIFAR-10 {norm} budget)"
    norm_from = "command line" if cfg.get("norm") else ("run" if trained else eps_from)
    note = None
    if trained is None:
        note = (
            f"the run records no training threat model ({source.run_config_path or 'no run'}): "
            f"evaluating {threat.norm} eps {threat}"
        )
    elif (threat.norm, str(threat)) != (trained.norm, str(trained)):
        note = (
            f"evaluating {threat.norm} eps {threat} ({eps_from}), not the run's training threat "
            f"model {trained.norm} eps {trained} ({source.run_config_path})"
        )
    info = {
        "threat_model_source": {"eps": eps_from, "norm": norm_from},
        "run_threat_model": None
        if trained is None
        else {"eps": str(trained), "norm": trained.norm, "file": str(source.run_config_path)},
        "threat_model_note": note,
    }
    if note and trained is not None:
        log.warning("%s", note)
    elif note:
        log.info("%s", note)
    return threat, info


def versions(backend: str) -> dict[str, str]:
    """The exact software behind the numbers: Python, torch, the AutoAttack implementation
    used, robustbench where used, and gkl (with its git commit when run from a checkout)."""
    found = {"python": platform.python_version()}
    packages = ["torch", "torchvision", "numpy", "pyautoattack"]
    if backend.startswith("robustbench"):
        packages.append("robustbench")
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["gkl"] = f"{importlib.metadata.version('gkl')} {_git_commit()}".strip()
    return found


def _git_commit() -> str:
    """``git <commit>[+changes]`` of the checkout gkl runs from, or ``""`` outside one."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"git {head}{'+changes' if dirty else ''}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` (or a zoo model); returns the record written to results.json."""
    started = time.perf_counter()
    check_request(cfg)
    source = read_source(cfg)
    threat, threat_info = threat_model(cfg, source)
    data_cfg, model_cfg = resolve_config(cfg, source)
    datamodule = build_datamodule(data_cfg)
    dataset = dataset_name(datamodule)
    synthetic = bool(getattr(datamodule, "is_synthetic", False))
    if cfg.backend.startswith("robustbench") and dataset not in DATASETS:
        raise ValueError(f"backend={cfg.backend} supports {list(DATASETS)}, not {dataset!r}")
    architecture = source.zoo_name or model_cfg.get("name")
    write_card = cfg.card.id is not None and not synthetic
    if write_card:
        if dataset not in DATASETS:
            raise ValueError(
                f"RobustBench model cards exist for {list(DATASETS)}, not {dataset!r}: "
                "drop card.id to evaluate without a card"
            )
        if cfg.n_examples > PROTOCOL_SIZE[dataset]:
            raise ValueError(
                f"n_examples={cfg.n_examples} exceeds RobustBench's {dataset} protocol "
                f"({PROTOCOL_SIZE[dataset]} test images) for a model card: set "
                f"n_examples={PROTOCOL_SIZE[dataset]} or fewer"
            )
        off = off_leaderboard(dataset, threat)
        if off and not cfg.allow_off_leaderboard:
            raise ValueError(
                f"no model card for a budget no RobustBench leaderboard uses ({off}): evaluate "
                "at the leaderboard's eps, drop card.id, or set allow_off_leaderboard=true to "
                "write the card with the budget stated in its footnote"
            )

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.state_path:
        Path(cfg.state_path).parent.mkdir(parents=True, exist_ok=True)
    if source.zoo_name is not None:
        from gkl.evaluate.robustbench_backend import load_zoo_model

        model = load_zoo_model(
            source.zoo_name,
            dataset=dataset,
            threat_model=threat.norm,
            model_dir=cfg.robustbench_model_dir,
        )
        identity = {
            "robustbench_model": source.zoo_name,
            "checkpoint": None,
            "checkpoint_sha256": None,
        }
    else:
        model, chosen = build_model(model_cfg, source, cfg.weights)
        identity = {
            "checkpoint": str(source.ckpt_path.resolve()),
            "checkpoint_sha256": source.sha256,
            "weights": chosen,
        }
    if cfg.get("export"):  # before hours of attacks: is this model exportable at all?
        from gkl.evaluate.export import robustbench_constructor, robustbench_network

        robustbench_constructor(architecture, robustbench_network(model).state_dict())
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    x, y = test_tensors(datamodule, cfg.n_examples)
    loaded = time.perf_counter() - started
    log.info(
        "evaluating %s on %d %s test images, %s eps=%s (%s), backend %s",
        cfg.ckpt_path or f"RobustBench model {source.zoo_name}",
        len(y),
        dataset,
        threat.norm,
        threat,
        "eps from " + threat_info["threat_model_source"]["eps"],
        cfg.backend,
    )
    attacks = list(cfg.autoattack.attacks) if cfg.autoattack.attacks else None
    # Binds the AutoAttack state to this model (with the weights' own hash, see run_autoattack);
    # the path is left out: a moved file is the same model.
    tag = {"architecture": architecture, **{k: v for k, v in identity.items() if k != "checkpoint"}}
    if cfg.backend == "gkl":
        result = evaluate(
            model,
            x,
            y,
            eps=threat.eps,
            norm=threat.norm,
            pgd_steps=cfg.pgd.steps,
            pgd_step_size=None if cfg.pgd.step_size is None else _step(cfg.pgd.step_size),
            pgd_restarts=cfg.pgd.restarts,
            autoattack_version=cfg.autoattack.version,
            attacks=attacks,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            state_path=cfg.state_path,
            masking_threshold=cfg.masking_threshold,
            tag=tag,
        )
        result["autoattack_implementation"] = "pyautoattack through gkl's resumable runner"
    else:
        result = _external(cfg, model, x, y, threat, dataset, data_cfg, device, out_dir)
    result["seconds"] = {"load": loaded, **result["seconds"]}
    record: dict[str, Any] = {
        "dataset": dataset,
        "threat_model": threat.norm,
        **result,
        "eps": str(threat),
        "eps_value": threat.eps,
        **threat_info,
        "backend": cfg.backend,
        "attacks": attacks,
        **identity,
        "architecture": architecture,
        "seed": cfg.seed,
        "versions": versions(cfg.backend),
        "model_card": None,
    }
    _log_breakdown(record)
    results_path = out_dir / (SMOKE_RESULTS_FILE if synthetic else RESULTS_FILE)
    refused = None
    if synthetic:
        record["NOT_A_RESULT"] = "synthetic data: smoke test only"
    elif write_card:
        if record["unreliable"] and not cfg.allow_unreliable:
            refused = (
                f"no model card for an unreliable result ({'; '.join(record['warnings'])}). "
                "Find the cause (gradient masking, a broken attack, a stochastic model) or rerun "
                "with allow_unreliable=true to write the card marked unreliable: true"
            )
            record["card_refused"] = refused
        else:
            run_attacks = attacks or [a["attack"] for a in record["autoattack_per_attack"]]
            notes = protocol_notes(cfg, dataset, len(y), run_attacks, threat)
            if record["unreliable"]:
                notes.append("Unreliable evaluation: " + " ".join(record["warnings"]) + ".")
            card = build_card(
                cfg,
                dataset,
                threat,
                architecture,
                record,
                notes,
                unreliable=bool(record["unreliable"] or cfg.card.unreliable),
            )
            path = write_model_card(card, out_dir, dataset, threat.norm, cfg.card.id)
            record["model_card"] = str(path)
            row = atomic_write_text(out_dir / LEADERBOARD_FILE, leaderboard_row(card))
            record["leaderboard_row"] = str(row)
            log.info("wrote model card %s and its leaderboard row %s", path, row)
            if cfg.get("export"):
                from gkl.evaluate.export import export_robustbench

                record["export"] = export_robustbench(
                    model,
                    architecture=architecture,
                    card=card,
                    card_id=cfg.card.id,
                    threat_model=threat.norm,
                    out_dir=out_dir,
                )
                log.info("RobustBench submission files: %s", record["export"])
    record["seconds"]["total"] = time.perf_counter() - started
    atomic_write_json(results_path, record)
    log.info(
        "clean %.2f%% | PGD-%d %.2f%% | AutoAttack %.2f%% (%s eps %s, n=%d) -> %s",
        100 * record["clean_acc"],
        cfg.pgd.steps,
        100 * record["pgd_acc"],
        100 * record["autoattack_acc"],
        threat.norm,
        threat,
        record["n_examples"],
        results_path,
    )
    if refused:
        raise RuntimeError(f"{refused} (results in {results_path})")
    return record


def _log_breakdown(record: Mapping[str, Any]) -> None:
    """The per-attack table AutoAttack users read to spot gradient masking, and stage times."""
    counts, n = record["counts"], record["n_examples"]
    stages = [("clean", counts["clean"], record["clean_acc"])]
    stages.append((f"PGD-{record['pgd_steps']}", counts["pgd"], record["pgd_acc"]))
    per_attack = record["autoattack_per_attack"]
    stages += [(a["attack"], a.get("robust"), a["robust_acc"]) for a in per_attack]
    lines = [
        f"  {name:<12} {'' if count is None else f'{count}/{n}':>12}  {100 * acc:6.2f}%"
        for name, count, acc in stages
    ]
    times = ", ".join(f"{k} {v:.1f} s" for k, v in record["seconds"].items())
    log.info("robust accuracy after each stage:\n%s\nwall time: %s", "\n".join(lines), times)


def _step(value: float | str) -> float:
    """``pgd.step_size`` as typed (``2/255`` accepted), in the units of eps."""
    return parse_number(value, "pgd.step_size")


def _external(cfg, model, x, y, threat, dataset, data_cfg, device, out_dir) -> dict[str, Any]:
    """Clean, PGD (gkl's) and AutoAttack accuracy where AutoAttack is another implementation:
    fra31's package (``fra31``) or ``robustbench.eval.benchmark`` (standard AutoAttack, with
    fra31's package or gkl's shim); counts and the same verdict as the gkl backend."""
    n, seconds = len(y), {}
    step = default_step_size(threat.eps, cfg.pgd.steps)
    if cfg.pgd.step_size is not None:
        step = _step(cfg.pgd.step_size)
    check_protocol(model, x[: cfg.batch_size])
    start = time.perf_counter()
    clean = count_correct(model, x, y, cfg.batch_size)
    seconds["clean"] = time.perf_counter() - start
    start = time.perf_counter()
    robust_pgd = pgd_correct(
        model,
        x,
        y,
        eps=threat.eps,
        norm=threat.norm,
        steps=cfg.pgd.steps,
        step_size=step,
        restarts=cfg.pgd.restarts,
        loss="ce",
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    seconds["pgd"] = time.perf_counter() - start
    version = cfg.autoattack.version
    start = time.perf_counter()
    if cfg.backend == "fra31":
        from gkl.evaluate.fra31_backend import fra31_autoattack

        aa = fra31_autoattack(
            model,
            x,
            y,
            eps=threat.eps,
            norm=threat.norm,
            version=version,
            attacks=list(cfg.autoattack.attacks or []),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            log_path=out_dir / "autoattack_fra31.log",
        )
        robust, per_attack, implementation = aa["robust"], aa["per_attack"], aa["version"]
    else:
        from gkl.evaluate.robustbench_backend import robustbench_benchmark

        if version != "standard" or cfg.autoattack.attacks:
            raise ValueError(
                f"backend={cfg.backend} runs RobustBench's protocol, standard AutoAttack only: "
                "drop autoattack.version/autoattack.attacks or use backend=fra31"
            )
        rb_clean, rb_robust = robustbench_benchmark(
            model,
            dataset=dataset,
            threat_model=threat.norm,
            eps=threat.eps,
            n_examples=n,
            x_test=x,
            y_test=y,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=device,
            preprocessing=data_cfg.get("preprocessing") if dataset == "imagenet" else None,
            autoattack="shim" if cfg.backend == "robustbench_shim" else "fra31",
        )
        if round(rb_clean * n) != clean:
            raise RuntimeError(
                f"robustbench's clean accuracy {rb_clean} differs from gkl's {clean}/{n} on the "
                "same images: the model or the data differ between the two"
            )
        robust, per_attack = round(rb_robust * n), []
        implementation = "robustbench.eval.benchmark with " + (
            "gkl's pyautoattack shim" if cfg.backend == "robustbench_shim" else "fra31's autoattack"
        )
        if cfg.backend == "robustbench":
            from gkl.evaluate.fra31_backend import fra31_version, import_fra31

            implementation += f" ({fra31_version(import_fra31())})"
    seconds["autoattack"] = time.perf_counter() - start
    return {
        "n_examples": n,
        "norm": threat.norm,
        "clean_acc": clean / n,
        "pgd_acc": robust_pgd / n,
        "pgd_steps": cfg.pgd.steps,
        "pgd_step_size": step,
        "autoattack_acc": robust / n,
        "autoattack_version": version,
        "autoattack_implementation": implementation,
        "counts": {"n": n, "clean": clean, "pgd": robust_pgd, "autoattack": robust},
        "autoattack_per_attack": per_attack,
        "seconds": seconds,
        **verdict(clean, robust_pgd, robust, n, cfg.masking_threshold),
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    run(cfg)
