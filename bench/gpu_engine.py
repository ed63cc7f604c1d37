"""The CUDA engine on the GPU (issue 7), in one run: boundary-aware ELS on all 60,000 MNIST images
(32x32, the paper's preprocessing) at k = 3, 7, 11, 15 and B = 1, 16.

Per (k, B): the CUDA engine's time per denoiser call (median of --reps after a warm-up, CUDA events),
its rate in float32 multiply-adds counted as 2 flops (the dot products of every query patch with every
key patch: the work a dense formulation does), the same call through the ``"torch"`` backend on the
GPU, and the rate of a float32 matrix product of comparable size (tf32 off) as the ceiling; and its
agreement with the CPU engine at B = 1 (the CPU engine runs on this machine's cores); the CUDA time
also with other shared-memory budgets for the query patches (--smem-kb; 0 = gathered per key tile). Then the
end-to-end time of a 20-step DDIM sample of --seeds seeds with the paper's calibrated MNIST ResNet
k-schedule. Writes --json and prints markdown tables.

    python bench/gpu_engine.py --json bench/results/gpu_engine.json
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


def gpu_time(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return float(np.median(times))


def call_flops(mach, B: int, k: int) -> float:
    """2 x (query patches x keys x patch size) of one call: the dense dot-product work."""
    ks = mach._keyset(32, 32, k)
    pairs = ks.n_pairs_per_image()  # query pixels x key positions, per (query image, training image)
    return 2.0 * B * pairs * mach.N * mach.C * k * k


def matmul_rate(d: int) -> float:
    """float32 flop/s of a (16384 x d) @ (d x 65536) product, tf32 off: a dot-product ceiling."""
    torch.backends.cuda.matmul.allow_tf32 = False
    A = torch.randn(16384, d, device="cuda")
    Bm = torch.randn(d, 65536, device="cuda")
    s = gpu_time(lambda: A @ Bm, 5)
    return 2.0 * 16384 * 65536 * d / s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 7, 11, 15])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--t", type=float, default=0.3)
    p.add_argument("--torch-budget-s", type=float, default=60.0,
                   help="skip the torch backend where its B=1 call took longer than this")
    p.add_argument("--smem-kb", type=int, nargs="*", default=[0, 112],
                   help="also time these budgets for resident query patches (PATCHMOSAIC_CUDA_QUERY_SMEM_KB)")
    p.add_argument("--cpu-check", action="store_true", default=True)
    p.add_argument("--no-cpu-check", dest="cpu_check", action="store_false")
    p.add_argument("--seeds", type=int, default=16, help="seeds of the end-to-end 20-step sample")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "gpu_engine.json"))
    args = p.parse_args()
    if not pm.cuda_available():
        from patchmosaic.backends import cuda as cuda_backend

        raise SystemExit("the CUDA engine cannot run here: " + ("no CUDA device" if cuda_backend.built()
                                                                 else "this build has no CUDA engine"))
    dev = torch.device("cuda")
    x_np, _ = load("mnist", args.n_train)
    train_cpu = torch.from_numpy(x_np)
    gpu = pm.ELS(train_cpu.to(dev))
    cpu = pm.ELS(train_cpu)
    name = torch.cuda.get_device_name()
    print(f"# {name}; host {machine_line()}; torch {torch.__version__}; MNIST N={args.n_train}", flush=True)
    rows, torch_slow = [], set()
    for k in args.ks:
        rate_mm = matmul_rate(k * k)
        for B in args.batches:
            x = torch.randn(B, 1, 32, 32, device=dev, generator=torch.Generator(dev).manual_seed(k * 100 + B))
            s_cuda = gpu_time(lambda: gpu.denoise(x, args.t, k, backend="cuda"), args.reps)
            fl = call_flops(gpu, B, k)
            row = {"k": k, "B": B, "cuda_s": s_cuda, "cuda_tflops": fl / s_cuda / 1e12,
                   "matmul_tflops": rate_mm / 1e12, "fraction_of_matmul": fl / s_cuda / rate_mm}
            # the same call with the query patches gathered per key tile (budget 0) and resident up to
            # a larger shared-memory budget (the default is 48 KB): which threshold should be default
            for kb in args.smem_kb:
                os.environ["PATCHMOSAIC_CUDA_QUERY_SMEM_KB"] = str(kb)
                row[f"cuda_s_smem{kb}kb"] = gpu_time(lambda: gpu.denoise(x, args.t, k, backend="cuda"), args.reps)
            os.environ.pop("PATCHMOSAIC_CUDA_QUERY_SMEM_KB", None)
            if k not in torch_slow:
                t0 = time.perf_counter()
                try:
                    s_torch = gpu_time(lambda: gpu.denoise(x, args.t, k, backend="torch"), 1)
                    row.update(torch_s=s_torch, speedup_vs_torch=s_torch / s_cuda)
                    if s_torch > args.torch_budget_s:
                        torch_slow.add(k)
                except (RuntimeError, pm.ResourceError) as e:
                    row["torch_error"] = str(e).splitlines()[0][:160]
                    torch_slow.add(k)
                row["torch_wall_s"] = time.perf_counter() - t0
            if args.cpu_check and B == 1:
                ref = cpu.denoise(x.cpu().double(), args.t, k)
                got = gpu.denoise(x, args.t, k).cpu().double()
                err = (got - ref).abs()
                row.update(max_abs_err_vs_cpu64=float(err.max()), mean_abs_err_vs_cpu64=float(err.mean()))
            rows.append(row)
            print(json.dumps(row), flush=True)

    # end to end: 20 DDIM steps with the paper's calibrated MNIST ResNet k-schedule
    ks = pm.kschedule.paper_schedule("MNIST_ResNet_zeros")
    x1 = torch.randn(args.seeds, 1, 32, 32, device=dev, generator=torch.Generator(dev).manual_seed(0))
    den = pm.MachineDenoiser(gpu, ks)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pm.ddim(den, x1, steps=20, progress=False)
    torch.cuda.synchronize()
    e2e = time.perf_counter() - t0
    print(json.dumps({"end_to_end_20_steps_s": e2e, "seeds": args.seeds}), flush=True)

    res = {"device": name, "host": machine_line(), "torch": torch.__version__, "n_train": args.n_train, "t": args.t,
           "date": time.strftime("%Y-%m-%d"), "rows": rows, "end_to_end_20_steps_s": e2e, "e2e_seeds": args.seeds,
           "e2e_sample_range": [float(out.min()), float(out.max())]}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    print("\n| k | B | CUDA s | CUDA TFLOP/s | fp32 matmul TFLOP/s | share of matmul | torch s | CUDA vs torch | max err vs CPU |"
          + "".join(f" s, query smem {kb} KB |" for kb in args.smem_kb))
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(args.smem_kb))
    for r in rows:
        ts = f"{r['torch_s']:.3f}" if "torch_s" in r else r.get("torch_error", "skipped")
        sp = f"{r['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in r else ""
        er = f"{r['max_abs_err_vs_cpu64']:.1e}" if "max_abs_err_vs_cpu64" in r else ""
        print(f"| {r['k']} | {r['B']} | {r['cuda_s']:.4f} | {r['cuda_tflops']:.1f} | {r['matmul_tflops']:.1f} | "
              f"{r['fraction_of_matmul']:.0%} | {ts} | {sp} | {er} |"
              + "".join(f" {r[f'cuda_s_smem{kb}kb']:.4f} |" for kb in args.smem_kb))
    print(f"\nend to end: 20 DDIM steps, {args.seeds} seeds, calibrated MNIST ResNet k-schedule: {e2e:.2f} s")


if __name__ == "__main__":
    main()
