"""Fashion-MNIST distillation demo: CNN teacher -> wide MLP student on 10,000 labelled images.

Trains the teacher (``+experiment=fmnist_teacher``) unless ``<out>/teachers/fmnist_cnn.pth``
exists, then the student with CE only, Hinton KD, DKD and GKL (``+experiment=fmnist_kd``), two
runs at a time on one thread each. Shows one progress line per run (epoch, validation accuracy,
ETA), then a table of last-epoch test accuracy, a PNG of the validation-accuracy curves and the
run directories. Everything trained is reused: rerunning skips finished runs and resumes an
interrupted one from its last checkpoint. Each run's terminal output (errors included) is in its
``console.log``; its full log, library warnings and Lightning's messages included, in ``train.log``.

    python scripts/demo_fmnist.py                    # 1 seed
    python scripts/demo_fmnist.py --seeds 0 1 2      # the README's table (mean and spread)
    python scripts/demo_fmnist.py --methods kd gkl -- trainer.max_epochs=5   # student overrides
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # gkl from this checkout

from gkl.tasks.progress import PROGRESS_FILE, read_progress  # noqa: E402

TEACHER_NAME = "fmnist_cnn"
METHODS = {
    # The student alone: plain cross-entropy, same data and schedule, no teacher.
    "ce": ["+baseline=ce"],
    "kd": ["loss=kd"],
    "dkd": ["loss=dkd"],
    "gkl": ["loss=gkl_fmnist"],
}
CHECKPOINTS = ("last.ckpt", "last-step.ckpt")
# A finished run's record: metrics.json, or metrics.smoke.json for a smoke-level run (a tiny
# subset, as the tests use), which train.py marks NOT_A_RESULT.
RESULT_FILES = ("metrics.json", "metrics.smoke.json")
# The demo's own progress callback instead of the rich bar (the runs' output goes to a file).
QUIET = ["~callbacks.progress_bar", "+trainer.enable_progress_bar=false"]


@dataclass
class Run:
    """One ``train.py`` run of the demo, in ``run_dir``."""

    name: str
    run_dir: Path
    overrides: list[str]
    needs_teacher: bool
    done_files: tuple[Path, ...]
    method: str | None = None  # students: a key of METHODS
    seed: int = 0
    process: subprocess.Popen | None = None
    status: str = "waiting"
    log_file: object = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        """Finished: the teacher's exported weights, a student's metrics record."""
        return any(path.is_file() for path in self.done_files)

    def resume_checkpoint(self) -> Path | None:
        """The newest checkpoint an interrupted run left (epoch end or mid-epoch)."""
        found = [self.run_dir / "checkpoints" / n for n in CHECKPOINTS]
        found = [p for p in found if p.is_file()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None

    def command(self) -> list[str]:
        command = [sys.executable, str(ROOT / "train.py"), *self.overrides]
        command += [f"hydra.run.dir={self.run_dir}", *QUIET]
        command += [
            "+callbacks.demo_progress._target_=gkl.tasks.progress.ProgressFile",
            f"+callbacks.demo_progress.path={self.run_dir / PROGRESS_FILE}",
        ]
        checkpoint = self.resume_checkpoint()
        if checkpoint is not None:
            command.append(f"ckpt_path={checkpoint}")
        return command

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.resume_checkpoint()
        self.status = f"resumed from {checkpoint.name}" if checkpoint else "running"
        self.log_file = (self.run_dir / "console.log").open("a")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def poll(self) -> int | None:
        code = self.process.poll() if self.process else None
        if code is not None:
            self.log_file.close()
            self.process = None
            self.status = "done" if code == 0 and self.done else f"FAILED (exit {code})"
        return code

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait()
            self.log_file.close()
            self.process = None
            self.status = "interrupted"


def progress_line(run: Run) -> str:
    """``name  epoch e/N  val acc x%  ETA m:ss  status`` from the run's progress file."""
    record = read_progress(run.run_dir / PROGRESS_FILE)
    if record is None:
        return f"{run.name:<12} {run.status}"
    epoch, total = record["epoch"], record["max_epochs"]
    history = record["history"]
    acc = (
        f"val acc {100 * history[-1]['val/acc']:.2f}%"
        if history and "val/acc" in history[-1]
        else ""
    )
    per_epoch = record.get("seconds_per_epoch")
    eta = ""
    if run.process is not None and per_epoch:
        left = per_epoch * (total - epoch)
        eta = f"ETA {int(left // 60)}:{int(left % 60):02d}"
    return f"{run.name:<12} epoch {epoch:>3}/{total:<3} {acc:<17} {eta:<9} {run.status}"


class Display:
    """Live lines on a terminal (rich); otherwise a printed line per run every few epochs."""

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self.live = None
        self.printed: dict[str, tuple[int, str]] = {}
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(), refresh_per_second=2, transient=False)
            self.live.start()

    def update(self) -> None:
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text("\n".join(progress_line(r) for r in self.runs)))
            return
        for run in self.runs:
            record = read_progress(run.run_dir / PROGRESS_FILE)
            epoch = record["epoch"] if record else -1
            total = record["max_epochs"] if record else 1
            last_epoch, last_status = self.printed.get(run.name, (None, None))
            step = max(1, total // 5)
            due = last_epoch is None or epoch >= last_epoch + step or run.status != last_status
            if run.status != "waiting" and due:
                print(progress_line(run), flush=True)
                self.printed[run.name] = (epoch, run.status)

    def close(self) -> None:
        self.update()
        if self.live is not None:
            self.live.stop()


def run_all(runs: list[Run], jobs: int) -> list[Run]:
    """Run the unfinished ``runs``, ``jobs`` at a time, students after the teacher.

    Returns the runs that failed.
    """
    teacher = next(r for r in runs if r.method is None)
    pending = [r for r in runs if not r.done]
    if not any(r.needs_teacher for r in pending):  # e.g. --methods ce: no teacher to train
        pending = [r for r in pending if r is not teacher]
        teacher.status = "not needed"
    for run in runs:
        if run.done:
            run.status = "done (reused)"
    display = Display(runs)
    failed: list[Run] = []
    active: list[Run] = []
    try:
        while pending or active:
            for run in list(active):
                if run.poll() is not None:
                    active.remove(run)
                    if not run.done:
                        failed.append(run)
            if teacher in failed:  # the students cannot start
                pending = [r for r in pending if not r.needs_teacher]
            for run in list(pending):
                if len(active) >= jobs:
                    break
                if run.needs_teacher and not teacher.done:
                    continue
                pending.remove(run)
                run.start()
                active.append(run)
            display.update()
            time.sleep(0.5)
    except KeyboardInterrupt:
        for run in active:
            run.stop()
        display.close()
        print("\ninterrupted: run the same command again to resume from the checkpoints")
        raise SystemExit(130) from None
    display.close()
    return failed


def spread(values: list[float]) -> str:
    """Sample standard deviation, or "-" for a single value (no spread to report)."""
    return f"{statistics.stdev(values):.2f}" if len(values) > 1 else "-"


def format_table(results: dict[str, list[float]], seeds: list[int]) -> str:
    """Markdown table: method, mean test accuracy %, spread (std over seeds), per-seed values."""
    lines = [
        "| method | test acc % (mean) | std | per seed (" + ", ".join(map(str, seeds)) + ") |",
        "|---|---|---|---|",
    ]
    for method, accs in results.items():
        per_seed = " / ".join(f"{a:.2f}" for a in accs)
        lines.append(f"| {method} | {statistics.mean(accs):.2f} | {spread(accs)} | {per_seed} |")
    return "\n".join(lines)


def result_file(run_dir: Path) -> Path | None:
    """The run's metrics record (:data:`RESULT_FILES`), or None before it finished."""
    return next((run_dir / n for n in RESULT_FILES if (run_dir / n).is_file()), None)


def test_acc(run_dir: Path) -> float:
    return 100 * json.loads(result_file(run_dir).read_text())["metrics"]["test/acc"]


def curves(run_dirs: dict[str, Path], metric: str = "val/acc") -> dict[str, tuple[list, list]]:
    """``{label: (epochs (1-based), metric %)}`` from each run's progress file."""
    out = {}
    for label, run_dir in run_dirs.items():
        record = read_progress(run_dir / PROGRESS_FILE) or {"history": []}
        points = [(h["epoch"] + 1, 100 * h[metric]) for h in record["history"] if metric in h]
        out[label] = ([e for e, _ in points], [v for _, v in points])
    return out


def _config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def describe_student(run_dir: Path) -> str:
    """``fmnist_mlp hidden [1024, 1024], 10000 training images, 40 epochs`` from a run's config."""
    cfg = _config(run_dir)
    model = cfg["model"]["name"] + (
        f" hidden {cfg['model']['hidden']}" if "hidden" in cfg["model"] else ""
    )
    images = cfg["data"].get("train_subset") or "all"
    return f"{model}, {images} training images, {cfg['trainer']['max_epochs']} epochs"


def describe_val(run_dir: Path) -> str:
    return f"{_config(run_dir)['data']['val_size']:,} held-out training images"


def build_runs(args: argparse.Namespace) -> list[Run]:
    out: Path = args.out.resolve()
    teachers_dir = out / "teachers"
    common = [f"paths.teachers_dir={teachers_dir}"]
    runs = [
        Run(
            "teacher",
            out / "teacher",
            ["+experiment=fmnist_teacher", "seed=0", *common, *args.teacher_overrides],
            needs_teacher=False,
            done_files=(teachers_dir / f"{TEACHER_NAME}.pth",),
        )
    ]
    for seed in args.seeds:
        for method in args.methods:
            run_dir = out / method / f"seed{seed}"
            overrides = ["+experiment=fmnist_kd", *METHODS[method], f"seed={seed}", *common]
            runs.append(
                Run(
                    f"{method} seed{seed}",
                    run_dir,
                    [*overrides, *args.overrides],
                    needs_teacher=method != "ce",
                    done_files=tuple(run_dir / name for name in RESULT_FILES),
                    method=method,
                    seed=seed,
                )
            )
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "demo_fmnist")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument(
        "--teacher-overrides", nargs="*", default=[], help="extra Hydra overrides for the teacher"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the students")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    runs = build_runs(args)
    print(f"demo output in {args.out.resolve()} (each run's log: <run dir>/train.log)")
    failed = run_all(runs, args.jobs)
    if failed:
        for run in failed:
            print(f"{run.name} failed; see {run.run_dir / 'console.log'}")
        return 1

    teacher, students = runs[0], runs[1:]
    results: dict[str, list[float]] = {}
    for method in args.methods:
        results[method] = [test_acc(r.run_dir) for r in students if r.method == method]
    print(f"\nFashion-MNIST, {time.monotonic() - start:.0f} s, seeds {args.seeds}")
    if result_file(teacher.run_dir):
        print(f"teacher {TEACHER_NAME}: test acc {test_acc(teacher.run_dir):.2f}%")
    else:
        print(f"teacher: {teacher.done_files[0]} (trained outside this demo, or not needed)")
    print(format_table(results, args.seeds))
    if any(result_file(r.run_dir).name != RESULT_FILES[0] for r in students):
        print("NOT_A_RESULT: smoke-level runs (tiny subsets); see each run's metrics.smoke.json")

    from plot_runs import plot_accuracy_curves  # scripts/, beside this file

    png = args.out.resolve() / "demo_fmnist_val_acc.png"
    labels = {f"{r.method} (seed {r.seed})": r.run_dir for r in students}
    teacher_acc = test_acc(teacher.run_dir) if result_file(teacher.run_dir) else None
    reference = None
    if teacher_acc is not None:
        reference = (teacher_acc, f"teacher {TEACHER_NAME}: test acc {teacher_acc:.2f}%")
    plot_accuracy_curves(
        curves(labels),
        png,
        ylabel=f"validation accuracy % ({describe_val(students[0].run_dir)})",
        reference=reference,
        title=f"Fashion-MNIST students: {describe_student(students[0].run_dir)}",
    )
    print(f"curves: {png}")
    print("run directories:")
    for run in runs:
        print(f"  {run.name:<12} {run.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
