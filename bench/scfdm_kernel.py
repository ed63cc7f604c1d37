"""The smoothed closed-form denoiser's compiled kernel (cpu/expansion_means.cpp) alone, per data set and noise level:
the best of ``--repeat`` eager calls (CPU seconds of the process), ``--batch`` queries (default one), 10 draws, the data as
``bench/vs_studio.py`` uses them (MNIST at 28 x 28 with smoothing 1, CIFAR-10 at 32 x 32 with smoothing 0.1).

The package is the one Python imports (``PYTHONPATH``), so that two builds are compared by running this script on
each in turns (a folder holding each build's ``patchmosaic`` on ``PYTHONPATH``; two builds cannot share a process:
their ops register under the same names), and the best of the runs kept per build.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python bench/scfdm_kernel.py --json now.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import patchmosaic as pm  # noqa: E402
from common import best_time, blas_line, load, machine_line, write_rows  # noqa: E402

SMOOTHING = {"mnist": 1.0, "cifar10": 0.1}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="mnist:10000,cifar10:10000,mnist:2000")
    p.add_argument("--times", default="0.95,0.7,0.5,0.3,0.1")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="queries per call")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(machine_line(), "|", blas_line(), "| package:", os.path.dirname(pm.__file__), flush=True)
    rows = []
    for item in a.sets.split(","):
        name, n = item.split(":")
        x = torch.from_numpy(np.asarray(load(name, int(n))[0], np.float32))
        if name == "mnist":
            x = x[:, :, 2:30, 2:30].contiguous()  # the Studio's 28 x 28
        m = pm.SmoothedCFDM(x, smoothing=SMOOTHING[name], samples=10)
        q = torch.randn(a.batch, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        m.denoise(q, 0.5)  # one-off set-up
        for t in [float(v) for v in a.times.split(",")]:
            cpu = best_time(lambda: m.denoise(q, t), a.repeat, time.process_time)
            rows.append({"data": name, "n_train": int(n), "batch": a.batch, "t": t, "cpu_s": cpu})
            print(f"{name} N={n} B={a.batch} t={t:.2f}: {cpu * 1e3:.2f} ms CPU", flush=True)
    if a.json:
        write_rows(a.json, rows)


if __name__ == "__main__":
    main()
