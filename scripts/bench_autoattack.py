"""Overhead of eval.py's AutoAttack over pyautoattack called directly, same model, data and seed.

``eval.py`` (backend gkl) runs :func:`gkl.evaluate.run_autoattack` with a ``state_path``: one
attack and one batch of still-robust points at a time, its state file rewritten after every batch
so a killed evaluation resumes. The baseline is one ``AutoAttack(...).run_standard_evaluation``
call. Rounds alternate the two paths so machine noise hits both; both robust accuracies are
printed and must agree.

    python scripts/bench_autoattack.py \
        --ckpt logs/compare_fmnist_at/trades/seed0/checkpoints/last.ckpt
    python scripts/bench_autoattack.py --ckpt <file> --attacks apgd-ce apgd-t --n-examples 500 \
        -- data=fmnist model.name=fmnist_cnn_at

Everything after ``--`` is a Hydra override of ``conf/eval.yaml`` (default: Fashion-MNIST,
fmnist_cnn_at).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pyautoattack import AutoAttack

from gkl.attacks import ThreatModel
from gkl.config import compose_config
from gkl.data.build import build_datamodule
from gkl.evaluate import run_autoattack
from gkl.evaluate.run import load_model, test_tensors


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    overrides = ["data=fmnist", "model.name=fmnist_cnn_at"]
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of the configured architecture")
    parser.add_argument("--eps", default="0.1")
    parser.add_argument("--norm", default="Linf")
    parser.add_argument("--attacks", nargs="+", default=["apgd-ce", "apgd-t"])
    parser.add_argument("--n-examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args(argv), overrides


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    eps = ThreatModel.parse(args.eps, args.norm).eps
    cfg = compose_config("eval.yaml", [f"ckpt_path={args.ckpt}", "paths.output_dir=.", *overrides])
    x, y = test_tensors(build_datamodule(cfg.data), args.n_examples)
    model = load_model(cfg.model, args.ckpt, cfg.weights)
    common = {"eps": eps, "norm": args.norm, "seed": 0}

    def direct() -> float:
        adversary = AutoAttack(model, attacks=args.attacks, version="custom", **common)
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=args.batch_size)
        return (y_adv == y).float().mean().item()

    def ours() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_autoattack(
                model,
                x,
                y,
                version="custom",
                attacks=args.attacks,
                batch_size=args.batch_size,
                state_path=Path(tmp) / "autoattack_state.json",
                **common,
            )
        return result.robust_accuracy

    times: dict[str, list[float]] = {"direct": [], "ours": []}
    accuracy: dict[str, set[float]] = {"direct": set(), "ours": set()}
    for _ in range(args.rounds):
        for name, fn in (("direct", direct), ("ours", ours)):
            start = time.perf_counter()
            accuracy[name].add(fn())
            times[name].append(time.perf_counter() - start)
    direct_s, ours_s = statistics.median(times["direct"]), statistics.median(times["ours"])
    print(
        f"{cfg.model.name} on {len(y)} test images, {args.norm} eps {args.eps}, "
        f"{'+'.join(args.attacks)}, batch {args.batch_size}, threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds"
    )
    print("| path | median wall (s) | robust acc |")
    print("|---|---|---|")
    for label, seconds, name in (
        ("pyautoattack run_standard_evaluation", direct_s, "direct"),
        ("eval.py's run_autoattack (resumable)", ours_s, "ours"),
    ):
        print(f"| {label} | {seconds:.1f} | {sorted(accuracy[name])} |")
    print(f"overhead: {100 * (ours_s / direct_s - 1):+.1f}%")
    if accuracy["direct"] != accuracy["ours"]:
        raise SystemExit("robust accuracies differ between the two paths")


if __name__ == "__main__":
    main(sys.argv[1:])
