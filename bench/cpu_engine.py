"""CPU engine vs the plain torch backend vs a float32 torch.matmul, side by side in one process.

Reports patch pairs per second (query pixel x key) and effective GFLOP/s (2 C k^2 flops per pair)
for the boundary-aware and periodic ELS machines. Example (the figures in bench/RESULTS.md):

    python bench/cpu_engine.py --data mnist --n-train 60000 --batch 1,8 --ks 3,5,7,11,15
    python bench/cpu_engine.py --data mnist --n-train 2000 --batch 1 --ks 3,7,11 --torch

The torch backend is timed on a subset of the training set (--torch-n-train) because it is slow;
pairs per second do not depend on the training-set size once it is large.

``--baseline DIR`` also times an older build of the package, loaded side by side in the same process
(``bench/make_baseline.sh COMMIT DIR`` builds one from a commit): each row then shows the baseline's time
and the ratio, measured interleaved (baseline, engine, baseline, engine, ...) so that the machine's noise
falls on both alike.

``--variants`` times every instruction-set variant of the CPU engine that this CPU runs (baseline x86-64-v2,
AVX2, AVX-512, native; ``patchmosaic.ops.cpu_variants()``), interleaved in the same way, and reports each
one's rate and its time relative to the variant chosen at import:

    python bench/cpu_engine.py --data mnist --n-train 10000 --batch 1 --ks 3,7,11 --machines els_zeros --variants
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import best_time, blas_line, load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402


def matmul_rate(d: int, rows: int = 1024, keys: int = 8192, repeat: int = 3) -> float:
    """GFLOP/s of a float32 (rows x d) @ (d x keys) torch.matmul: the same inner size as the machine."""
    a = torch.randn(rows, d)
    b = torch.randn(d, keys)
    torch.matmul(a, b)
    t = best_time(lambda: torch.matmul(a, b), repeat)
    return 2.0 * rows * d * keys / t / 1e9


def load_baseline(folder: str):
    """An older build of patchmosaic, installed as the package folder ``folder`` (any name)."""
    folder = os.path.abspath(folder)
    sys.path.insert(0, os.path.dirname(folder))
    return importlib.import_module(os.path.basename(folder))


def interleaved(fn_a, fn_b, repeat: int):
    """Best times of two functions run alternately ``repeat`` times each (after one warm-up call each)."""
    fn_a(), fn_b()
    ta = tb = float("inf")
    for _ in range(repeat):
        ta = min(ta, best_time(fn_a, 1))
        tb = min(tb, best_time(fn_b, 1))
    return ta, tb


def time_variants(fn, names, repeat: int):
    """Best time of ``fn`` under each CPU engine variant in ``names``, run round-robin ``repeat`` times."""
    chosen = pm.ops.cpu_variant()
    best = {}
    try:
        for name in names:
            pm.ops.use_cpu_variant(name)
            fn()
        for _ in range(repeat):
            for name in names:
                pm.ops.use_cpu_variant(name)
                best[name] = min(best.get(name, float("inf")), best_time(fn, 1))
    finally:
        pm.ops.use_cpu_variant(chosen)
    return best


def run(args):
    base = load_baseline(args.baseline) if args.baseline else None
    variants = list(pm.ops.cpu_variants()) if args.variants else []
    if variants:
        print(f"# CPU engine variants runnable here: {pm.ops.cpu_variants()}; chosen at import: {pm.ops.cpu_variant()}")
    peak = matmul_rate(2048, 2048, 2048)
    print(f"# float32 torch.matmul 2048^3: {peak:.1f} GFLOP/s (this machine's yardstick)")
    images, _ = load(args.data, args.n_train)
    N, C, H, W = images.shape
    rng = np.random.default_rng(0)
    rows = []
    for machine_name in args.machines.split(","):
        boundary = {"els_zeros": "zeros", "els_circular": "circular"}[machine_name]
        m = pm.ELS(images, boundary=boundary)
        m_small = pm.ELS(images[: args.torch_n_train], boundary=boundary)
        m_base = base.ELS(images, boundary=boundary) if base else None
        for B in [int(b) for b in args.batch.split(",")]:
            a, b2 = pm.schedules.cosine_legacy.coefficients(args.t)
            x = (a * images[rng.integers(0, N, B)] + np.sqrt(b2) * rng.standard_normal((B, C, H, W))).astype(np.float32)
            for k in [int(v) for v in args.ks.split(",")]:
                ks = m.keyset(H, W, k)
                pairs = ks.n_pairs_per_image() * N * B
                flops = 2.0 * C * k * k * pairs
                if base:
                    t_base, t_eng = interleaved(lambda: m_base.denoise(x, args.t, k, backend="cpu"),
                                                lambda: m.denoise(x, args.t, k, backend="cpu"), args.repeat)
                else:
                    t_eng = best_time(lambda: m.denoise(x, args.t, k, backend="cpu"), args.repeat)
                row = {"machine": machine_name, "data": args.data, "N": N, "C": C, "B": B, "k": k,
                       "engine_s": t_eng, "engine_pairs_per_s": pairs / t_eng, "engine_gflops": flops / t_eng / 1e9,
                       "matmul_gflops": matmul_rate(C * k * k)}
                row["engine_vs_matmul"] = row["engine_gflops"] / row["matmul_gflops"]
                if base:
                    row.update(baseline_s=t_base, baseline_vs_engine=t_base / t_eng)
                if variants:
                    tv = time_variants(lambda: m.denoise(x, args.t, k, backend="cpu"), variants, args.repeat)
                    row["variants"] = {name: {"s": s, "pairs_per_s": pairs / s, "vs_chosen": s / tv[pm.ops.cpu_variant()]}
                                       for name, s in tv.items()}
                if args.torch:
                    Ns = min(N, args.torch_n_train)
                    pairs_s = ks.n_pairs_per_image() * Ns * B
                    t_tor = best_time(lambda: m_small.denoise(x, args.t, k, backend="torch"), 1)
                    row.update(torch_s=t_tor, torch_pairs_per_s=pairs_s / t_tor)
                    row["engine_vs_torch"] = row["engine_pairs_per_s"] / row["torch_pairs_per_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows, args) -> str:
    head = "| machine | data | N | B | k | engine pairs/s | engine GFLOP/s | matmul GFLOP/s | engine/matmul |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    if args.torch:
        head += " torch pairs/s | engine/torch |"
        sep += "---|---|"
    if args.baseline:
        head += " baseline s | engine s | baseline time / engine time |"
        sep += "---|---|---|"
    names = list(rows[0].get("variants", {})) if rows else []
    for name in names:
        head += f" {name} pairs/s | {name} time / {pm.ops.cpu_variant()} time |"
        sep += "---|---|"
    out = [head, sep]
    for r in rows:
        line = (f"| {r['machine']} | {r['data']} | {r['N']} | {r['B']} | {r['k']} | {r['engine_pairs_per_s']:.3g} | "
                f"{r['engine_gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['engine_vs_matmul']:.0%} |")
        if args.torch:
            line += f" {r['torch_pairs_per_s']:.3g} | {r['engine_vs_torch']:.1f}x |"
        if args.baseline:
            line += f" {r['baseline_s']:.3f} | {r['engine_s']:.3f} | {r['baseline_vs_engine']:.3f} |"
        for name in names:
            v = r["variants"][name]
            line += f" {v['pairs_per_s']:.3g} | {v['vs_chosen']:.2f} |"
        out.append(line)
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", choices=["mnist", "cifar10"])
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--ks", default="3,5,7,11,15")
    p.add_argument("--machines", default="els_zeros,els_circular")
    p.add_argument("--t", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--torch", action="store_true", help="also time the plain torch backend")
    p.add_argument("--torch-n-train", type=int, default=500)
    p.add_argument("--baseline", help="folder of an older build of the package to time side by side")
    p.add_argument("--variants", action="store_true",
                   help="also time every CPU engine variant (instruction-set level) this CPU runs")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} | {machine_line()} | torch {torch.__version__} threads={torch.get_num_threads()}"
          f" | engine threads={pm.ops.max_threads()} | CPU engine {pm.ops.cpu_variant()} | {blas_line()}")
    rows = run(args)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
