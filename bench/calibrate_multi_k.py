"""LS (or ELS) calibration end to end against a trained network, with the machine evaluated at every candidate k
in one pass (Machine.denoise_ks, what calibrate does) and with one denoise call per k (the previous way), side by
side in one process; reports both wall times and whether the schedules, choices and cosines agree.

    python bench/calibrate_multi_k.py --n-train 1000 --seeds 4 --steps 6 --machine ls

The full sweep of bench/reproduce.py (CIFAR-10 ResNet, all 10,000 images, the network's 8 reference seeds and
labels, 20 steps, k = 3..23), with the per-size way on the first seed only (its time grows linearly with the
seeds: reported per seed and scaled to 8):

    python bench/calibrate_multi_k.py --n-train 10000 --seeds 8 --steps 20 --k-max 23 --machine ls --separate-seeds 1
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
from patchmosaic.networks import load_network  # noqa: E402
from patchmosaic.networks.checkpoint import side_file  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default=os.path.join(SHARED, "models", "cifar10k_resnet_zeros_cond", "model.pt"))
    ap.add_argument("--n-train", type=int, default=1000, help="CIFAR-10 training images (default 1000)")
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds, labels 0, 1, 2, ... (default 4)")
    ap.add_argument("--steps", type=int, default=6, help="DDIM steps (default 6)")
    ap.add_argument("--machine", default="ls", choices=["ls", "els"], help="ls or els (boundary zeros)")
    ap.add_argument("--k-max", type=int, default=31, help="largest candidate (default 31)")
    ap.add_argument("--separate-seeds", type=int, default=None,
                    help="run the one-call-per-k way on the first this many seeds only (default: all)")
    args = ap.parse_args()

    images, labels = load("cifar10", args.n_train)
    net = load_network(args.network)
    m = pm.LS(images, labels) if args.machine == "ls" else pm.ELS(images, labels)
    ref = side_file(args.network, "ddim20_samples.npz")  # (NAME.ddim20_samples.npz beside a NAME.safetensors)
    if os.path.exists(ref):  # the network's own reference seeds and labels, as bench/reproduce.py
        d = np.load(ref)
        x1, y = torch.from_numpy(d["seeds"][: args.seeds]), d["labels"][: args.seeds]
    else:
        x1 = torch.randn(args.seeds, *images.shape[1:], generator=torch.Generator().manual_seed(0))
        y = np.arange(args.seeds) % 10
    cands = list(range(3, args.k_max + 1, 2))
    ms = args.seeds if args.separate_seeds is None else min(args.seeds, args.separate_seeds)
    grid = time_grid(args.steps)
    print(machine_line(), f"threads={pm.ops.max_threads()} variant={pm.ops.cpu_variant()}")
    print(f"{args.machine} N={len(images)} seeds={args.seeds} (one call per k: {ms}) steps={args.steps} "
          f"candidates 3..{args.k_max}", flush=True)

    t0 = time.perf_counter()
    one = calibrate(net, m, x1, y, grid=grid, candidates=cands, progress=False)
    t_one = time.perf_counter() - t0

    def per_size(x, t, ks, labels=None, backend=None):
        return torch.stack([m.denoise(x, t, k, labels=labels) for k in ks])

    m.denoise_ks = per_size  # the previous way: one call per candidate
    t0 = time.perf_counter()
    sep = calibrate(net, m, x1[:ms], y[:ms], grid=grid, candidates=cands, progress=False)
    t_sep = time.perf_counter() - t0
    del m.denoise_ks
    scaled = t_sep * args.seeds / ms
    print(f"one pass {t_one:8.2f} s ({args.seeds} seeds)  one call per k {t_sep:8.2f} s ({ms} seeds; "
          f"{scaled:.1f} s scaled to {args.seeds})  ratio {scaled / t_one:5.2f}x")
    if ms == args.seeds:
        print(f"schedules equal: {one.schedule == sep.schedule}  "
              f"choices equal: {bool((one.choices == sep.choices).all())}")
    print(f"max |cosine diff| on the common seeds {float(np.abs(one.cosine[:, :ms] - sep.cosine).max()):.2e}  "
          f"choices equal on them: {bool((one.choices[:, :ms] == sep.choices).all())}")
    print(f"schedule ks (t = 1 -> {1 / args.steps:g}): {list(one.schedule.ks)}")


if __name__ == "__main__":
    main()
