"""A calibration sweep's machine evaluations: one pass over every candidate k (Machine.denoise_ks) against one
denoise call per k, side by side in one process, on CIFAR-10 training images.

For each machine and each time of --times, the seeds (one label each, as in a conditional calibration) are
denoised at k = 3, 5, ..., --k-max both ways; reports both times, their ratio and the largest difference of
the outputs (float32), and writes them as JSON with --out.

    python bench/multi_k.py --n-train 1000 --seeds 4 --k-max 23 --machines els,ls
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1000, help="CIFAR-10 training images (default 1000)")
    ap.add_argument("--seeds", type=int, default=4, help="query images, one label each (default 4)")
    ap.add_argument("--k-max", type=int, default=23, help="sweep k = 3, 5, ..., k_max (default 23)")
    ap.add_argument("--machines", default="els,ls", help="comma list of els, els_circular, ls (default els,ls)")
    ap.add_argument("--times", default="0.5", help="comma list of diffusion times (default 0.5)")
    ap.add_argument("--unconditional", action="store_true", help="no labels")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()

    images, labels = load("cifar10", args.n_train)
    ks = list(range(3, args.k_max + 1, 2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.seeds, *images.shape[1:], generator=g)
    lab = None if args.unconditional else torch.arange(args.seeds) % 10
    print(machine_line(), f"threads={pm.ops.max_threads()} variant={pm.ops.cpu_variant()}")
    print(f"N={len(images)} seeds={args.seeds} ks={ks[0]}..{ks[-1]} ({len(ks)} sizes) labels={lab is not None}")
    rows = []
    for name in args.machines.split(","):
        if name == "els":
            m = pm.ELS(images, labels)
        elif name == "els_circular":
            m = pm.ELS(images, labels, boundary="circular")
        elif name == "ls":
            m = pm.LS(images, labels)
        else:
            raise SystemExit(f"unknown machine {name}")
        for t in (float(v) for v in args.times.split(",")):
            m.denoise_ks(x[:1], t, ks[:2], labels=None if lab is None else lab[:1])  # warm caches (key sets)
            t0 = time.perf_counter()
            multi = m.denoise_ks(x, t, ks, labels=lab)
            t_multi = time.perf_counter() - t0
            t0 = time.perf_counter()
            sep = torch.stack([m.denoise(x, t, k, labels=lab) for k in ks])
            t_sep = time.perf_counter() - t0
            diff = float((multi - sep).abs().max())
            row = dict(machine=name, t=t, separate_s=round(t_sep, 3), multi_s=round(t_multi, 3),
                       ratio=round(t_sep / t_multi, 2), max_abs_diff=diff)
            rows.append(row)
            print(f"{name:13s} t={t:.2f}  separate {t_sep:8.2f} s  one pass {t_multi:8.2f} s  "
                  f"ratio {t_sep / t_multi:6.2f}x  max |diff| {diff:.2e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine_line(), n_train=len(images), seeds=args.seeds, ks=ks,
                           labels=lab is not None, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
