"""The CUDA engine on the GPU (issue 7), in one run: boundary-aware ELS on all 60,000 MNIST images
(32x32, the paper's preprocessing) at k = 3, 7, 11, 15 and B = 1, 16.

Phases, each saved to --json as soon as it is done (a run cut short keeps what it measured):
1. per (k, B): the CUDA engine's time per denoiser call (median of --reps after a warm-up, CUDA events),
   its rate in float32 multiply-adds counted as 2 flops (the dot products of every query patch with
   every key patch: the work a dense formulation does), against the rate of a float32 matrix product of
   comparable size (tf32 off) as the ceiling; also, at B = 1, the CUDA time with other shared-memory
   budgets for the query patches (--smem-kb; 0 = gathered per key tile);
2. the end-to-end time of a 20-step DDIM sample of --seeds seeds with the paper's calibrated MNIST
   ResNet k-schedule;
3. the same calls through the ``"torch"`` backend on the GPU, skipped where the B = 1 call predicts
   more than --torch-budget-s;
4. agreement with the CPU engine (float64) at B = 1.
Prints markdown tables at the end.

    python bench/gpu_engine.py --json bench/results/gpu_engine.json

Smoke test of the script itself on a machine without a GPU (the kernels under the test suite's CPU
emulator; every phase runs, the times mean nothing; about 12 minutes on 2 cores):

    python bench/gpu_engine.py --emulate --n-train 20 --ks 3 7 --batches 1 2 --seeds 2 --reps 1 --json /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402


def timer(dev: torch.device):
    """fn, reps -> median seconds of fn() over reps runs after one warm-up (CUDA events on a GPU)."""

    def cuda_time(fn, reps: int) -> float:
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

    def host_time(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return cuda_time if dev.type == "cuda" else host_time


def call_flops(mach, B: int, k: int) -> float:
    """2 x (query patches x keys x patch size) of one call: the dense dot-product work."""
    ks = mach.keyset(32, 32, k)
    pairs = ks.n_pairs_per_image()  # query pixels x key positions, per (query image, training image)
    return 2.0 * B * pairs * mach.N * mach.C * k * k


def matmul_rate(d: int, dev: torch.device, gpu_time, size=(16384, 65536)) -> float:
    """float32 flop/s of a (m x d) @ (d x n) product, tf32 off: a dot-product ceiling."""
    torch.backends.cuda.matmul.allow_tf32 = False
    A = torch.randn(size[0], d, device=dev)
    Bm = torch.randn(d, size[1], device=dev)
    s = gpu_time(lambda: A @ Bm, 5)
    return 2.0 * size[0] * size[1] * d / s


def save(path: str, res: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 7, 11, 15])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--t", type=float, default=0.3)
    p.add_argument("--smem-kb", type=int, nargs="*", default=[0, 112],
                   help="also time these budgets for resident query patches (PATCHMOSAIC_CUDA_QUERY_SMEM_KB)")
    p.add_argument("--torch-budget-s", type=float, default=30.0,
                   help="skip a torch-backend call predicted (from its B = 1 time) to take longer than this")
    p.add_argument("--cpu-check", action="store_true", default=True)
    p.add_argument("--no-cpu-check", dest="cpu_check", action="store_false")
    p.add_argument("--seeds", type=int, default=16, help="seeds of the end-to-end 20-step sample")
    p.add_argument("--emulate", action="store_true",
                   help="smoke test of this script without a GPU: the kernels under the test suite's CPU emulator")
    p.add_argument("--json", default=os.path.join(HERE, "results", "gpu_engine.json"))
    args = p.parse_args()
    if args.emulate:
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        import cuda_emulation
        from patchmosaic.ops import engines

        engines._EMULATOR = cuda_emulation.module()
        dev, name, mm_size = torch.device("cpu"), "CPU emulator (smoke test; times mean nothing)", (256, 1024)
    else:
        if not pm.cuda_available():
            raise SystemExit("the CUDA engine cannot run here: " + ("no CUDA device" if pm.ops.cuda_built()
                                                                     else "this build has no CUDA engine"))
        dev, name, mm_size = torch.device("cuda"), torch.cuda.get_device_name(), (16384, 65536)
    gpu_time = timer(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x_np, _ = load("mnist", args.n_train)
    train_cpu = torch.from_numpy(x_np)
    gpu = pm.ELS(train_cpu.to(dev))
    cpu = pm.ELS(train_cpu)
    print(f"# {name}; host {machine_line()}; torch {torch.__version__}; MNIST N={args.n_train}", flush=True)
    res = {"device": name, "host": machine_line(), "torch": torch.__version__, "n_train": args.n_train, "t": args.t,
           "date": time.strftime("%Y-%m-%d"), "rows": []}
    queries = {(k, B): torch.randn(B, 1, 32, 32, device=dev, generator=torch.Generator(dev).manual_seed(k * 100 + B))
               for k in args.ks for B in args.batches}

    # 1. the CUDA engine against the matmul ceiling, and the shared-memory budgets
    for k in args.ks:
        rate_mm = matmul_rate(k * k, dev, gpu_time, mm_size)
        for B in args.batches:
            x = queries[k, B]
            s_cuda = gpu_time(lambda: gpu.denoise(x, args.t, k, backend="cuda"), args.reps)
            fl = call_flops(gpu, B, k)
            row = {"k": k, "B": B, "cuda_s": s_cuda, "cuda_tflops": fl / s_cuda / 1e12,
                   "matmul_tflops": rate_mm / 1e12, "fraction_of_matmul": fl / s_cuda / rate_mm}
            for kb in args.smem_kb if B == 1 else []:  # per block the same work at any B; B = 1 is cheap
                os.environ["PATCHMOSAIC_CUDA_QUERY_SMEM_KB"] = str(kb)
                row[f"cuda_s_smem{kb}kb"] = gpu_time(lambda: gpu.denoise(x, args.t, k, backend="cuda"), args.reps)
            os.environ.pop("PATCHMOSAIC_CUDA_QUERY_SMEM_KB", None)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            save(args.json, res)

    # 2. end to end: 20 DDIM steps with the paper's calibrated MNIST ResNet k-schedule
    ks = pm.kschedule.paper_schedule("MNIST_ResNet_zeros")
    x1 = torch.randn(args.seeds, 1, 32, 32, device=dev, generator=torch.Generator(dev).manual_seed(0))
    den = pm.MachineDenoiser(gpu, ks, backend="cuda")
    sync()
    t0 = time.perf_counter()
    out = pm.ddim(den, x1, steps=20, progress=False)
    sync()
    e2e = time.perf_counter() - t0
    res.update(end_to_end_20_steps_s=e2e, e2e_seeds=args.seeds, e2e_sample_range=[float(out.min()), float(out.max())])
    print(json.dumps({"end_to_end_20_steps_s": e2e, "seeds": args.seeds}), flush=True)
    save(args.json, res)

    # 3. the torch backend on the same device, within a time budget
    for row in res["rows"]:
        k, B = row["k"], row["B"]
        one = next((r.get("torch_s") for r in res["rows"] if r["k"] == k and r["B"] == 1), None)
        if B != 1 and (one is None or one * B > args.torch_budget_s):
            row["torch_skipped"] = f"predicted {B} x {one} s" if one else "no B = 1 time"
            continue
        try:
            row["torch_s"] = gpu_time(lambda: gpu.denoise(queries[k, B], args.t, k, backend="torch"), 1)
            row["speedup_vs_torch"] = row["torch_s"] / row["cuda_s"]
        except (RuntimeError, pm.ResourceError) as e:
            row["torch_error"] = str(e).splitlines()[0][:160]
        print(json.dumps({key: row[key] for key in ("k", "B", "torch_s", "speedup_vs_torch", "torch_error",
                                                    "torch_skipped") if key in row}), flush=True)
        save(args.json, res)

    # 4. agreement with the CPU engine in float64 at B = 1
    if args.cpu_check:
        for row in res["rows"]:
            if row["B"] != 1:
                continue
            x = queries[row["k"], 1]
            ref = cpu.denoise(x.cpu().double(), args.t, row["k"])
            got = gpu.denoise(x, args.t, row["k"], backend="cuda").cpu().double()
            err = (got - ref).abs()
            row.update(max_abs_err_vs_cpu64=float(err.max()), mean_abs_err_vs_cpu64=float(err.mean()))
            print(json.dumps({"k": row["k"], "max_abs_err_vs_cpu64": row["max_abs_err_vs_cpu64"]}), flush=True)
            save(args.json, res)

    print("\n| k | B | CUDA s | CUDA TFLOP/s | fp32 matmul TFLOP/s | share of matmul | torch s | CUDA vs torch | max err vs CPU |"
          + "".join(f" s, query smem {kb} KB |" for kb in args.smem_kb))
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(args.smem_kb))
    for r in res["rows"]:
        ts = f"{r['torch_s']:.3f}" if "torch_s" in r else r.get("torch_error", r.get("torch_skipped", ""))
        sp = f"{r['speedup_vs_torch']:.1f}x" if "speedup_vs_torch" in r else ""
        er = f"{r['max_abs_err_vs_cpu64']:.1e}" if "max_abs_err_vs_cpu64" in r else ""
        print(f"| {r['k']} | {r['B']} | {r['cuda_s']:.4f} | {r['cuda_tflops']:.1f} | {r['matmul_tflops']:.1f} | "
              f"{r['fraction_of_matmul']:.0%} | {ts} | {sp} | {er} |"
              + "".join(f" {r[f'cuda_s_smem{kb}kb']:.4f} |" if f"cuda_s_smem{kb}kb" in r else " |"
                        for kb in args.smem_kb))
    print(f"\nend to end: 20 DDIM steps, {args.seeds} seeds, calibrated MNIST ResNet k-schedule: {e2e:.2f} s")


if __name__ == "__main__":
    main()
