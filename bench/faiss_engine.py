"""FAISS patch index vs the exact CPU engine: boundary-aware ELS on MNIST with the paper's MNIST ResNet
k-schedule (issue 6).

Measures, in one (resumable) run:

1. index build time and memory per k (indexes are built when first needed and kept under --cache);
2. the exact engine's 20-step DDIM trajectory for --seeds evaluation seeds and --calib-seeds separate
   calibration seeds, timing each exact call on the evaluation batch (saved after every step under
   --cache; a rerun resumes it, and reruns with other index settings reuse it); then at every step with
   t <= --t-max the approximate (index) call on the same x_t: its time, the per-pixel error bound, the
   fraction of pixels whose bound exceeds --tol, the measured error against the exact engine, and (at
   the first step of each k) the recall of the m nearest keys against brute force;
3. the switch time t_s chosen on the calibration seeds by measured agreement
   (:func:`patchmosaic.calibrate_t_max`, target --target-r);
4. the policy's samples on the evaluation seeds (index at every t <= t_s, exact above) against the
   exact engine's samples: Pearson r per seed (median, min). DDIM is deterministic and the policy runs
   exactly at t > t_s, so its run starts from the exact trajectory's x_t at t_s instead of recomputing
   the identical prefix; the reported policy time adds that prefix's measured exact time.

The exact trajectory is saved as npz (no pickles) and JSON; indexes are saved per k under --cache.

    python bench/faiss_engine.py --n-train 60000 --seeds 16 --calib-seeds 2 --kind auto
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
from patchmosaic import IndexedDenoiser, PatchIndex  # noqa: E402
from patchmosaic.index import measure_recall  # noqa: E402
from patchmosaic.io.runstate import write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def exact_x0(schedule, x, x_next, t, t_next):
    """The x0 a deterministic DDIM step from x (at t) to x_next (at t_next) used."""
    if t_next <= 0:
        return x_next
    a, b, a1, c, _ = pm.sampling.step_coefficients(schedule, t, t_next)
    return ((x_next.double() - (c / b) * x.double()) / (a1 - c * a / b)).float()


def save_states(path, states, rows):
    np.savez(path + ".tmp.npz", states=np.stack([s.numpy() for s in states]))
    os.replace(path + ".tmp.npz", path + ".npz")
    write_json(path + ".json", rows)


def load_states(path, x1):
    if not os.path.exists(path + ".npz") or not os.path.exists(path + ".json"):
        return [x1], []
    with np.load(path + ".npz", allow_pickle=False) as z:
        st = z["states"]
    with open(path + ".json") as f:
        rows = json.load(f)
    if st.shape[1:] != tuple(x1.shape) or not np.array_equal(st[0], x1.numpy()) or len(rows) != len(st) - 1:
        raise SystemExit(f"{path}.npz belongs to another run (other seeds or sizes); remove it or use another --cache")
    return [torch.from_numpy(s) for s in st], rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--seeds", type=int, default=16, help="evaluation seeds")
    p.add_argument("--calib-seeds", type=int, default=2, help="calibration seeds (other noise than the evaluation)")
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "ivfpq"],
                   help="auto: IVF-Flat while the raw vectors fit in --ivf-gib, else IVF-PQ")
    p.add_argument("--ivf-gib", type=float, default=3.0)
    p.add_argument("--m", type=int, default=64, help="candidates per pixel")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--pq-m", type=int, default=32)
    p.add_argument("--tol", type=float, default=1e-3, help="bound tolerance (reported: fraction of pixels above it)")
    p.add_argument("--target-r", type=float, default=0.999, help="calibration: smallest allowed Pearson r")
    p.add_argument("--t-max", type=float, default=0.5, help="index steps only at t <= t_max")
    p.add_argument("--recall-pixels", type=int, default=64)
    p.add_argument("--cache", default=None, help="folder for indexes and the exact trajectory "
                   "(default bench/results/cache/faiss_n<N>; git-ignored)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "faiss_engine.json"))
    args = p.parse_args()
    cache = args.cache or os.path.join(HERE, "results", "cache", f"faiss_n{args.n_train}")
    os.makedirs(cache, exist_ok=True)

    x, _ = load("mnist", args.n_train)
    mach = pm.ELS(torch.from_numpy(x))
    ks = pm.kschedule.paper_schedule("MNIST_ResNet_zeros")
    grid = pm.sampling.time_grid(20)
    S, Sc = args.seeds, args.calib_seeds
    x1 = torch.randn(S + Sc, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"# {machine_line()}\n# {blas_line()}\n# MNIST N={args.n_train}, seeds={S}+{Sc} calibration, "
          f"kind={args.kind}, m={args.m}, nprobe={args.nprobe}, pq_m={args.pq_m}, cache={cache}", flush=True)

    # 1. indexes, built (or loaded) when a step first needs them
    builds_path = os.path.join(cache, "builds.json")
    builds = json.load(open(builds_path)) if os.path.exists(builds_path) else {}
    indexes = {}

    def index_for(k):
        if k in indexes:
            return indexes[k]
        folder = os.path.join(cache, f"k{k}")
        cached = os.path.exists(os.path.join(folder, "manifest.json"))
        kind = args.kind
        if kind == "auto":
            kind = "ivf" if args.n_train * 1024 * 0.8 * k * k * 4 <= args.ivf_gib * 2**30 else "ivfpq"
        r0, t0 = rss_mib(), time.perf_counter()
        idx = PatchIndex.open(folder, mach, k, kind=kind, nprobe=args.nprobe, nlist=args.nlist, pq_m=args.pq_m,
                              progress=True)
        row = {"kind": kind, "load_or_build_s": round(time.perf_counter() - t0, 1),
               "build_s": round(idx.build_seconds, 1), "index_mib": round(idx.memory_bytes() / 2**20, 1),
               "rss_growth_mib": round(rss_mib() - r0, 1), "keys": int(sum(len(q.keys) for q in idx.parts)),
               "keys_before_merge": int(sum(q.n_total for q in idx.parts)), "parts": len(idx.parts),
               "loaded_from_cache": cached}
        if not cached or str(k) not in builds:
            builds[str(k)] = row
            write_json(builds_path, builds)
        print(f"index k={k}: {row}", flush=True)
        indexes[k] = idx
        return idx

    # 2. the exact trajectory (evaluation and calibration seeds as two calls), the index on the same x_t
    spath = os.path.join(cache, f"exact_s{S}_c{Sc}")
    states, steps = load_states(spath, x1)
    if steps:
        print(f"resuming the exact trajectory after {len(steps)} steps", flush=True)
    for i in range(len(steps), 20):
        t, t1 = float(grid[i]), float(grid[i + 1])
        k = ks.k_at(t)
        xt = states[-1]
        t0 = time.perf_counter()
        x0e = mach.denoise(xt[:S], t, k)
        te = time.perf_counter() - t0
        x0 = torch.cat([x0e, mach.denoise(xt[S:], t, k)]) if Sc else x0e
        steps.append({"t": t, "k": k, "exact_s": round(te, 3)})
        states.append(pm.sampling.update(mach.schedule, xt, x0, t, t1))
        save_states(spath, states, steps)
        print(steps[-1], flush=True)
    exact_samples = states[-1][:S]

    # the index on the same x_t as the exact engine. Only the states are kept; DDIM is deterministic, so
    # the exact x0 of step i follows from x_t and x_next: x_next = a' x0 + c (x_t - a x0) / b (float64;
    # the inversion's rounding, ~1e-6, is far below the errors measured).
    seen_k = set()
    for i, row in enumerate(steps):
        t, k = row["t"], row["k"]
        row = {"t": t, "k": k, "exact_s": row["exact_s"]}
        steps[i] = row
        if t > args.t_max:
            continue
        xt = states[i][:S]
        x0e = exact_x0(mach.schedule, xt, states[i + 1][:S], t, float(grid[i + 1]))
        res = index_for(k).denoise(xt, t, None, args.m)
        err = (res.x0 - x0e).abs().amax(1)
        row.update(approx_s=round(res.seconds, 3), speedup=round(row["exact_s"] / res.seconds, 1),
                   bound_max=float(res.bound.max()), bound_median=float(res.bound.median()),
                   over_tol=float((res.bound > args.tol).float().mean()),
                   err_max=float(err.max()), err_mean=float(err.mean()),
                   bound_holds=bool(torch.all(err <= res.bound + 2e-5)))
        if k not in seen_k:
            seen_k.add(k)
            row["recall"] = round(measure_recall(indexes[k], xt, t, m=args.m, n_pixels=args.recall_pixels), 4)
        print(row, flush=True)

    # 3. switch time by measured agreement on the calibration seeds
    for k in sorted({ks.k_at(float(t)) for t in grid[:-1] if t <= args.t_max}):
        index_for(k)
    t0 = time.perf_counter()
    t_s, calib = pm.calibrate_t_max(mach, ks, x1[S:], target_r=args.target_r, t_max=args.t_max, m=args.m,
                                    states=[s[S:] for s in states], indexes=indexes)
    calib_s = time.perf_counter() - t0
    print(f"calibration: t_s = {t_s}; {calib}", flush=True)

    # 4. the policy on the evaluation seeds
    pol = IndexedDenoiser(mach, ks, m=args.m, t_max=t_s, mode="measured")
    pol.indexes.update(indexes)
    i0 = int(np.argmax(grid <= t_s + 1e-9)) if t_s > 0 else 20
    xt = states[i0][:S].clone()
    t0 = time.perf_counter()
    for i in range(i0, 20):
        t, t1 = float(grid[i]), float(grid[i + 1])
        xt = pm.sampling.update(mach.schedule, xt, pol(xt, t), t, t1)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in pol.record[-1].items()}, flush=True)
    policy_s = time.perf_counter() - t0 + sum(s["exact_s"] for s in steps[:i0])
    r = pearson_r(exact_samples, xt)
    out = {"n_train": args.n_train, "seeds": S, "calib_seeds": Sc, "kind": args.kind, "m": args.m,
           "nprobe": args.nprobe, "pq_m": args.pq_m, "tol": args.tol, "t_max": args.t_max, "target_r": args.target_r,
           "machine": machine_line(), "blas": blas_line(), "date": time.strftime("%Y-%m-%d"), "builds": builds,
           "steps": steps, "t_switch": t_s, "calibration": calib, "calibration_s": round(calib_s, 1),
           "exact_total_s": round(sum(s["exact_s"] for s in steps), 1), "policy_total_s": round(policy_s, 1),
           "policy_record": pol.record, "r": [float(v) for v in r], "r_median": float(np.median(r)),
           "r_min": float(np.min(r)), "max_abs_diff": float((exact_samples - xt).abs().max()),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    write_json(args.json, out)
    print("\n| k | index | build s | index MiB | keys (merged / all) |")
    print("|---|---|---|---|---|")
    for k, b in sorted(builds.items(), key=lambda kv: int(kv[0])):
        print(f"| {k} | {b['kind']} | {b['build_s']} | {b['index_mib']} | {b['keys']:,} / {b['keys_before_merge']:,} |")
    print("\n| t | k | exact s | index s | speed-up | bound median | bound > tol | error mean | error max | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        if "approx_s" in s:
            rec = f"{s['recall']:.3f}" if "recall" in s else ""
            print(f"| {s['t']:.2f} | {s['k']} | {s['exact_s']:.2f} | {s['approx_s']:.2f} | {s['speedup']:.1f}x | "
                  f"{s['bound_median']:.1e} | {s['over_tol']:.1%} | {s['err_mean']:.1e} | {s['err_max']:.1e} | {rec} |")
    print(f"\npolicy (t_s = {t_s} from {Sc} calibration seeds): {sum(e['used'] == 'index' for e in pol.record)} of 20 "
          f"steps on the index; {S} samples vs exact: median r {out['r_median']:.5f}, min r {out['r_min']:.5f}; "
          f"exact 20 steps {out['exact_total_s']} s, policy {out['policy_total_s']} s")


if __name__ == "__main__":
    main()
