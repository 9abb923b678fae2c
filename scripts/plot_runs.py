"""Draw accuracy and loss curves of one or more run directories (their CSV logs) to a PNG.

python scripts/plot_runs.py logs/demo_fmnist/kd/seed0 logs/demo_fmnist/gkl/seed0 --out runs.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # gkl from this checkout
from gkl.io import atomic_write_with  # noqa: E402

PANELS = (("acc", "accuracy"), ("loss", "loss"))


def read_epoch_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` from ``<run_dir>/csv/metrics.csv`` (Lightning's CSVLogger)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no CSV log at {path}; is {run_dir} a train.py run directory?")
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key in ("epoch", "step") or not value or not row.get("epoch"):
                    continue
                series[key][int(float(row["epoch"]))] = float(value)
    return series


def plot(run_dirs: list[Path], out: Path) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4))
    for run_dir in run_dirs:
        series = read_epoch_metrics(run_dir)
        for ax, (suffix, title) in zip(axes, PANELS, strict=True):
            for name in sorted(k for k in series if k.endswith(f"/{suffix}")):
                if name.startswith("test/"):
                    continue  # a single point after training
                epochs = sorted(series[name])
                ax.plot(epochs, [series[name][e] for e in epochs], label=f"{run_dir.name}: {name}")
            ax.set_title(title)
            ax.set_xlabel("epoch")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda f: fig.savefig(f, format=out.suffix[1:] or "png", dpi=120))
    print(f"wrote {out}")


def plot_accuracy_curves(
    curves: dict[str, tuple[list[int], list[float]]],
    out: Path,
    ylabel: str,
    reference: tuple[float, str] | None = None,
    title: str | None = None,
) -> Path:
    """One line per ``label: (epochs, values)``, ``reference = (value, label)`` as a dashed
    horizontal line (e.g. the teacher's accuracy); written to ``out`` as a PNG."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (epochs, values) in curves.items():
        ax.plot(epochs, values, label=label, linewidth=1.3)
    if reference is not None:
        ax.axhline(reference[0], color="black", linestyle="--", linewidth=1, label=reference[1])
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("runs.png"))
    args = parser.parse_args()
    plot(args.run_dirs, args.out)


if __name__ == "__main__":
    main()
