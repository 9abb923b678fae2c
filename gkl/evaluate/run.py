"""Robustness evaluation entry point (``python eval.py``, config ``conf/eval.yaml``).

Loads a checkpoint into the configured architecture, evaluates it in eval mode on the first
``n_examples`` test images (clean, PGD, AutoAttack), writes ``results.json`` and, with
``card.id`` set, a RobustBench model card ``<output_dir>/model_info/<dataset>/<norm>/<id>.json``.
Synthetic data (smoke tests) give ``results.smoke.json`` marked ``NOT_A_RESULT`` and no card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from gkl.attacks import parse_eps, quiet_eps_warnings
from gkl.data import FashionMNISTDataModule, ImageNetDataModule
from gkl.evaluate.model_card import DATASETS, eps_to_fraction_string, model_card, write_model_card
from gkl.evaluate.protocol import default_step_size, pgd_accuracy
from gkl.evaluate.robustness import evaluate
from gkl.models import load_mdistiller_checkpoint
from gkl.train import CONFIG_DIR, build_datamodule

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
SMOKE_RESULTS_FILE = "results.smoke.json"
BACKENDS = ("gkl", "robustbench")
WEIGHTS = ("auto", "ema", "model")
# Lightning checkpoints of gkl's tasks: task.model (Normalized) holds the network as .model.
MODEL_PREFIX = "model.model."
EMA_PREFIX = "ema_model.model."
PROTOCOL_SIZE = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}  # RobustBench


def checkpoint_prefix(path: str | Path, weights: str = "auto") -> str | None:
    """Key prefix of the network to load from ``path``.

    Lightning checkpoints hold the trained network under ``model.model.`` and, when the task kept
    an EMA, the average under ``ema_model.model.``: ``weights="auto"`` picks the EMA if present,
    ``"ema"`` requires it, ``"model"`` takes the trained weights. Other files (``{"model": sd}``,
    a bare state_dict) return ``None``: the loader finds the network itself.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    has_ema = isinstance(state, Mapping) and any(k.startswith(EMA_PREFIX) for k in state)
    if weights == "ema" and not has_ema:
        raise ValueError(f"weights=ema but {path} holds no EMA weights ({EMA_PREFIX}*)")
    if not isinstance(state, Mapping):
        return None
    return EMA_PREFIX if has_ema and weights != "model" else MODEL_PREFIX


def load_model(model_cfg: DictConfig, path: str | Path, weights: str = "auto") -> nn.Module:
    """Build ``model_cfg`` (a :class:`Normalized` classifier), load its network strictly from
    ``path`` (a mismatch names the configured architecture and the checkpoint's) and return it in
    eval mode."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt_path=<file>)")
    model = instantiate(model_cfg)
    network = getattr(model, "model", model)
    load_mdistiller_checkpoint(
        network, path, arch_name=model_cfg.get("name"), prefix=checkpoint_prefix(path, weights)
    )
    return model.eval()


def dataset_name(datamodule) -> str:
    """``cifar10`` / ``cifar100`` / ``imagenet`` (RobustBench's names) or ``fmnist``."""
    if isinstance(getattr(datamodule, "dataset", None), str):
        return datamodule.dataset
    if isinstance(datamodule, ImageNetDataModule):
        return "imagenet"
    if isinstance(datamodule, FashionMNISTDataModule):
        return "fmnist"
    return type(datamodule).__name__


def test_tensors(datamodule, n_examples: int) -> tuple[Tensor, Tensor]:
    """The first ``n_examples`` test images (in [0, 1], loader order) and their labels."""
    datamodule.setup("test")
    xs, ys, count = [], [], 0
    for x, y in datamodule.test_dataloader():
        xs.append(x)
        ys.append(y)
        count += len(y)
        if count >= n_examples:
            break
    x, y = torch.cat(xs)[:n_examples], torch.cat(ys)[:n_examples]
    if len(y) < n_examples:
        warnings.warn(
            f"the test split has {len(y)} images, fewer than n_examples={n_examples}", stacklevel=2
        )
    return x, y


def architecture_name(cfg: DictConfig) -> str | None:
    """The evaluated network's name: the RobustBench zoo name, else ``model.name``."""
    if cfg.get("robustbench_model"):
        return cfg.robustbench_model
    return cfg.model.name if OmegaConf.select(cfg, "model.name") != "???" else None


def build_card(
    cfg: DictConfig, dataset: str, eps: float, clean: float, robust: float, footnote: str
) -> dict[str, Any]:
    """The validated RobustBench card from ``cfg.card`` (architecture defaults to model.name)."""
    card = cfg.card
    return model_card(
        name=card.name,
        link=card.link,
        authors=card.authors,
        architecture=card.architecture or architecture_name(cfg),
        venue=card.venue,
        dataset=dataset,
        eps=eps,
        clean_acc=clean,
        autoattack_acc=robust,
        reported=card.reported,
        norm=cfg.norm,
        additional_data=card.additional_data,
        number_forward_passes=card.number_forward_passes,
        footnote=footnote,
        unreliable=card.unreliable,
    )


def _protocol_footnote(cfg: DictConfig, dataset: str, n: int, attacks: list[str]) -> str:
    """``card.footnote``, plus a note when the evaluation is not RobustBench's protocol."""
    notes = [cfg.card.footnote] if cfg.card.footnote else []
    if cfg.backend == "gkl" and cfg.autoattack.version != "standard":
        notes.append(f"AutoAttack {cfg.autoattack.version} ({', '.join(attacks)}), not standard.")
    if n != PROTOCOL_SIZE.get(dataset):
        notes.append(f"Evaluated on the first {n} test images, not {PROTOCOL_SIZE[dataset]}.")
    return " ".join(notes)


def sanity_flags(clean: float, pgd: float, aa: float, threshold: float) -> dict[str, Any]:
    """``order_violation`` (not clean >= PGD >= AA) and ``gradient_masking`` (PGD - AA >
    threshold), as :func:`gkl.evaluate.evaluate` reports them, each with a warning."""
    problems = []
    ordered = clean >= pgd >= aa
    if not ordered:
        problems.append(f"accuracies violate clean >= PGD >= AutoAttack: {clean}, {pgd}, {aa}")
    masking = pgd - aa > threshold
    if masking:
        problems.append(f"possible gradient masking: PGD {pgd:.4f} exceeds AutoAttack {aa:.4f}")
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=2)
    return {"order_violation": not ordered, "gradient_masking": masking, "warnings": problems}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path``; returns the record written to ``results.json``."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.backend!r}; valid choices: {list(BACKENDS)}")
    eps = parse_eps(cfg.eps, norm=cfg.norm)  # rejects 8, warns about 0.031 before any work
    zoo_name = cfg.get("robustbench_model")
    if (cfg.get("ckpt_path") is None) == (zoo_name is None):
        raise ValueError(
            "give exactly one of ckpt_path=<checkpoint of model.name> and "
            "robustbench_model=<RobustBench zoo name, e.g. Carmon2019Unlabeled>"
        )
    datamodule = build_datamodule(cfg.data)
    dataset = dataset_name(datamodule)
    synthetic = bool(getattr(datamodule, "is_synthetic", False))
    if cfg.backend == "robustbench" and dataset not in DATASETS:
        raise ValueError(f"backend=robustbench supports {list(DATASETS)}, not {dataset!r}")
    write_card = cfg.card.id is not None and not synthetic
    if write_card:
        if dataset not in DATASETS:
            raise ValueError(
                f"RobustBench model cards exist for {list(DATASETS)}, not {dataset!r}: "
                "drop card.id to evaluate without a card"
            )
        try:  # fail now, not after hours of AutoAttack
            build_card(cfg, dataset, eps, 1.0, 0.0, "")
        except ValueError as error:
            raise ValueError(
                f"{error}. Set card.name, card.link, card.authors and card.venue for the model "
                "card, or drop card.id to evaluate without one"
            ) from None

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.state_path:
        Path(cfg.state_path).parent.mkdir(parents=True, exist_ok=True)
    if zoo_name is not None:
        from gkl.evaluate.robustbench_backend import load_zoo_model

        model = load_zoo_model(
            zoo_name, dataset=dataset, threat_model=cfg.norm, model_dir=cfg.robustbench_model_dir
        )
    else:
        model = load_model(cfg.model, cfg.ckpt_path, cfg.weights)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    x, y = test_tensors(datamodule, cfg.n_examples)
    log.info(
        "evaluating %s on %d %s test images, %s eps=%s",
        cfg.ckpt_path or f"RobustBench model {zoo_name}",
        len(y),
        dataset,
        cfg.norm,
        eps_to_fraction_string(eps, cfg.norm),
    )
    attacks = list(cfg.autoattack.attacks) if cfg.autoattack.attacks else None
    if cfg.backend == "gkl":
        result = evaluate(
            model,
            x,
            y,
            eps=eps,
            norm=cfg.norm,
            pgd_steps=cfg.pgd.steps,
            pgd_step_size=cfg.pgd.step_size,
            pgd_restarts=cfg.pgd.restarts,
            autoattack_version=cfg.autoattack.version,
            attacks=attacks,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            state_path=cfg.state_path,
            masking_threshold=cfg.masking_threshold,
        )
    else:
        result = _robustbench(cfg, model, x, y, eps, dataset, device)
    result["eps"] = eps_to_fraction_string(eps, cfg.norm)
    result["eps_value"] = eps
    if zoo_name is None:
        ckpt = Path(cfg.ckpt_path).expanduser()
        source = {
            "checkpoint": str(ckpt.resolve()),
            "checkpoint_sha256": _sha256(ckpt),
            "weights": checkpoint_prefix(ckpt, cfg.weights) or "network",
        }
    else:
        source = {"checkpoint": None, "checkpoint_sha256": None, "robustbench_model": zoo_name}
    record: dict[str, Any] = {
        "dataset": dataset,
        "threat_model": cfg.norm,
        **result,
        "backend": cfg.backend,
        "attacks": attacks,
        **source,
        "architecture": architecture_name(cfg),
        "seed": cfg.seed,
        "model_card": None,
    }
    if synthetic:
        record["NOT_A_RESULT"] = "synthetic data: smoke test only"
    elif write_card:
        footnote = _protocol_footnote(cfg, dataset, len(y), attacks or [])
        card = build_card(
            cfg, dataset, eps, record["clean_acc"], record["autoattack_acc"], footnote
        )
        path = write_model_card(card, out_dir, dataset, cfg.norm, cfg.card.id)
        record["model_card"] = str(path)
        log.info("wrote model card %s", path)
    results_path = out_dir / (SMOKE_RESULTS_FILE if synthetic else RESULTS_FILE)
    _write_json(results_path, record)
    log.info(
        "clean %.4f | PGD-%d %.4f | AutoAttack %.4f -> %s",
        record["clean_acc"],
        cfg.pgd.steps,
        record["pgd_acc"],
        record["autoattack_acc"],
        results_path,
    )
    return record


def _robustbench(cfg, model, x, y, eps, dataset, device) -> dict[str, Any]:
    """Clean and AutoAttack-standard accuracy from ``robustbench.eval.benchmark``; PGD from gkl."""
    from gkl.evaluate.robustbench_backend import robustbench_benchmark

    clean, robust = robustbench_benchmark(
        model,
        dataset=dataset,
        threat_model=cfg.norm,
        eps=eps,
        n_examples=len(y),
        x_test=x,
        y_test=y,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        device=device,
    )
    step = cfg.pgd.step_size or default_step_size(eps, cfg.pgd.steps)
    with quiet_eps_warnings():
        robust_pgd = pgd_accuracy(
            model,
            x,
            y,
            eps=eps,
            norm=cfg.norm,
            steps=cfg.pgd.steps,
            step_size=step,
            restarts=cfg.pgd.restarts,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
    return {
        "n_examples": len(y),
        "norm": cfg.norm,
        "clean_acc": clean,
        "pgd_acc": robust_pgd,
        "pgd_steps": cfg.pgd.steps,
        "pgd_step_size": step,
        "autoattack_acc": robust,
        "autoattack_version": "standard",
        **sanity_flags(clean, robust_pgd, robust, cfg.masking_threshold),
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    run(cfg)
