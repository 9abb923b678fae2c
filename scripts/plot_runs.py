"""Draw accuracy (%) and loss curves of one or more run directories to a PNG (gkl.plots).

    python scripts/plot_runs.py logs/demo_fmnist/kd/seed0 logs/demo_fmnist/gkl/seed0 --out runs.png
    python scripts/plot_runs.py <sweep dir>/* --out figures/     # writes figures/runs.png

One colour per run (training dashed, validation solid, a marker per epoch), labelled by the
config values that differ between the runs; the history of a resumed run is joined.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # gkl from this checkout
from gkl.plots import plot_accuracy_curves, plot_runs  # noqa: E402

__all__ = ["main", "plot_accuracy_curves"]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="train.py run directories")
    parser.add_argument(
        "--out", default="runs.png", help="PNG file, or a directory to write runs.png in"
    )
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.run_dirs, args.out)
    except FileNotFoundError as error:
        parser.exit(2, f"plot_runs.py: error: {error}\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
