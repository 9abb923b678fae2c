"""Accuracy (%) against the perturbation budget for one or more runs (PGD, optional AutoAttack).

    python scripts/robustness_curve.py \
        --ckpt logs/.../fmnist_trades/runs/<time>/checkpoints/last.ckpt \
        --ckpt logs/.../fmnist_gkl_at/runs/<time>/checkpoints/last.ckpt \
        --eps 0 0.05 0.1 0.15 0.2 --n-examples 1000 --autoattack apgd-ce,apgd-t \
        --out docs/figures/fmnist_robustness.png

Each checkpoint is read as eval.py reads it: architecture, data set, normalisation and training
eps come from its run's config.yaml (runs of different architectures are fine; they must share
the data set). Curves are labelled by run name (``--label`` to rename) and marked at the eps the
run trained against; progress is printed per run and budget. Everything after ``--`` is a Hydra
override of ``conf/eval.yaml`` for every run (``data=... model.name=...`` for a bare weights
file). Writes the PNG and, next to it, a JSON file with the numbers (``gkl.evaluate.curve``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gkl.evaluate.curve import robustness_curve, write_curve


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint (repeatable)")
    parser.add_argument("--label", action="append", help="legend label per --ckpt")
    parser.add_argument("--eps", nargs="+", required=True, help="budgets, e.g. 0 2/255 8/255")
    parser.add_argument("--norm", default=None, help="Linf | L2 (default: the first run's)")
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


def main(argv: list[str]) -> dict:
    args, overrides = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stdout, force=True
    )
    record = robustness_curve(
        args.ckpt,
        args.eps,
        labels=args.label,
        norm=args.norm,
        n_examples=args.n_examples,
        pgd_steps=args.pgd_steps,
        attacks=[a for a in args.autoattack.split(",") if a],
        seed=args.seed,
        overrides=overrides,
    )
    png, numbers = write_curve(record, args.out)
    print(f"wrote {png} and {numbers}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
