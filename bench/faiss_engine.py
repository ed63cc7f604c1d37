"""FAISS patch index vs the exact CPU engine: boundary-aware ELS on MNIST with the paper's MNIST ResNet
k-schedule (issue 6).

Measures, in one process: index build time and memory per k; per-step time of the exact engine and of
the approximate (index) path on the same x_t (the exact trajectory's), with the per-pixel error bound,
the measured error and the index recall at every step with t <= --t-max; and 20-step DDIM samples from
--seeds seeds with the index-or-exact policy (--tol) against the exact engine's samples (Pearson r).

    python bench/faiss_engine.py --n-train 60000 --seeds 16 --kind ivf --m 64 --nprobe 16 --tol 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import blas_line, load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402
from patchmosaic.metrics import pearson_r  # noqa: E402
from patchmosaic.patch_index import IndexedDenoiser, PatchIndex, measure_recall  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--kind", default="ivf", choices=["flat", "ivf", "ivfpq"])
    p.add_argument("--m", type=int, default=64, help="candidates per pixel")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--tol", type=float, default=1e-3, help="policy: largest allowed per-pixel bound")
    p.add_argument("--t-max", type=float, default=0.5, help="index steps only at t <= t_max")
    p.add_argument("--recall-pixels", type=int, default=256)
    p.add_argument("--cache", default=None, help="folder to keep the indexes in (reused by later runs)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "faiss_engine.json"))
    args = p.parse_args()

    x, _ = load("mnist", args.n_train)
    train = torch.from_numpy(x)
    mach = pm.ELS(train)
    ks = pm.kschedule.paper_schedule("MNIST_ResNet_zeros")
    grid = pm.sampling.time_grid(20)
    x1 = torch.randn(args.seeds, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"# {machine_line()}\n# {blas_line()}\n# MNIST N={args.n_train}, seeds={args.seeds}, kind={args.kind}, "
          f"m={args.m}, nprobe={args.nprobe}, tol={args.tol}", flush=True)

    # 1. indexes for every k used at t <= t_max
    index_ks = sorted({ks.k_at(t) for t in grid[:-1] if t <= args.t_max})
    builds, indexes = {}, {}
    for k in index_ks:
        r0 = rss_mib()
        t0 = time.perf_counter()
        folder = None if args.cache is None else os.path.join(args.cache, f"k{k}")
        idx = PatchIndex.open(folder, mach, k, kind=args.kind, nprobe=args.nprobe, nlist=args.nlist, progress=True)
        builds[k] = {"seconds": round(time.perf_counter() - t0, 1), "index_mib": round(idx.memory_bytes() / 2**20, 1),
                     "rss_growth_mib": round(rss_mib() - r0, 1), "keys": int(sum(len(p.keys) for p in idx.parts)),
                     "parts": len(idx.parts)}
        indexes[k] = idx
        print(f"index k={k}: {builds[k]}", flush=True)

    # 2. exact trajectory, timing each step; approximate path on the same x_t where t <= t_max
    steps = []
    xt = x1.clone()
    for i in range(20):
        t, t1 = float(grid[i]), float(grid[i + 1])
        k = ks.k_at(t)
        t0 = time.perf_counter()
        x0 = mach.denoise(xt, t, k)
        te = time.perf_counter() - t0
        row = {"t": t, "k": k, "exact_s": round(te, 3)}
        if t <= args.t_max:
            res = indexes[k].denoise(xt, t, None, args.m)
            err = (res.x0 - x0).abs().amax(1)
            row.update(approx_s=round(res.seconds, 3), speedup=round(te / res.seconds, 1),
                       bound_max=float(res.bound.max()), bound_median=float(res.bound.median()),
                       err_max=float(err.max()), err_mean=float(err.mean()),
                       bound_holds=bool(torch.all(err <= res.bound + 2e-5)),
                       recall=round(measure_recall(indexes[k], xt, t, m=args.m, n_pixels=args.recall_pixels), 4))
        steps.append(row)
        print(row, flush=True)
        xt = pm.sampling.update(mach.schedule, xt, x0, t, t1)
    exact_samples = xt

    # 3. the policy's samples
    pol = IndexedDenoiser(mach, ks, tol=args.tol, m=args.m, t_max=args.t_max, kind=args.kind, nprobe=args.nprobe,
                          nlist=args.nlist)
    pol.indexes.update(indexes)
    t0 = time.perf_counter()
    approx_samples = pm.ddim(pol, x1, steps=20, progress=False)
    policy_s = time.perf_counter() - t0
    r = pearson_r(exact_samples, approx_samples)
    out = {"n_train": args.n_train, "seeds": args.seeds, "kind": args.kind, "m": args.m, "nprobe": args.nprobe,
           "tol": args.tol, "t_max": args.t_max, "machine": machine_line(), "blas": blas_line(),
           "date": time.strftime("%Y-%m-%d"), "builds": builds, "steps": steps,
           "exact_total_s": round(sum(s["exact_s"] for s in steps), 1), "policy_total_s": round(policy_s, 1),
           "policy_record": pol.record, "r_median": float(np.median(r)), "r_min": float(np.min(r)),
           "max_abs_diff": float((exact_samples - approx_samples).abs().max()),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    print("\n| t | k | exact s | index s | speed-up | bound max | error max | recall |")
    print("|---|---|---|---|---|---|---|---|")
    for s in steps:
        if "approx_s" in s:
            print(f"| {s['t']:.2f} | {s['k']} | {s['exact_s']:.2f} | {s['approx_s']:.2f} | {s['speedup']:.1f}x | "
                  f"{s['bound_max']:.2e} | {s['err_max']:.2e} | {s['recall']:.3f} |")
    print(f"\npolicy: {sum(r['used'] == 'index' for r in pol.record)} of 20 steps on the index; samples vs exact: "
          f"median r {out['r_median']:.5f}, min r {out['r_min']:.5f}; exact 20 steps {out['exact_total_s']} s, "
          f"policy {out['policy_total_s']} s")


if __name__ == "__main__":
    main()
