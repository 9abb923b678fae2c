"""Collect training runs into the GKL paper's table layout, with the paper's numbers as anchors.

    python scripts/paper_table.py logs/            # every run under logs/
    python scripts/paper_table.py logs/ --json table.json

A cell is one configuration's mean ± std over seeds (runs grouped by the whole resolved config
minus the seed and paths); see gkl/paper.py for the layout, anchors and marks. Smoke tests
(metrics.smoke.json) are never collected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # gkl from this checkout
from gkl.io import atomic_write_json  # noqa: E402
from gkl.paper import method, paper_tables  # noqa: E402
from gkl.runs import find_runs  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", type=Path, nargs="+", help="directories holding train.py runs")
    parser.add_argument("--json", type=Path, help="also write the collected runs here")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.roots)
    except FileNotFoundError as error:
        parser.exit(2, f"paper_table.py: error: {error}\n")
    text = paper_tables(runs)
    print(text)
    if args.json:
        records = [
            {
                "run_dir": str(r.path),
                "experiment": r.config.get("experiment_name"),
                "method": method(r),
                "seed": r.seed,
                "metrics": r.metrics,
            }
            for r in runs
        ]
        atomic_write_json(args.json, records)
    return text


if __name__ == "__main__":
    main()
