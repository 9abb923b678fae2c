"""TRADES versus GKL-AT on Fashion-MNIST (real, offline), L-inf eps 0.1, same training budget.

Methods (one schedule for all: the baseline differs from GKL-AT in the loss only):
``trades`` (fmnist_trades), ``gkl_at`` (fmnist_gkl_at: the TRADES-KL ascent of the authors'
CIFAR-10 script) and ``gkl_at_ascent`` (fmnist_gkl_at_ascent: the GKL alpha 1 beta 1 gamma 1
class-prior ascent of their CIFAR-100 script).

For each method and seed: ``python train.py +experiment=fmnist_<method> seed=<seed>`` (last
epoch), then, on the trained network in eval mode: clean accuracy on the full test set, PGD-20
(step 2.5 * eps / 20, one random start) on the first ``--pgd-examples`` test images, and
AutoAttack APGD-CE + APGD-T (pyautoattack, standard settings of those two attacks) on the first
``--aa-examples``. Each run writes ``metrics.json`` (training) and ``robustness.json`` (this
evaluation) into ``<out>/<method>/seed<seed>``; finished parts are reused, so an interrupted
comparison resumes. The table covers every finished run of the requested methods and seeds.

    python scripts/compare_fmnist_at.py --seeds 0 1 2                # the README's table
    python scripts/compare_fmnist_at.py --methods trades --seeds 0 1 2 &   # one method per core
    python scripts/compare_fmnist_at.py --methods gkl_at --seeds 0 1 2 -- trainer.max_epochs=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gkl.config import compose_config
from gkl.data.build import build_datamodule
from gkl.evaluate import autoattack_accuracy, clean_accuracy, pgd_accuracy
from gkl.evaluate.run import load_model, test_tensors
from gkl.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "trades": "fmnist_trades",
    "gkl_at": "fmnist_gkl_at",
    "gkl_at_ascent": "fmnist_gkl_at_ascent",
}
EPS = 0.1
PGD_STEPS = 20
AA_ATTACKS = ["apgd-ce", "apgd-t"]


def train(experiment: str, seed: int, overrides: list[str], run_dir: Path) -> dict:
    """``train.py +experiment=<experiment> seed=<seed>`` into ``run_dir``; its metrics.json."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            f"+experiment={experiment}",
            f"seed={seed}",
            *overrides,
            f"hydra.run.dir={run_dir}",
            "~callbacks.progress_bar",
        ]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(metrics_file.read_text())


def evaluate_run(run_dir: Path, args: argparse.Namespace) -> dict:
    """Clean (full test set), PGD-20 and APGD-CE + APGD-T accuracies of ``run_dir``'s last.ckpt."""
    result_file = run_dir / "robustness.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    trained_steps = json.loads((run_dir / "metrics.json").read_text())["global_step"]
    saved_steps = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    if saved_steps != trained_steps:
        raise RuntimeError(
            f"{ckpt} holds step {saved_steps}, not the last one ({trained_steps}); train again"
        )
    cfg = compose_config(
        "eval.yaml",
        [
            "data=fmnist",
            "model.name=fmnist_cnn_at",
            f"ckpt_path={ckpt}",
            f"paths.output_dir={run_dir}",
        ],
    )
    x, y = test_tensors(build_datamodule(cfg.data), 10_000)
    model = load_model(cfg.model, ckpt, cfg.weights)
    common = {"eps": EPS, "norm": "Linf", "batch_size": 500, "seed": 0}
    start = time.time()
    record = {
        "checkpoint": str(ckpt),
        "eps": EPS,
        "clean_acc": clean_accuracy(model, x, y, 500),
        "clean_examples": len(y),
        "pgd_acc": pgd_accuracy(
            model, x[: args.pgd_examples], y[: args.pgd_examples], steps=PGD_STEPS, **common
        ),
        "pgd_steps": PGD_STEPS,
        "pgd_examples": min(args.pgd_examples, len(y)),
        "autoattack_acc": autoattack_accuracy(
            model,
            x[: args.aa_examples],
            y[: args.aa_examples],
            version="custom",
            attacks=AA_ATTACKS,
            state_path=run_dir / "autoattack_state.json",
            **common,
        ),
        "autoattack_attacks": AA_ATTACKS,
        "autoattack_examples": min(args.aa_examples, len(y)),
    }
    record["eval_seconds"] = round(time.time() - start, 1)
    atomic_write_json(result_file, record)
    return record


def report(args: argparse.Namespace) -> None:
    """Markdown table: mean ± std over the finished seeds, then the per-seed numbers."""
    keys = [("clean_acc", "clean"), ("pgd_acc", "PGD-20"), ("autoattack_acc", "APGD-CE+T")]
    print(f"\nFashion-MNIST, fmnist_cnn_at, L-inf eps {EPS}, last epoch, accuracy %")
    print("| method | seeds | " + " | ".join(label for _, label in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    rows = []
    for method in args.methods:
        records = []
        for seed in args.seeds:
            path = args.out / method / f"seed{seed}" / "robustness.json"
            if path.exists():
                records.append((seed, json.loads(path.read_text())))
        if not records:
            continue
        cells = []
        for key, _ in keys:
            values = [100 * r[key] for _, r in records]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.2f}{spread}")
        seeds = ",".join(str(s) for s, _ in records)
        print(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
        rows += [(method, s, r) for s, r in records]
    print("\n| method | seed | " + " | ".join(label for _, label in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for method, seed, r in rows:
        print(f"| {method} | {seed} | " + " | ".join(f"{100 * r[k]:.2f}" for k, _ in keys) + " |")
    if rows:
        r = rows[0][2]
        print(
            f"\nclean: {r['clean_examples']} test images; PGD-{r['pgd_steps']}: first "
            f"{r['pgd_examples']}; {'+'.join(r['autoattack_attacks'])}: first "
            f"{r['autoattack_examples']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pgd-examples", type=int, default=10_000)
    parser.add_argument("--aa-examples", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "compare_fmnist_at")
    parser.add_argument("--report-only", action="store_true", help="print the table, run nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for train.py")
    args = parser.parse_args()
    torch.manual_seed(0)
    if not args.report_only:
        for seed in args.seeds:
            for method in args.methods:
                run_dir = args.out / method / f"seed{seed}"
                start = time.time()
                metrics = train(METHODS[method], seed, args.overrides, run_dir)
                record = evaluate_run(run_dir, args)
                test_acc = metrics["metrics"]["test/acc"]
                print(
                    f"{method} seed {seed}: test acc (train.py) {test_acc:.4f}"
                    f" | clean {record['clean_acc']:.4f} | PGD-{PGD_STEPS} {record['pgd_acc']:.4f}"
                    f" | {'+'.join(AA_ATTACKS)} {record['autoattack_acc']:.4f}"
                    f" | {time.time() - start:.0f} s",
                    flush=True,
                )
    report(args)


if __name__ == "__main__":
    main()
