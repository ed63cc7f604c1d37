"""LS (or ELS) calibration end to end against a trained network, with the machine evaluated at every candidate k
in one pass (Machine.denoise_ks, what calibrate does) and with one denoise call per k (the previous way), side by
side in one process; reports both wall times and whether the schedules, choices and cosines agree.

    python bench/calibrate_multi_k.py --n-train 1000 --seeds 4 --steps 6 --machine ls
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHARED, load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402
from patchmosaic.diffusion.samplers import time_grid  # noqa: E402
from patchmosaic.experiments.calibrate import calibrate  # noqa: E402
from patchmosaic.networks.checkpoint import load_network  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default=os.path.join(SHARED, "models", "cifar10k_resnet_zeros_cond", "model.pt"))
    ap.add_argument("--n-train", type=int, default=1000, help="CIFAR-10 training images (default 1000)")
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds, labels 0, 1, 2, ... (default 4)")
    ap.add_argument("--steps", type=int, default=6, help="DDIM steps (default 6)")
    ap.add_argument("--machine", default="ls", choices=["ls", "els"], help="ls or els (boundary zeros)")
    args = ap.parse_args()

    images, labels = load("cifar10", args.n_train)
    net = load_network(args.network)
    m = pm.LS(images, labels) if args.machine == "ls" else pm.ELS(images, labels)
    x1 = torch.randn(args.seeds, *images.shape[1:], generator=torch.Generator().manual_seed(0))
    y = np.arange(args.seeds) % 10
    grid = time_grid(args.steps)
    print(machine_line(), f"threads={pm.ops.max_threads()} variant={pm.ops.cpu_variant()}")
    print(f"{args.machine} N={len(images)} seeds={args.seeds} steps={args.steps} candidates 3..31")

    t0 = time.perf_counter()
    one = calibrate(net, m, x1, y, grid=grid, progress=False)
    t_one = time.perf_counter() - t0

    def per_size(x, t, ks, labels=None, backend=None):
        return torch.stack([m.denoise(x, t, k, labels=labels) for k in ks])

    m.denoise_ks = per_size  # the previous way: one call per candidate
    t0 = time.perf_counter()
    sep = calibrate(net, m, x1, y, grid=grid, progress=False)
    t_sep = time.perf_counter() - t0
    del m.denoise_ks
    print(f"one pass {t_one:8.2f} s  one call per k {t_sep:8.2f} s  ratio {t_sep / t_one:5.2f}x")
    print(f"schedules equal: {one.schedule == sep.schedule}  choices equal: {bool((one.choices == sep.choices).all())}  "
          f"max |cosine diff| {float(np.abs(one.cosine - sep.cosine).max()):.2e}")
    print(f"schedule ks (t = 1 -> {1 / args.steps:g}): {list(one.schedule.ks)}")


if __name__ == "__main__":
    main()
