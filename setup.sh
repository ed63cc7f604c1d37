#!/usr/bin/env bash
# Set-up in one command, from a checkout of this repository (README, Quick start):
#
#   bash setup.sh demo    install PyTorch (if missing) and the package, then run `patchmosaic demo`
#   bash setup.sh test    install PyTorch (if missing) and the package with its test extra, then run the tests
#
# PyTorch: a torch that imports is kept. Otherwise the build for this machine is installed: pip's default
# (CUDA) build where an NVIDIA GPU answers `nvidia-smi -L`, else the CPU build from PyTorch's CPU index (pip's
# default torch on Linux is the multi-GB CUDA build). $PATCHMOSAIC_TORCH replaces that choice with pip
# arguments of your own (e.g. "torch==2.13.0" where a local wheel is configured).
# $PYTHON: the interpreter to install into (default python3; a virtual environment's python works).
# --dry-run (before the mode): print the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")"

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
mode="${1:-}"
case "$mode" in
  demo|test) ;;
  *) echo "usage: bash setup.sh [--dry-run] demo|test" >&2; exit 2 ;;
esac
py="${PYTHON:-python3}"

run() {
  echo "+ $*"
  if [ "$dry" = 0 ]; then "$@"; fi
}

if [ -n "${PATCHMOSAIC_TORCH:-}" ]; then
  # shellcheck disable=SC2086  # pip arguments, split on purpose
  run "$py" -m pip install --quiet $PATCHMOSAIC_TORCH
elif "$py" -c "import torch" >/dev/null 2>&1; then
  echo "torch $("$py" -c 'import torch; print(torch.__version__)') is installed; keeping it"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "an NVIDIA GPU answers: installing PyTorch's default (CUDA) build"
  run "$py" -m pip install --quiet torch
else
  echo "no NVIDIA GPU: installing PyTorch's CPU build"
  run "$py" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi

if [ "$mode" = demo ]; then
  run "$py" -m pip install --quiet .
  run "$py" -m patchmosaic demo
else
  run "$py" -m pip install --quiet ".[test]"
  run "$py" -m pytest -q tests
fi
