"""The same-position engine (cpu/aligned_softmax.cpp: LS, PCA-locality, DataLocal) per instruction-set variant of
the CPU engine: per machine, noise level and variant the best of ``--repeat`` calls (CPU seconds of the process),
one query image, float32 (``--dtype float64``: images and query in float64), the variants alternating. The package
is the one Python imports (``PYTHONPATH=python`` for the checkout's build; an older build cannot share the process:
its call structs are registered under the same names), so an older build is timed by running this script on it in
turns with the current one (``bench/make_baseline.sh COMMIT DIR``, then a folder holding DIR as ``patchmosaic`` on
``PYTHONPATH``).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python bench/aligned_variants.py --n-train 5000 --json now.json

PCA-locality uses the published threshold of the data (MNIST 0.005, CIFAR-10 0.05).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import patchmosaic as pm  # noqa: E402
from common import best_time, blas_line, load, machine_line, write_rows  # noqa: E402


THRESHOLD = {"mnist": 0.005, "cifar10": 0.05}  # the published thresholds


def machines(lib, x, data, which):
    """(name, call) of the timed machines (``which``: "ls", "pca") of the package ``lib`` on images ``x``."""
    q = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(0)).to(x.dtype)
    out = []
    if "ls" in which:
        ls = lib.LS(x)
        for k in (3, 7, 11):
            out.append((f"LS k={k}", lambda t, k=k: ls.denoise(q, t, k)))
    if "pca" in which:
        pca = lib.PCALocality(x, threshold=THRESHOLD[data])
        out.append(("PCA-locality (mask kept)", lambda t: pca.denoise(q, t)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", choices=["mnist", "cifar10"])
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--times", default="0.9,0.5,0.2")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--machines", default="ls,pca", help="which machines: ls, pca")
    p.add_argument("--variants", default=None, help="instruction-set variants to time (default: every one)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(machine_line(), "|", blas_line(), flush=True)
    x = torch.from_numpy(np.asarray(load(a.data, a.n_train)[0], a.dtype))
    print("package:", os.path.dirname(pm.__file__), flush=True)
    variants, chosen = list(pm.ops.cpu_variants()), pm.ops.cpu_variant()
    if a.variants:
        variants = [v for v in variants if v in a.variants.split(",")]
    rows = []
    for name, f in machines(pm, x, a.data, a.machines.split(",")):
        for t in [float(v) for v in a.times.split(",")]:
            best = {}
            for v in variants:
                pm.ops.use_cpu_variant(v)
                f(t)  # warm-up: masks, tables, caches
                best[v] = float("inf")
            for _ in range(a.repeat):
                for v in variants:  # alternating
                    pm.ops.use_cpu_variant(v)
                    best[v] = min(best[v], best_time(lambda: f(t), 1, time.process_time))
            for v in variants:
                rows.append({"machine": name, "t": t, "variant": v, "dtype": a.dtype, "cpu_s": best[v]})
            print(f"{name:26s} t={t:.1f} " + "  ".join(f"{v} {best[v]:.4f}" for v in variants), flush=True)
    pm.ops.use_cpu_variant(chosen)
    if a.json:
        write_rows(a.json, rows)


if __name__ == "__main__":
    main()
