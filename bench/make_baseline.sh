#!/usr/bin/env bash
# Build the package at COMMIT (CPU engine only) and unpack it as the importable folder DIR, for
# `python bench/cpu_engine.py --baseline DIR` (an older engine timed side by side with the current one).
# Usage: bash bench/make_baseline.sh COMMIT DIR     e.g. bash bench/make_baseline.sh da9b901 /tmp/pm_baseline
set -euo pipefail
commit=$1 dir=$2
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git -C "$root" worktree add -q "$work/src" "$commit"
trap 'git -C "$root" worktree remove --force "$work/src"; rm -rf "$work"' EXIT
PATCHMOSAIC_CUDA=OFF python3 -m pip wheel --no-build-isolation --no-deps -q -w "$work/wheel" "$work/src"
python3 -m zipfile -e "$work"/wheel/patchmosaic-*.whl "$work/unpacked"
rm -rf "$dir"
mv "$work/unpacked/patchmosaic" "$dir"
echo "baseline $commit in $dir"
