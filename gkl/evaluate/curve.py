"""Accuracy against the perturbation budget for several runs (``scripts/robustness_curve.py``).

Each checkpoint is read as eval.py reads it (its run's config.yaml: architecture, data set,
normalisation, training threat model), so runs of different architectures can share a figure;
each curve is labelled by its run's name and marked at the budget it trained against. PGD (and,
optionally, custom AutoAttack) accuracy per budget, in percent, on the first ``n_examples`` test
images of the runs' (common) data set; ``eps = 0`` is the clean accuracy.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from gkl.attacks import ThreatModel
from gkl.config import compose_config
from gkl.data.build import build_datamodule
from gkl.evaluate.autoattack_runner import run_autoattack
from gkl.evaluate.protocol import check_protocol, count_correct, pgd_correct
from gkl.evaluate.robustness import check_pgd_steps
from gkl.evaluate.run import (
    build_model,
    dataset_name,
    read_source,
    resolve_config,
    run_threat_model,
    test_tensors,
)
from gkl.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


def run_label(source, ckpt: Path) -> str:
    """The run's name: its ``experiment_name`` / ``task_name`` and run directory (for a bare
    checkpoint: the file's name)."""
    cfg = source.run_config
    if cfg is None:
        return ckpt.stem
    name = cfg.get("experiment_name") or cfg.get("task_name") or "run"
    return f"{name} ({Path(source.run_config_path).parent.name})"


def robustness_curve(
    ckpts: Sequence[str | Path],
    eps: Sequence[str | float],
    *,
    labels: Sequence[str] | None = None,
    norm: str | None = None,
    n_examples: int = 1000,
    pgd_steps: int = 20,
    attacks: Sequence[str] = (),
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """``{"curves": {label: {"eps", "pgd", "autoattack", "trained_eps", ...}}, ...}``: accuracies
    in percent per budget for each checkpoint, all on the same test images. ``norm`` defaults
    to the first run's training norm; ``overrides`` are eval.yaml overrides applied to every run
    (e.g. ``data=... model.name=...`` for a bare weights file)."""
    check_pgd_steps(pgd_steps)
    if labels is not None and len(labels) != len(ckpts):
        raise ValueError(f"{len(labels)} labels for {len(ckpts)} checkpoints")
    curves: dict[str, Any] = {}
    data_key = None
    budgets: list[float] = []
    for number, ckpt in enumerate(ckpts):
        ckpt = Path(ckpt)
        cfg = compose_config("eval.yaml", [f"ckpt_path={ckpt}", "paths.output_dir=.", *overrides])
        source = read_source(cfg)
        trained = run_threat_model(source)
        if norm is None:
            norm = cfg.get("norm") or (trained.norm if trained else "Linf")
        if not budgets:
            budgets = [ThreatModel.parse(e, norm=norm).eps for e in eps]
        data_cfg, model_cfg = resolve_config(cfg, source)
        datamodule = build_datamodule(data_cfg)
        key = (dataset_name(datamodule), data_cfg.get("data_dir"))
        if data_key is None:
            data_key = key
            x, y = test_tensors(datamodule, n_examples)
        elif key != data_key:
            raise ValueError(
                f"{ckpt} was trained on {key[0]} ({key[1]}), the first run on {data_key[0]} "
                f"({data_key[1]}): one figure compares runs on the same test images"
            )
        model, _ = build_model(model_cfg, source, cfg.weights)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
        label = labels[number] if labels else run_label(source, ckpt)
        if label in curves:
            raise ValueError(f"two runs are labelled {label!r}: give --label for each")
        log.info("[%d/%d] %s: %s, %s", number + 1, len(ckpts), label, model_cfg.name, ckpt)
        pgd, aa = _accuracies(model, x, y, budgets, norm, pgd_steps, list(attacks), seed, cfg)
        curves[label] = {
            "checkpoint": str(ckpt),
            "architecture": model_cfg.name,
            "trained_eps": None if trained is None or trained.norm != norm else trained.eps,
            "eps": budgets,
            "pgd": pgd,
            "autoattack": aa if attacks else None,
        }
    return {
        "dataset": data_key[0],
        "n_examples": len(y),
        "norm": norm,
        "pgd_steps": pgd_steps,
        "autoattack_attacks": list(attacks),
        "unit": "percent",
        "curves": curves,
    }


def _accuracies(model, x, y, budgets, norm, steps, attacks, seed, cfg):
    """PGD and AutoAttack accuracy (percent) per budget; both the clean accuracy at eps = 0."""
    n, batch = len(y), cfg.batch_size
    check_protocol(model, x[:batch])
    pgd, aa = [], []
    for eps in budgets:
        start = time.perf_counter()
        if eps == 0:
            clean = 100 * count_correct(model, x, y, batch) / n
            pgd.append(clean)
            aa.append(clean)
        else:
            robust = pgd_correct(
                model,
                x,
                y,
                eps=eps,
                norm=norm,
                steps=steps,
                step_size=2.5 * eps / steps,
                restarts=1,
                loss="ce",
                batch_size=batch,
                seed=seed,
            )
            pgd.append(100 * robust / n)
            if attacks:
                result = run_autoattack(
                    model,
                    x,
                    y,
                    eps=eps,
                    norm=norm,
                    version="custom",
                    attacks=attacks,
                    batch_size=batch,
                    seed=seed,
                    check=False,
                )
                aa.append(100 * int(result.robust.sum()) / n)
        extra = f", {'+'.join(attacks)} {aa[-1]:.2f}%" if attacks else ""
        log.info(
            "  eps %.4g: PGD-%d %.2f%%%s (%.1f s)",
            eps,
            steps,
            pgd[-1],
            extra,
            time.perf_counter() - start,
        )
    return pgd, aa


def plot_curve(record: dict[str, Any], out: str | Path) -> Path:
    """The figure (accuracy in percent against eps, one colour per run, a dotted line at each
    run's training eps), written atomically as PNG to ``out``."""
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for label, c in record["curves"].items():
        line = ax.plot(c["eps"], c["pgd"], "o-", label=f"{label} PGD-{record['pgd_steps']}")[0]
        if c["autoattack"]:
            attacks = "+".join(record["autoattack_attacks"])
            ax.plot(
                c["eps"], c["autoattack"], "s--", color=line.get_color(), label=f"{label} {attacks}"
            )
        if c["trained_eps"] is not None:
            ax.axvline(c["trained_eps"], color=line.get_color(), linestyle=":", alpha=0.8)
            ax.annotate(
                f"trained at {c['trained_eps']:g}",
                (c["trained_eps"], 2),
                color=line.get_color(),
                fontsize=7,
                rotation=90,
                ha="right",
                va="bottom",
            )
    ax.set_xlabel(f"eps ({record['norm']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(f"{record['dataset']}: first {record['n_examples']} test images")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(out, buffer.getvalue())


def write_curve(record: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """The PNG at ``out`` and the numbers beside it (``out`` with ``.json``)."""
    out = Path(out)
    return plot_curve(record, out), atomic_write_json(out.with_suffix(".json"), record)
