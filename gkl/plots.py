"""Figures of training runs: accuracy (%) and loss per epoch, one colour per run.

:func:`plot_runs` reads each run's history through :func:`gkl.runs.epoch_history` (joined across
resumes), draws training curves dashed and validation curves solid with a marker on every epoch
(a 1-epoch run is a visible point), and labels each run by what differs between the runs
(``loss.beta=4, seed=1``; the directory name when nothing does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gkl.io import atomic_write_with  # noqa: E402
from gkl.runs import CSV_FILE, Run, RunGroup, differing_keys, epoch_history, load_run  # noqa: E402

DEFAULT_FILE = "runs.png"
PANELS = (("acc", "accuracy (%)"), ("loss", "loss"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """A legend label per run: the config keys whose values differ between the runs (the swept
    values and the seed), else the directory name."""
    runs: list[Run | None] = []
    for run_dir in run_dirs:
        try:
            runs.append(load_run(run_dir))
        except FileNotFoundError:
            runs.append(None)
    if len(run_dirs) < 2 or any(r is None for r in runs):
        return [Path(d).name for d in run_dirs]
    per_run = [RunGroup(r.hyperparameters() | {"seed": r.seed}, [r]) for r in runs if r]
    keys = differing_keys(per_run)
    if not keys:
        return [Path(d).name for d in run_dirs]
    return [
        ", ".join(f"{k}={json.dumps(g.hyperparameters.get(k), default=str)}" for k in keys)
        for g in per_run
    ]


def output_path(out: str | Path) -> Path:
    """``out`` itself, or ``out/runs.png`` when ``out`` is a directory (existing, or written
    with a trailing slash or without a suffix)."""
    text = str(out)
    path = Path(out)
    if path.is_dir() or text.endswith(("/", "\\")) or not path.suffix:
        return path / DEFAULT_FILE
    return path


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """:func:`draw_runs` to a PNG at :func:`output_path` (``out``); returns the file written."""
    fig = draw_runs(run_dirs)
    path = output_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def draw_runs(run_dirs: Sequence[str | Path]) -> Figure:
    """Accuracy (%) and loss panels of ``run_dirs``: one colour per run, training dashed,
    validation solid, a marker per epoch, legend labels from :func:`run_labels`."""
    run_dirs = [Path(d) for d in run_dirs]
    for run_dir in run_dirs:
        if not (run_dir / CSV_FILE).is_file():
            raise FileNotFoundError(
                f"no CSV log at {run_dir / CSV_FILE}; is {run_dir} a train.py run directory?"
            )
    labels = run_labels(run_dirs)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6.5 * len(PANELS), 4.2))
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        history = epoch_history(run_dir)
        colour = colours[i % len(colours)]
        for ax, (suffix, _) in zip(axes, PANELS, strict=True):
            names = sorted({k for h in history for k in h if k.endswith(f"/{suffix}")})
            for j, name in enumerate(names):
                points = [(h["epoch"], h[name]) for h in history if name in h]
                scale = 100.0 if suffix == "acc" else 1.0
                ax.plot(
                    [e for e, _ in points],
                    [scale * v for _, v in points],
                    color=colour,
                    linestyle="--" if name.startswith("train/") else "-",
                    marker=MARKERS[j % len(MARKERS)],
                    markersize=4,
                    linewidth=1.4,
                    label=f"{label}: {name}",
                )
    for ax, (_, title) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("%")
    fig.tight_layout()
    return fig


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
        ax.plot(epochs, values, label=label, linewidth=1.3, marker="o", markersize=3)
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
