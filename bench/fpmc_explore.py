"""Which filtered-posterior-mean-collection variant is worth a place in the table of every machine (issue 27)? A cheap
proxy, the one section 10 of RESULTS used for DataLocal's variants: along the network's own DDIM trajectory from a few
seeds, at every step, the machine's score at every candidate size on the network's x_t, and the best candidate's cosine
with the network's score; averaged over steps and seeds (what a calibration maximises; 1 = the network's denoiser).

    python bench/fpmc_explore.py --network mnist_resnet_zeros --limit 500 --seeds 2

Variants: ELS (the reference point), with the source's mirrors (xflip), with a soft Gaussian window of width c k at
size k (``soft``), both; PSPC-Square, soft and mirrored; LS with a whole-patch response. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import patchmosaic as pm  # noqa: E402
from common import SHARED, machine_line  # noqa: E402
from reproduce import NETWORKS  # noqa: E402
from patchmosaic.experiments.calibrate import cosine_per_seed  # noqa: E402
from patchmosaic.networks import load_network  # noqa: E402


def variants(images, labels, boundary, c: float):
    K = list(range(3, 16, 2))
    P = K + [min(images.shape[-2:])]

    def els(xflip=False, soft=False):
        m = pm.ELS(images, labels, boundary=boundary, xflip=xflip)
        if not soft:
            return K, lambda x, t, k, y: m.denoise(x, t, k, y)
        return K, lambda x, t, k, y: m.denoise(x, t, k, y, patch_mask=pm.ops.gaussian_mask(k, c * k))

    def pspc(xflip=False, soft=False):
        ms = {}

        def f(x, t, p, y):
            key = p if soft else 0
            if key not in ms:
                ms[key] = pm.PSPC(images, labels, xflip=xflip, precision=c * p if soft else None)
            return ms[key].denoise(x, t, p, y)

        return P, f

    ls = pm.LS(images, labels, response="patch")
    return {"ELS": els(), "ELS+xflip": els(xflip=True), f"ELS+soft({c}k)": els(soft=True),
            f"ELS+soft({c}k)+xflip": els(True, True), "PSPC": pspc(), "PSPC+xflip": pspc(xflip=True),
            f"PSPC+soft({c}p)+xflip": pspc(True, True),
            "LS+patch": (K, lambda x, t, k, y: ls.denoise(x, t, k, y))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="mnist_resnet_zeros")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--c", type=float, default=0.5, help="soft width: c times the window's size")
    p.add_argument("--only", default=None, help="comma-separated variant names")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    data, full_limit, padding, _, _ = NETWORKS[args.network]
    card_dir = os.path.join(SHARED, "models", args.network)
    cond = bool(json.load(open(os.path.join(card_dir, "card.json")))["conditional"])
    images, labels = pm.data.load(data, limit=args.limit)
    labels = labels if cond else None
    ref = np.load(os.path.join(card_dir, "ddim20_samples.npz"))
    x = torch.from_numpy(ref["seeds"][: args.seeds]).float()
    y = torch.from_numpy(ref["labels"][: args.seeds]) if cond else None
    net = pm.NetworkDenoiser(load_network(os.path.join(card_dir, "model.pt")))
    boundary = "circular" if padding == "circular" else "zeros"
    vs = variants(images, labels, boundary, args.c)
    if args.only:
        vs = {k: v for k, v in vs.items() if k in args.only.split(",")}
    grid = np.arange(args.steps, -1, -1) / args.steps
    best = {name: np.zeros((args.steps, args.seeds)) for name in vs}
    choice = {name: np.zeros((args.steps, args.seeds), int) for name in vs}
    seconds = {name: 0.0 for name in vs}
    sched = net.schedule
    for i in range(args.steps):
        t, tn = float(grid[i]), float(grid[i + 1])
        a, b2 = sched.scalar_coefficients(t)
        eps = net.eps(x, t, y)
        target = -np.sqrt(b2) * eps
        for name, (cands, f) in vs.items():
            t0 = time.perf_counter()
            cos = np.stack([cosine_per_seed(a * torch.as_tensor(f(x, t, k, y)) - x, target) for k in cands], 1)
            seconds[name] += time.perf_counter() - t0
            best[name][i], choice[name][i] = cos.max(1), np.asarray(cands)[cos.argmax(1)]
        x = pm.sampling.update(sched, x, (x - np.sqrt(b2) * eps) / a, t, tn, eps=eps)
        print(f"t={t:.2f} " + " ".join(f"{n} {best[n][i].mean():.4f}" for n in vs), flush=True)
    rows = {n: {"mean_best_cosine": float(best[n].mean()), "per_step": best[n].mean(1).round(5).tolist(),
                "choices": choice[n].tolist(), "seconds": round(seconds[n], 1)} for n in vs}
    print(f"\n{args.network}, {args.limit} images, {args.seeds} seeds: mean over steps and seeds of the best "
          "candidate's cosine with the network's score")
    for n, r in sorted(rows.items(), key=lambda kv: -kv[1]["mean_best_cosine"]):
        print(f"  {n:24s} {r['mean_best_cosine']:.4f}  ({r['seconds']:.0f} s)")
    if args.json:
        pm.io.runstate.write_json(args.json, {"network": args.network, "limit": args.limit, "seeds": args.seeds,
                                              "c": args.c, "date": time.strftime("%Y-%m-%d"),
                                              "machine": machine_line(), "variants": rows,
                                              "command": "python " + " ".join(sys.argv)})


if __name__ == "__main__":
    main()
