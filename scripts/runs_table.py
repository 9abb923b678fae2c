"""Tabulate train.py runs: one row per configuration, mean ± std over seeds (gkl.runs).

    python scripts/runs_table.py logs/fmnist_kd/multiruns/2026-12-03_10-00-00-000000
    python scripts/runs_table.py logs/ --metric test/acc --metric val/acc

Runs are grouped by their whole resolved config minus the seed, paths and logging; the columns
are the config keys that differ between the groups, then each metric (accuracies in %), n and
the seeds. Smoke tests (metrics.smoke.json) are left out unless --smoke.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # gkl from this checkout
from gkl.runs import find_runs, runs_table  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", type=Path, nargs="+", help="directories holding train.py runs")
    parser.add_argument(
        "--metric", action="append", help="metric to tabulate (default: test/acc); repeatable"
    )
    parser.add_argument("--smoke", action="store_true", help="include smoke tests, marked")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.roots, include_smoke=args.smoke)
    except FileNotFoundError as error:
        parser.exit(2, f"runs_table.py: error: {error}\n")
    table = runs_table(runs, args.metric or ["test/acc"])
    print(table)
    return table


if __name__ == "__main__":
    main()
