"""Offline distillation demo on Fashion-MNIST: teacher CNN -> 25k-parameter MLP student.

Trains the teacher first when ``teachers/fmnist_cnn.pth`` is missing, then trains the student with
CE only (no teacher), Hinton KD, DKD and GKL, and prints last-epoch test accuracy per method.

    python scripts/demo_fmnist.py                      # 1 seed, about 15 min on 2 CPU cores
    python scripts/demo_fmnist.py --seeds 0 1 2        # the README's results table
    python scripts/demo_fmnist.py --methods kd gkl -- trainer.max_epochs=5   # extra overrides
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "teachers" / "fmnist_cnn.pth"
METHODS = {
    # The student alone, same data and schedule.
    "ce": ["task=classify", "teacher=none", "~task.cache_teacher_outputs"],
    "kd": ["loss=kd"],
    "dkd": ["loss=dkd"],
    "gkl": ["loss=gkl_fmnist"],
}


def train(overrides: list[str], run_dir: Path) -> dict:
    """Run ``train.py`` with ``overrides`` into ``run_dir`` and return its metrics.json."""
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():  # finished earlier: reuse, so an interrupted demo resumes
        return json.loads(metrics_file.read_text())
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        f"hydra.run.dir={run_dir}",
        "~callbacks.progress_bar",
    ]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(metrics_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "demo_fmnist")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the students")
    args = parser.parse_args()

    start = time.time()
    teacher_metrics = args.out / "teacher" / "metrics.json"
    if not TEACHER.exists():
        print(f"no teacher at {TEACHER}: training it first (+experiment=fmnist_teacher)")
        train(["+experiment=fmnist_teacher", "seed=0"], args.out / "teacher")
    results: dict[str, list[float]] = {}
    for method in args.methods:
        for seed in args.seeds:
            overrides = ["+experiment=fmnist_kd", *METHODS[method], f"seed={seed}", *args.overrides]
            record = train(overrides, args.out / method / f"seed{seed}")
            results.setdefault(method, []).append(100 * record["metrics"]["test/acc"])

    print(
        f"\nFashion-MNIST, student fmnist_mlp (25,450 params), seeds {args.seeds}, "
        f"{time.time() - start:.0f} s"
    )
    if teacher_metrics.exists():
        teacher_acc = json.loads(teacher_metrics.read_text())["metrics"]["test/acc"]
        print(f"teacher fmnist_cnn (104,426 params): test accuracy {100 * teacher_acc:.2f}%")
    else:
        print(f"teacher: {TEACHER} (trained outside this demo; see its run's metrics.json)")
    print("| method | test acc % (mean) | std | per seed |")
    print("|---|---|---|---|")
    for method, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        per_seed = ", ".join(f"{a:.2f}" for a in accs)
        print(f"| {method} | {statistics.mean(accs):.2f} | {spread:.2f} | {per_seed} |")


if __name__ == "__main__":
    main()
