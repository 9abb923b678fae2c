"""Collect training runs into the GKL paper's table layout, with the paper's numbers as anchors.

Scans the given directories for training runs (a ``metrics.json`` beside the run's
``config.yaml``, as ``train.py`` writes them; smoke runs write ``metrics.smoke.json`` and are never
collected) and prints Markdown tables: KD on CIFAR-100 (11 pairs), KD on ImageNet, adversarial
training on CIFAR-10/100 (clean / AutoAttack). A cell is mean ± sample std over the seeds found
(``n=`` seeds); it is empty where no run exists. The method of a run comes from its loss
(GKLLoss -> GKL, KDLoss -> KD, DKDLoss -> DKD, TradesKLLoss -> TRADES), its row from
``experiment_name``.

- KD cells are ``test/acc`` of the LAST epoch (gkl's result). mdistiller's tables, and so the
  paper's KD columns, report the best test epoch: the ``best-epoch (NOT_A_RESULT)`` columns give
  that number from ``best_test_epoch.NOT_A_RESULT.json``, for comparing like with like only.
- AT cells need an evaluation: ``eval.py ckpt_path=<run>/checkpoints/last.ckpt ...
  hydra.run.dir=<run>/eval`` writes ``<run>/eval/results.json`` (clean / AutoAttack). Cells from
  fewer than 10,000 images or a non-standard AutoAttack are marked ``*``.
- ``anchor`` columns are published numbers (paper, mdistiller, RobustBench), never ours.

    python scripts/paper_table.py logs/            # every run under logs/
    python scripts/paper_table.py logs/ --json table.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from gkl.io import atomic_write_json

METHODS = {
    "gkl.losses.GKLLoss": "GKL",
    "gkl.losses.KDLoss": "KD",
    "gkl.losses.DKDLoss": "DKD",
    "gkl.losses.TradesKLLoss": "TRADES",
}
# experiment -> (row label, {method: anchor top-1 %}); anchors: mdistiller's tables / the paper.
KD_CIFAR = {
    "cifar100_kd_res56_res20": ("resnet56 -> resnet20", {"KD": 70.66, "DKD": 71.97}),
    "cifar100_kd_res110_res32": ("resnet110 -> resnet32", {}),
    "cifar100_kd": ("resnet32x4 -> resnet8x4", {"KD": 73.33, "DKD": 76.32}),
    "cifar100_kd_wrn40_2_wrn16_2": ("wrn_40_2 -> wrn_16_2", {"KD": 74.92, "DKD": 76.23}),
    "cifar100_kd_wrn40_2_wrn40_1": ("wrn_40_2 -> wrn_40_1", {}),
    "cifar100_kd_vgg13_vgg8": ("vgg13 -> vgg8", {"KD": 72.98, "DKD": 74.68}),
    "cifar100_kd_res32x4_shuv1": ("resnet32x4 -> ShuffleV1", {}),
    "cifar100_kd_res32x4_shuv2": ("resnet32x4 -> ShuffleV2", {}),
    "cifar100_kd_wrn40_2_shuv1": ("wrn_40_2 -> ShuffleV1", {}),
    "cifar100_kd_vgg13_mv2": ("vgg13 -> MobileNetV2", {}),
    "cifar100_kd_res50_mv2": ("ResNet50 -> MobileNetV2", {}),
}
KD_IMAGENET = {
    "imagenet_kd": ("ResNet-34 -> ResNet-18", {"KD": 71.03, "DKD": 71.70, "GKL": 71.91}),
    "imagenet_kd_r50_mv1": ("ResNet-50 -> MobileNetV1", {"KD": 70.50, "DKD": 72.05, "GKL": 72.92}),
}
# anchors: the authors' DKLv2/Imbalanced_KD-dkl README (ImageNet-LT test split).
KD_IMAGENET_LT = {
    "imagenet_lt_kd": ("ResNeXt-101-32x4d -> ResNet-18", {"GKL": 45.40}),
    "imagenet_lt_kd_x101_r50": ("ResNeXt-101-32x4d -> ResNet-50", {"GKL": 49.40}),
}
# experiment -> (data set, row label, anchor (clean, AutoAttack) % or None, anchor source)
AT_ROWS = {
    "cifar10_trades": ("CIFAR-10", "TRADES (authors' schedule)", None, ""),
    "cifar10_trades_awp": ("CIFAR-10", "TRADES-AWP (Wu et al.)", (85.36, 56.17), "RobustBench"),
    "cifar10_gkl_at": ("CIFAR-10", "GKL-AT", (85.31, 57.09), "paper"),
    "cifar10_gkl_at_autoaug": ("CIFAR-10", "GKL-AT + AutoAugment", None, ""),
    "cifar100_trades": ("CIFAR-100", "TRADES (authors' schedule)", (60.0, 29.0), "about, anchors"),
    "cifar100_gkl_at": ("CIFAR-100", "GKL-AT", (65.76, 31.91), "paper"),
    "cifar100_gkl_at_autoaug": ("CIFAR-100", "GKL-AT + AutoAugment", None, ""),
    "cifar10_gkl_at_gamma02": ("CIFAR-10", "GKL-AT gamma 0.2 (script's 2nd run)", None, ""),
    "cifar100_gkl_at_gamma04": ("CIFAR-100", "GKL-AT gamma 0.4 T 1 (script's 2nd run)", None, ""),
}


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(roots: list[Path]) -> list[dict[str, Any]]:
    """One record per training run found under ``roots``."""
    runs = []
    for root in roots:
        for metrics_file in sorted(root.rglob("metrics.json")):
            run_dir = metrics_file.parent
            config_file = run_dir / "config.yaml"
            if not config_file.is_file():
                continue
            config = yaml.safe_load(config_file.read_text())
            record = json.loads(metrics_file.read_text())
            loss = (config.get("loss") or {}).get("_target_")
            best = read_json(run_dir / "best_test_epoch.NOT_A_RESULT.json")
            evals = [read_json(p) for p in sorted(run_dir.rglob("results.json"))]
            runs.append(
                {
                    "run_dir": str(run_dir),
                    "experiment": config.get("experiment_name"),
                    "method": METHODS.get(loss, loss),
                    "seed": record.get("seed"),
                    "test_acc": record.get("metrics", {}).get("test/acc"),
                    "best_test_acc_NOT_A_RESULT": best.get("val/acc") if best else None,
                    "eval": evals[-1] if evals else None,
                }
            )
    return runs


def cell(values: list[float], mark: str = "") -> str:
    """``mean ± std (n=k)`` in %, or '' when there is nothing."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return ""
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} (n={len(values)}){mark}"


def kd_table(title: str, rows: dict, runs: list[dict]) -> list[str]:
    by = defaultdict(list)
    for run in runs:
        by[run["experiment"], run["method"]].append(run)
    methods = ("KD", "DKD", "GKL")
    head = ["teacher -> student"]
    for m in methods:
        head += [f"{m} ours (last)", f"{m} ours best-epoch (NOT_A_RESULT)", f"{m} anchor"]
    lines = [f"### {title} (top-1 %)", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for experiment, (label, anchors) in rows.items():
        cells = [label]
        for m in methods:
            found = by.get((experiment, m), [])
            cells += [
                cell([r["test_acc"] for r in found]),
                cell([r["best_test_acc_NOT_A_RESULT"] for r in found]),
                f"{anchors[m]:.2f}" if m in anchors else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def at_table(runs: list[dict]) -> list[str]:
    by = defaultdict(list)
    for run in runs:
        by[run["experiment"]].append(run)
    head = [
        "data",
        "method",
        "clean ours",
        "AutoAttack ours",
        "clean anchor",
        "AA anchor",
        "source",
    ]
    lines = [
        "### Adversarial training, WRN-34-10, L-inf 8/255 (accuracy %)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for experiment, (data, label, anchor, source) in AT_ROWS.items():
        evals = [r["eval"] for r in by.get(experiment, []) if r["eval"]]
        nonstandard = any(
            e.get("n_examples", 0) < 10_000 or e.get("autoattack_version") != "standard"
            for e in evals
        )
        mark = "*" if nonstandard else ""
        clean = cell([e.get("clean_acc") for e in evals], mark)
        robust = cell([e.get("autoattack_acc") for e in evals], mark)
        a_clean, a_robust = (f"{anchor[0]:.2f}", f"{anchor[1]:.2f}") if anchor else ("", "")
        lines.append(
            f"| {data} | {label} | {clean} | {robust} | {a_clean} | {a_robust} | {source} |"
        )
    lines += ["", "`*`: fewer than 10,000 test images or a non-standard AutoAttack."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", type=Path, nargs="+", help="directories holding train.py runs")
    parser.add_argument("--json", type=Path, help="also write the collected runs here")
    args = parser.parse_args()
    runs = collect(args.roots)
    lines = [
        *kd_table("KD, CIFAR-100", KD_CIFAR, runs),
        "",
        *kd_table("KD, ImageNet", KD_IMAGENET, runs),
        "",
        *kd_table("KD, ImageNet-LT", KD_IMAGENET_LT, runs),
        "",
        *at_table(runs),
        "",
        "ours: mean ± std over seeds (n = seeds found), last epoch unless marked NOT_A_RESULT; "
        "anchor: published numbers (mdistiller / the paper / RobustBench), not ours.",
    ]
    print("\n".join(lines))
    if args.json:
        atomic_write_json(args.json, runs)


if __name__ == "__main__":
    main()
