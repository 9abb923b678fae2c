"""The GKL paper's tables filled with runs (:mod:`gkl.runs`), published numbers beside as anchors.

A cell is one configuration's mean ± sample std over seeds (``n=``): runs are grouped by their
whole resolved config minus the seed and paths (:func:`gkl.runs.group_runs`), so two runs of one
experiment with different ``loss.beta`` are two configurations, never one mean. Where a cell
holds several configurations, each is printed with the keys that tell them apart. The method of
a run comes from its loss (GKLLoss -> GKL, KDLoss -> KD, DKDLoss -> DKD, TradesKLLoss -> TRADES),
its row from ``experiment_name``; runs of other experiments (Fashion-MNIST, ...) are listed after
the tables by :func:`gkl.runs.runs_table`.

- KD cells are ``test/acc`` of the LAST epoch (gkl's result). mdistiller's tables, and so the
  paper's KD columns, report the best test epoch: the ``best-epoch (NOT_A_RESULT)`` columns give
  that number from ``best_test_epoch.NOT_A_RESULT.json``, for comparing like with like only.
- AT cells need an evaluation: ``eval.py ckpt_path=<run>/checkpoints/last.ckpt ...
  hydra.run.dir=<run>/eval`` writes ``<run>/eval/results.json`` (clean / AutoAttack). Cells from
  fewer than 10,000 images or a non-standard AutoAttack are marked ``*``.
- Anchors are published numbers (paper, mdistiller, RobustBench; docs/anchors), printed exactly
  as the source gives them (``about 60``); ``missing`` where the docs do not have the number.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gkl.runs import Run, RunGroup, differing_keys, group_runs, mean_std, runs_table

METHODS = {
    "gkl.losses.GKLLoss": "GKL",
    "gkl.losses.KDLoss": "KD",
    "gkl.losses.DKDLoss": "DKD",
    "gkl.losses.TradesKLLoss": "TRADES",
}
MISSING = "missing"
# experiment -> (row label, {method: anchor top-1 % as published}); mdistiller's tables and the
# paper as docs/anchors gives them; a method without a number there prints MISSING.
KD_CIFAR = {
    "cifar100_kd_res56_res20": ("resnet56 -> resnet20", {"KD": "70.66", "DKD": "71.97"}),
    "cifar100_kd_res110_res32": ("resnet110 -> resnet32", {}),
    "cifar100_kd": ("resnet32x4 -> resnet8x4", {"KD": "73.33", "DKD": "76.32"}),
    "cifar100_kd_wrn40_2_wrn16_2": ("wrn_40_2 -> wrn_16_2", {"KD": "74.92", "DKD": "76.23"}),
    "cifar100_kd_wrn40_2_wrn40_1": ("wrn_40_2 -> wrn_40_1", {}),
    "cifar100_kd_vgg13_vgg8": ("vgg13 -> vgg8", {"KD": "72.98", "DKD": "74.68"}),
    "cifar100_kd_res32x4_shuv1": ("resnet32x4 -> ShuffleV1", {}),
    "cifar100_kd_res32x4_shuv2": ("resnet32x4 -> ShuffleV2", {}),
    "cifar100_kd_wrn40_2_shuv1": ("wrn_40_2 -> ShuffleV1", {}),
    "cifar100_kd_vgg13_mv2": ("vgg13 -> MobileNetV2", {}),
    "cifar100_kd_res50_mv2": ("ResNet50 -> MobileNetV2", {}),
}
KD_IMAGENET = {
    "imagenet_kd": ("ResNet-34 -> ResNet-18", {"KD": "71.03", "DKD": "71.70", "GKL": "71.91"}),
    "imagenet_kd_r50_mv1": (
        "ResNet-50 -> MobileNetV1",
        {"KD": "70.50", "DKD": "72.05", "GKL": "72.92"},
    ),
}
# anchors: the authors' DKLv2/Imbalanced_KD-dkl README (ImageNet-LT test split).
KD_IMAGENET_LT = {
    "imagenet_lt_kd": ("ResNeXt-101-32x4d -> ResNet-18", {"GKL": "45.40"}),
    "imagenet_lt_kd_x101_r50": ("ResNeXt-101-32x4d -> ResNet-50", {"GKL": "49.40"}),
}
# experiment -> (data set, row label, anchor (clean, AutoAttack) as published or None, source)
AT_ROWS = {
    "cifar10_trades": ("CIFAR-10", "TRADES (authors' schedule)", None, ""),
    "cifar10_trades_awp": ("CIFAR-10", "TRADES-AWP (Wu et al.)", ("85.36", "56.17"), "RobustBench"),
    "cifar10_gkl_at": ("CIFAR-10", "GKL-AT", ("85.31", "57.09"), "paper"),
    "cifar10_gkl_at_autoaug": ("CIFAR-10", "GKL-AT + AutoAugment", None, ""),
    "cifar100_trades": (
        "CIFAR-100",
        "TRADES (authors' schedule)",
        ("about 60", "about 29"),
        "docs/anchors",
    ),
    "cifar100_gkl_at": ("CIFAR-100", "GKL-AT", ("65.76", "31.91"), "paper"),
    "cifar100_gkl_at_autoaug": ("CIFAR-100", "GKL-AT + AutoAugment", None, ""),
    "cifar10_gkl_at_gamma02": ("CIFAR-10", "GKL-AT gamma 0.2 (script's 2nd run)", None, ""),
    "cifar100_gkl_at_gamma04": ("CIFAR-100", "GKL-AT gamma 0.4 T 1 (script's 2nd run)", None, ""),
}
PAPER_EXPERIMENTS = {*KD_CIFAR, *KD_IMAGENET, *KD_IMAGENET_LT, *AT_ROWS}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def method(run: Run) -> str | None:
    loss = (run.config.get("loss") or {}).get("_target_")
    return METHODS.get(loss, loss)


def best_epoch_acc(run: Run) -> float | None:
    """``val/acc`` of ``best_test_epoch.NOT_A_RESULT.json`` (mdistiller's number, not a result)."""
    record = _read_json(run.path / "best_test_epoch.NOT_A_RESULT.json")
    return record.get("val/acc") if record else None


def evaluation(run: Run) -> dict[str, Any] | None:
    """The newest ``results.json`` under the run (``eval.py ... hydra.run.dir=<run>/eval``)."""
    found = sorted(run.path.rglob("results.json"), key=lambda p: p.stat().st_mtime)
    return _read_json(found[-1]) if found else None


def cell(groups: Sequence[RunGroup], value: Callable[[Run], float | None], mark: str = "") -> str:
    """``mean ± std (n=k)`` in % per configuration, '' when no run has a value; several
    configurations are each labelled with the keys that differ (``[loss.beta=4]``)."""
    keys = differing_keys(groups) if len(groups) > 1 else []
    parts = []
    for group in groups:
        values = [v for v in map(value, group.runs) if v is not None]
        if not values:
            continue
        label = ", ".join(f"{k}={group.hyperparameters.get(k)}" for k in keys)
        text = f"{mean_std(values)} (n={len(values)}){mark}"
        parts.append(f"{text} [{label}]" if label else text)
    return "; ".join(parts)


def _by_row(runs: Sequence[Run]) -> dict[tuple[str, str | None], list[RunGroup]]:
    by: dict[tuple[str, str | None], list[Run]] = defaultdict(list)
    for run in runs:
        by[run.config.get("experiment_name"), method(run)].append(run)
    return {key: group_runs(found) for key, found in by.items()}


def kd_table(title: str, rows: dict, runs: Sequence[Run]) -> list[str]:
    by = _by_row(runs)
    methods = ("KD", "DKD", "GKL")
    head = ["teacher -> student"]
    for m in methods:
        head += [f"{m} ours (last)", f"{m} ours best-epoch (NOT_A_RESULT)", f"{m} anchor"]
    lines = [f"### {title} (top-1 %)", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for experiment, (label, anchors) in rows.items():
        cells = [label]
        for m in methods:
            groups = by.get((experiment, m), [])
            cells += [
                cell(groups, lambda r: r.metrics.get("test/acc")),
                cell(groups, best_epoch_acc),
                anchors.get(m, MISSING),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def at_table(runs: Sequence[Run]) -> list[str]:
    by: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by[run.config.get("experiment_name")].append(run)
    head = ["data", "method", "clean ours", "AutoAttack ours"]
    head += ["clean anchor", "AA anchor", "source"]
    lines = [
        "### Adversarial training, WRN-34-10, L-inf 8/255 (accuracy %)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for experiment, (data, label, anchor, source) in AT_ROWS.items():
        found = by.get(experiment, [])
        evals = [e for e in map(evaluation, found) if e]
        nonstandard = any(
            e.get("n_examples", 0) < 10_000 or e.get("autoattack_version") != "standard"
            for e in evals
        )
        mark = "*" if nonstandard else ""
        groups = group_runs(found)
        clean = cell(groups, lambda r: (evaluation(r) or {}).get("clean_acc"), mark)
        robust = cell(groups, lambda r: (evaluation(r) or {}).get("autoattack_acc"), mark)
        a_clean, a_robust = anchor if anchor else (MISSING, MISSING)
        lines.append(
            f"| {data} | {label} | {clean} | {robust} | {a_clean} | {a_robust} | {source} |"
        )
    lines += ["", "`*`: fewer than 10,000 test images or a non-standard AutoAttack."]
    return lines


def paper_tables(runs: Sequence[Run]) -> str:
    """The KD (CIFAR-100, ImageNet) and AT tables, then every other experiment's runs."""
    lines = [
        *kd_table("KD, CIFAR-100", KD_CIFAR, runs),
        "",
        *kd_table("KD, ImageNet", KD_IMAGENET, runs),
        "",
        *kd_table("KD, ImageNet-LT (test split)", KD_IMAGENET_LT, runs),
        "",
        *at_table(runs),
        "",
        "ours: mean ± std over seeds (n = seeds found) of one configuration, last epoch unless "
        "marked NOT_A_RESULT; anchor: published numbers (mdistiller / the paper / RobustBench) as "
        f"given, not ours; {MISSING}: not in docs/anchors.",
    ]
    others = [r for r in runs if r.config.get("experiment_name") not in PAPER_EXPERIMENTS]
    if others:
        lines += ["", "### Other runs (not in the paper's tables)", "", runs_table(others)]
    return "\n".join(lines)
