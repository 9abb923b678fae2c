#!/usr/bin/env bash
# Fetch the test assets: the foolbox 3.3.4 wheel from PyPI, which ships 20 real test images each
# of CIFAR-10, CIFAR-100, Fashion-MNIST, MNIST and ImageNet (foolbox/data/<set>_<idx>_<label>.*).
# The wheel is cached (sha256-checked) in .cache/test-assets/; prints its path.
# Usage: bash scripts/fetch_test_assets.sh   (PYTHON=<interpreter with pip>, default python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${GKL_TEST_ASSETS:-$root/.cache/test-assets}"
wheel="$dest/foolbox-3.3.4-py3-none-any.whl"
sha256="11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb"

if ! echo "$sha256  $wheel" | sha256sum --check --status 2>/dev/null; then
  mkdir -p "$dest"
  rm -f "$wheel"
  "${PYTHON:-python3}" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: "foolbox==3.3.4" -d "$dest" >&2
  echo "$sha256  $wheel" | sha256sum --check --quiet >&2
fi
echo "$wheel"
