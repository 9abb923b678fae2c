"""Accuracy against the perturbation budget for one or more checkpoints (PGD, optional AutoAttack).

    python scripts/robustness_curve.py \
        --ckpt logs/.../fmnist_trades/checkpoints/last.ckpt --label TRADES \
        --ckpt logs/.../fmnist_gkl_at/checkpoints/last.ckpt --label GKL-AT \
        --eps 0 0.05 0.1 0.15 0.2 --n-examples 1000 --autoattack apgd-ce,apgd-t \
        --out docs/figures/fmnist_robustness.png -- data=fmnist model.name=fmnist_cnn_at

Everything after ``--`` is a Hydra override of ``conf/eval.yaml`` (data set, architecture, norm,
batch size, ``weights``). ``eps = 0`` is the clean accuracy. Writes the PNG and, next to it, a
JSON file with the numbers. Accuracies are on the first ``--n-examples`` test images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure

from gkl.attacks import ThreatModel
from gkl.config import compose_config
from gkl.data.build import build_datamodule
from gkl.evaluate import autoattack_accuracy, clean_accuracy, pgd_accuracy
from gkl.evaluate.run import load_model, test_tensors
from gkl.io import atomic_write_json, atomic_write_with


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeatable)")
    parser.add_argument("--label", action="append", help="legend label per --ckpt")
    parser.add_argument("--eps", nargs="+", required=True, help="budgets, e.g. 0 2/255 8/255")
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument(
        "--autoattack", default="", help="comma-separated AutoAttack attacks, e.g. apgd-ce,apgd-t"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("robustness_curve.png"))
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.ckpt):
        parser.error(f"{len(args.label)} --label for {len(args.ckpt)} --ckpt")
    return args, overrides


def curve(args: argparse.Namespace, overrides: list[str]) -> dict:
    """``{label: {"eps": [...], "pgd": [...], "autoattack": [...]}}`` on the same test images."""
    cfg = compose_config(
        "eval.yaml",
        [f"ckpt_path={args.ckpt[0]}", f"paths.output_dir={args.out.parent}", *overrides],
    )
    budgets = [ThreatModel.parse(e, norm=cfg.norm).eps for e in args.eps]
    x, y = test_tensors(build_datamodule(cfg.data), args.n_examples)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    attacks = [a for a in args.autoattack.split(",") if a]
    results = {}
    for ckpt, label in zip(args.ckpt, args.label or args.ckpt, strict=True):
        model = load_model(cfg.model, ckpt, cfg.weights).to(device)
        pgd, aa = accuracies(model, x, y, budgets, attacks, args, cfg)
        results[label] = {
            "checkpoint": str(ckpt),
            "eps": budgets,
            "pgd": pgd,
            "autoattack": aa if attacks else None,
        }
    return {
        "n_examples": len(y),
        "norm": cfg.norm,
        "pgd_steps": args.pgd_steps,
        "autoattack_attacks": attacks,
        "curves": results,
    }


def accuracies(model, x, y, budgets, attacks, args, cfg) -> tuple[list[float], list[float]]:
    """PGD and AutoAttack accuracy per budget (both are the clean accuracy at eps = 0)."""
    pgd, aa = [], []
    for eps in budgets:
        if eps == 0:
            clean = clean_accuracy(model, x, y, cfg.batch_size)
            pgd.append(clean)
            aa.append(clean)
            continue
        common = {"eps": eps, "norm": cfg.norm, "batch_size": cfg.batch_size, "seed": args.seed}
        pgd.append(pgd_accuracy(model, x, y, steps=args.pgd_steps, **common))
        if attacks:
            aa.append(autoattack_accuracy(model, x, y, version="custom", attacks=attacks, **common))
        print(f"eps={eps:.4g}: PGD-{args.pgd_steps} {pgd[-1]:.4f}", flush=True)
    return pgd, aa


def plot(record: dict, out: Path) -> None:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for label, c in record["curves"].items():
        line = ax.plot(c["eps"], c["pgd"], "o-", label=f"{label} PGD-{record['pgd_steps']}")[0]
        if c["autoattack"]:
            attacks = "+".join(record["autoattack_attacks"])
            ax.plot(
                c["eps"], c["autoattack"], "s--", color=line.get_color(), label=f"{label} {attacks}"
            )
    ax.set_xlabel(f"eps ({record['norm']})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"first {record['n_examples']} test images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(out, lambda f: fig.savefig(f, format=out.suffix[1:] or "png", dpi=120))


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = curve(args, overrides)
    plot(record, args.out)
    atomic_write_json(args.out.with_suffix(".json"), record)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
