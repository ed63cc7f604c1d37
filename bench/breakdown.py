"""Where the time of one engine call goes at small k (issue 3), by controlled experiments in one process.

For MNIST, B = 8, boundary-aware ELS, float32:
  full      the call at t = 0.5: every key block goes through the exponential pass;
  no-exp    the same queries at t = 0.003: at this noise the logits of most key blocks lie more than
            87 below the row's running maximum, so the engine skips their exponential, sum and
            weighted-centre pass (exactly: those weights are 0 in float32); what is left is gathering,
            the dot products, the logits and the block maxima.
So (full - no-exp) / full is a lower bound on the share of the exponential pass (some blocks are
still folded at t = 0.003), and no-exp / full an upper bound on everything else.

    python bench/breakdown.py --n-train 3000 --ks 3,5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--ks", default="3,5")
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    images, _ = load("mnist", args.n_train)
    N = len(images)
    m = pm.ELS(images)
    rng = np.random.default_rng(0)
    x0 = images[rng.integers(0, N, args.batch)]
    eps = rng.standard_normal(x0.shape)
    print(f"# {time.strftime('%Y-%m-%d')} | {machine_line()} | N={N} B={args.batch}")
    print("| k | full (t=0.5) s | pairs/s | no-exp (t=0.003) s | pairs/s | time without the exp pass |")
    print("|---|---|---|---|---|---|")
    for k in [int(v) for v in args.ks.split(",")]:
        pairs = m.keyset(32, 32, k).n_pairs_per_image() * N * args.batch
        res = {}
        for t in (0.5, 0.003):
            a, b2 = pm.schedules.cosine_legacy.coefficients(t)
            x = (a * x0 + np.sqrt(b2) * eps).astype(np.float32)
            res[t] = best_time(lambda: m.denoise(x, t, k), 2)
        full, noexp = res[0.5], res[0.003]
        print(f"| {k} | {full:.2f} | {pairs / full:.3g} | {noexp:.2f} | {pairs / noexp:.3g} | {noexp / full:.0%} |")


if __name__ == "__main__":
    main()
