"""Smoke test of an installed patchmosaic (a wheel under test, cibuildwheel's test-command, or
tests/test_wheel.py for every CPU variant): the chosen CPU engine variant computes the boundary-aware ELS
machine and IS within the float32 tolerance of the float64 reference. Prints the variant; exit 1 on failure."""

import sys

import numpy as np
import torch

import patchmosaic as pm


def main() -> int:
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (30, 1, 12, 12))
    x = rng.standard_normal((2, 1, 12, 12))
    worst = 0.0
    for make, k in ((pm.ELS, 5), (pm.IS, None)):
        ref = make(train).denoise(x, 0.3, k, backend="torch")
        got = make(train.astype(np.float32)).denoise(x.astype(np.float32), 0.3, k, backend="cpu")
        worst = max(worst, float(np.abs(got - ref).max()))
    print(f"patchmosaic {pm.__version__} from {pm.__file__}: CPU engine {pm.ops.cpu_variant()}, "
          f"max |float32 - float64| = {worst:.2e}")
    return 0 if worst <= 2e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
