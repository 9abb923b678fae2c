#!/usr/bin/env bash
# Install robustbench 1.1 into the current Python environment without its pins.
#
# robustbench 1.1 pins timm==1.0.9 and depends on fra31's `autoattack` from GitHub (not on PyPI),
# so it is installed with --no-deps plus the dependencies it really imports. fra31's own
# `autoattack` (Croce & Hein's reference code, pinned to commit a392200) is installed from GitHub
# for eval.py's backend=fra31 / backend=robustbench cross-checks; where GitHub cannot be reached
# it is skipped with a note (backend=robustbench_shim then runs robustbench on gkl's shim).
# robustbench also installs a top-level `tests` package into site-packages; gkl's suite does not
# depend on that name (pytest runs with --import-mode=importlib and tests/ has no __init__.py).
# Usage: scripts/install_robustbench.sh [python]   (default: python on PATH, e.g. an active venv)
set -euo pipefail

PYTHON="${1:-python}"
"$PYTHON" -m pip install -q --no-deps "robustbench==1.1"
"$PYTHON" -m pip install -q geotorch torchdiffeq gdown pandas requests jinja2 pyyaml tqdm "setuptools<82"
"$PYTHON" -m pip install -q --no-deps \
  "autoattack @ git+https://github.com/fra31/auto-attack@a39220048b3c9f2cca9a4d3a54604793c68eca7e" \
  || echo "note: fra31's autoattack not installed (GitHub unreachable?): backend=fra31 unavailable"
