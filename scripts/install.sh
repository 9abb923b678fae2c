#!/usr/bin/env bash
# Creates a virtual environment (default .venv, or $GKL_VENV) and installs gkl with its test,
# sweep, rl and loggers extras, plus the offline Fashion-MNIST data set where the Debian package
# can be installed.
#   bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GKL_VENV:-.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[dev,sweep,rl,loggers]"
# Independent PGD reference for the attack tests; its metadata pins an old requests, so no deps.
"$venv/bin/python" -m pip install -q --no-deps torchattacks==3.5.1
# robustbench 1.1 (its pins skipped) and fra31's `autoattack`, so the RobustBench and fra31
# backends, export and ImageNet-protocol tests run instead of skipping.
bash scripts/install_robustbench.sh "$venv/bin/python"

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo -n"
  $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || echo "note: could not apt-get install dataset-fashion-mnist; use data.download=true"
fi
echo "gkl installed in $venv"
