"""What the CPU engine's Ctrl-C poll costs: warm calls with the poll registered (as the package always runs) and
withdrawn (``_set_stop_poll(False)`` of the loaded engine module), in turns in one process.

Every CPU engine runs its work items through ``FirstError`` (cpp/cpu/threads.hpp); with a poll registered, the
calling thread reads the clock before each of its items and asks Python's signal handlers at most every 50 ms.
Per machine and round, the best of ``--repeat`` calls with the poll on and of as many with it off, the two states
taking turns call by call (the order swapped every call); the figure is off / on per round (below 1: the calls
without the poll were faster, i.e. the poll costs time).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python \\
        python bench/stop_poll.py --json bench/results/stop_poll.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import patchmosaic as pm  # noqa: E402
from patchmosaic.ops import engines  # noqa: E402
from common import best_time, blas_line, load, machine_line, write_rows  # noqa: E402


def machines(x):
    """(name, call) of the timed machines on images ``x``: the patch engine (ELS), the same-position engine (LS,
    PCA-locality at MNIST's published threshold)."""
    q = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    els, ls, pca = pm.ELS(x), pm.LS(x), pm.PCALocality(x, threshold=0.005)
    return [("ELS k=5", lambda t: els.denoise(q, t, 5)), ("LS k=9", lambda t: ls.denoise(q, t, 9)),
            ("PCA-locality", lambda t: pca.denoise(q, t))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--t", type=float, default=0.6)
    p.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    print(machine_line(), "|", blas_line(), "| engine:", engines.cpu_variant(), flush=True)
    x = torch.from_numpy(load("mnist", a.n_train)[0])
    module = engines._CPU_MODULE
    rows = []
    try:
        for threads in [int(v) for v in a.threads.split(",")]:
            torch.set_num_threads(threads)
            for name, f in machines(x):
                f(a.t)  # warm-up: tables, masks, caches
                ratios, on_s, off_s = [], [], []
                for r in range(a.rounds):
                    best = {True: float("inf"), False: float("inf")}
                    for i in range(a.repeat):  # the two states call by call, the order swapped every call
                        for enabled in ((True, False) if (r + i) % 2 == 0 else (False, True)):
                            module._set_stop_poll(enabled)
                            best[enabled] = min(best[enabled], best_time(lambda: f(a.t), 1, time.perf_counter))
                    module._set_stop_poll(True)
                    on_s.append(best[True])
                    off_s.append(best[False])
                    ratios.append(best[False] / best[True])
                row = {"machine": name, "threads": threads, "t": a.t, "n_train": a.n_train, "on_s": on_s,
                       "off_s": off_s, "off_over_on": ratios}
                rows.append(row)
                print(f"{name:14s} threads={threads} on {min(on_s) * 1e3:8.2f} ms  off {min(off_s) * 1e3:8.2f} ms  "
                      f"off/on per round {' '.join(f'{v:.3f}' for v in ratios)}  median "
                      f"{statistics.median(ratios):.3f}", flush=True)
    finally:
        module._set_stop_poll(True)
    if a.json:
        write_rows(a.json, rows)


if __name__ == "__main__":
    main()
