"""The smoothed closed-form denoiser's two CPU paths side by side in one process (issue 25): the compiled kernel
(``ops.expansion_means``, taken by calls that nothing differentiates) against the torch operations (two float64
products, taken when a derivative is asked for: here a query that requires a gradient, its autograd graph built
but never used), on the same float32 queries at several noise levels, interleaved repeats, the best of each, CPU
seconds; and the largest difference of the two paths' outputs for the query in float64.
The data as ``bench/vs_studio.py`` uses them: MNIST at 28 x 28 (smoothing 1), CIFAR-10 at 32 x 32 (smoothing 0.1),
[-1, 1], 10 draws, one query.

    OMP_WAIT_POLICY=PASSIVE python bench/scfdm_paths.py --data mnist,cifar10 --n-train 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

import patchmosaic as pm  # noqa: E402
from common import best_time, blas_line, load, machine_line, write_rows  # noqa: E402

SMOOTHING = {"mnist": 1.0, "cifar10": 0.1}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist,cifar10")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--times", default="0.95,0.7,0.5,0.3,0.1")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(machine_line(), "|", blas_line(), flush=True)
    rows = []
    for name in a.data.split(","):
        x, _ = load(name, a.n_train)
        x = torch.from_numpy(np.asarray(x, np.float32))
        if name == "mnist":
            x = x[:, :, 2:30, 2:30].contiguous()  # the Studio's 28 x 28
        m = pm.SmoothedCFDM(x, smoothing=SMOOTHING[name], samples=10)
        q = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        m.denoise(q, 0.5), m.denoise(q.clone().requires_grad_(True), 0.5)  # each path's one-off set-up
        for t in [float(v) for v in a.times.split(",")]:
            kernel, torch_ops = float("inf"), float("inf")
            for _ in range(a.repeat):  # interleaved
                kernel = min(kernel, best_time(lambda: m.denoise(q, t), 1, time.process_time))
                torch_ops = min(torch_ops, best_time(lambda: m.denoise(q.clone().requires_grad_(True), t), 1,
                                                       time.process_time))
            q64 = q.double()  # the difference in float64 (float32 outputs would round it away)
            diff = float((m.denoise(q64, t) - m.denoise(q64.clone().requires_grad_(True), t).detach()).abs().max())
            rows.append({"data": name, "n_train": a.n_train, "t": t, "kernel_cpu_s": kernel,
                         "torch_cpu_s": torch_ops, "max_difference": diff})
            print(f"{name} N={a.n_train} t={t:.2f}: CPU seconds kernel {kernel:.4f}, torch operations {torch_ops:.4f} "
                  f"({torch_ops / kernel:.1f}x); largest difference {diff:.1e}", flush=True)
    if a.json:
        write_rows(a.json, rows)


if __name__ == "__main__":
    main()
