#!/usr/bin/env bash
# Install robustbench 1.1 into the current Python environment without its pins.
#
# robustbench 1.1 pins timm==1.0.9 and depends on fra31's `autoattack` from GitHub (not on PyPI),
# so it is installed with --no-deps plus the dependencies it really imports. The `autoattack`
# import is provided at run time by gkl.evaluate.autoattack_compat (mapped onto pyautoattack).
# robustbench also installs a top-level `tests` package into site-packages; gkl's suite does not
# depend on that name (pytest runs with --import-mode=importlib and tests/ has no __init__.py).
# Usage: scripts/install_robustbench.sh [python]   (default: python on PATH, e.g. an active venv)
set -euo pipefail

PYTHON="${1:-python}"
"$PYTHON" -m pip install -q --no-deps "robustbench==1.1"
"$PYTHON" -m pip install -q geotorch torchdiffeq gdown pandas requests jinja2 pyyaml tqdm "setuptools<82"
