"""The Triton engine on a GPU (issue 26), in one process: autotune, then time it against the CUDA engine, float32
attention and bfloat16 FlashAttention on the same work, check it against the CUDA engine in float64, time its
backward pass and the 20-step calibrated sample, and write the measured table that ``backend="auto"`` reads.

Work: 60,000 MNIST digits (32x32, the paper's preprocessing), boundary-aware and periodic ELS, k = 3, 7, 11, B = 1
and 16, t = 0.3; CIFAR-10 (the 10,000 images of ../shared, C = 3) at k = 3, 7, B = 1. Phases, each saved to --json
as it finishes (a run cut short keeps what it measured):

1. autotune: the first call of each kernel shape runs Triton's autotuner (its compile and trial time is reported);
2. per (data, machine, k, B): seconds per call (CUDA events, median of --reps after the tuned warm-up) of the Triton
   engine and the CUDA engine (B = 16 on the CUDA engine only at k = 7, boundary-aware: 4 s a call), patch pairs
   per second, the largest difference from the CUDA engine's float64 output (B = 1), and the share of key tiles
   whose exponentials were skipped;
3. periodic ELS as PyTorch attention on the same queries and keys (keys and values built beforehand, not timed;
   chunks of keys merged by log-sum-exp): memory-efficient attention in float32 and FlashAttention in bfloat16, with
   their largest difference from the CUDA engine's float64 output;
4. the backward pass at k = 7, B = 1: Triton forward + CUDA backward against CUDA forward + backward;
5. the 20-step DDIM sample of --seeds seeds with the paper's calibrated MNIST ResNet k-schedule on the Triton
   engine (twice: the first tunes the schedule's other sizes), against the goal of 8 s;
6. ``--auto-table FILE``: the rows with both engines' times as the measured table of ``backend="auto"``
   (ops/triton_engine/auto.py), under this GPU's name.

    python bench/gpu_triton.py --json $OUT/gpu_triton.json --auto-table $OUT/auto_table.json

Smoke test of the script on a machine without a GPU (the kernels under Triton's interpreter, the CPU engine in the
CUDA engine's place, no attention phase; every other phase runs, the times mean nothing; a few minutes):

    TRITON_INTERPRET=1 python bench/gpu_triton.py --smoke --json /tmp/gpu_triton_smoke.json
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
from patchmosaic.ops import triton_engine  # noqa: E402

GOALS = {"k7_B1_s": 0.04, "k7_B16_s": 0.4, "k3_pairs_per_s": 1.5e12, "sample_20_steps_16_seeds_s": 8.0}


def timer(dev: torch.device):
    """fn, reps -> median seconds of fn() over reps runs (CUDA events on a GPU), after one warm-up call."""

    def run(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return run


def save(path: str, res: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def machine(kind: str, train: torch.Tensor):
    return pm.ELS(train) if kind == "els_zeros" else pm.ELS(train, boundary="circular")


def pairs(m, B: int, k: int, H: int, W: int) -> int:
    return int(B * m.keyset(H, W, k).n_pairs_per_image() * m.N)


def skipped_share(m, x, t, k) -> float:
    triton_engine.settings.count = True
    try:
        m.denoise(x, t, k, backend="triton")
        c = dict(triton_engine.tuning.last_counts)
    finally:
        triton_engine.settings.count = False
    return c["skipped"] / max(1, c["key_tiles"])


# ------------------------------------------------------------------------------ attention baselines
def attention_keys(train: torch.Tensor, k: int, a: float, chunk_images: int = 2048):
    """Periodic ELS with interior keys as attention, the keys' side: keys ``[2 a K, -a^2 |K|^2]`` (fully-inside
    training patches K) and values (their centre pixels), the head dimension padded to a multiple of 8
    (FlashAttention's rule), values padded to it too."""
    import torch.nn.functional as F

    N, C, H, W = train.shape
    d = C * k * k
    D = -(-(d + 1) // 8) * 8
    Ks, Vs = [], []
    centre = (k * k) // 2  # channel c's centre element is c k^2 + centre
    for i in range(0, N, chunk_images):
        p = F.unfold(train[i:i + chunk_images], k).transpose(1, 2).reshape(-1, d)
        K = torch.zeros(p.shape[0], D, device=train.device)
        K[:, :d], K[:, d] = 2 * a * p, -(a * a) * (p * p).sum(1)
        V = torch.zeros(p.shape[0], D, device=train.device)
        V[:, :C] = p[:, [c * k * k + centre for c in range(C)]]
        Ks.append(K)
        Vs.append(V)
    return torch.cat(Ks), torch.cat(Vs)


def attention_queries(x: torch.Tensor, k: int, D: int):
    """The queries' side: ``[P, 1]`` (circularly padded query patches P), padded to ``D``."""
    import torch.nn.functional as F

    r, d = k // 2, x.shape[1] * k * k
    q = F.unfold(F.pad(x, (r, r, r, r), mode="circular"), k).transpose(1, 2).reshape(-1, d)
    Q = torch.zeros(q.shape[0], D, device=x.device)
    Q[:, :d], Q[:, d] = q, 1.0
    return Q


def attention_operands(train: torch.Tensor, x: torch.Tensor, k: int, a: float, chunk_images: int = 2048):
    """``(Q, K, V)`` of periodic ELS as attention (scale ``s = 1 / (2 b^2)``)."""
    K, V = attention_keys(train, k, a, chunk_images)
    return attention_queries(x, k, K.shape[1]), K, V


def attention(op: str, Q, K, V, scale: float, dtype, chunk: int):
    """softmax(scale Q K^T) V over all keys, in chunks of keys merged by log-sum-exp: (rows, C) float64."""
    q = Q.to(dtype)[None, None]
    outs, lses = [], []
    for s in range(0, K.shape[0], chunk):
        k, v = K[s:s + chunk].to(dtype)[None, None], V[s:s + chunk].to(dtype)[None, None]
        if op == "flash":
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
        elif op == "math":  # the smoke test's stand-in (CPU): the same operands, plain torch
            logit = scale * (q[0, 0].double() @ k[0, 0].double().T)
            res = (torch.softmax(logit, 1) @ v[0, 0].double())[None, None], torch.logsumexp(logit, 1)[None, None]
        else:
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)
        outs.append(res[0][0, 0].double())
        lses.append(res[1][0, 0, :Q.shape[0]].double())
    w = torch.softmax(torch.stack(lses), 0)
    return (w[..., None] * torch.stack(outs)).sum(0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--n-cifar", type=int, default=10000)
    p.add_argument("--ks", type=int, nargs="+", default=[3, 7, 11])
    p.add_argument("--cifar-ks", type=int, nargs="+", default=[3, 7])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--machines", nargs="+", default=["els_zeros", "els_circular"])
    p.add_argument("--t", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--attention-chunk", type=int, default=8_000_000, help="keys per attention call (smoke: 500)")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny sizes, the interpreter, the CPU engine as CUDA's")
    p.add_argument("--json", default=os.path.join(HERE, "results", "gpu_triton.json"))
    p.add_argument("--auto-table", default=None, help="write the measured table of backend='auto' here")
    args = p.parse_args()
    if args.smoke:
        dev, name, ref_backend = torch.device("cpu"), "CPU, Triton interpreter (smoke test; times mean nothing)", "cpu"
        args.n_train, args.n_cifar, args.ks, args.cifar_ks, args.batches = 12, 8, [3, 5], [3], [1, 2]
        args.reps, args.seeds, args.attention_chunk = 1, 2, 500
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) to test the script")
        dev, name, ref_backend = torch.device("cuda"), torch.cuda.get_device_name(), "cuda"
        if not pm.cuda_available():
            print("# the CUDA engine is not built: its columns stay empty", flush=True)
    triton_engine.check(torch.zeros(1, device=dev))
    import triton

    run = timer(dev)
    mnist = torch.from_numpy(load("mnist", args.n_train)[0])
    cifar = torch.from_numpy(load("cifar10", args.n_cifar)[0])
    crop = (slice(None), slice(None), slice(8, 24), slice(8, 24)) if args.smoke else (slice(None),) * 4
    data = {"mnist": mnist[crop].contiguous().to(dev), "cifar10": cifar[crop].contiguous().to(dev)}
    res = {"device": name, "host": machine_line(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "t": args.t, "n_train": args.n_train, "n_cifar": args.n_cifar,
           "goals": GOALS, "rows": [], "autotune": []}
    print(f"# {name}; host {machine_line()}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
    has_cuda = ref_backend == "cpu" or pm.cuda_available()
    work = [("mnist", kind, k, B) for kind in args.machines for k in args.ks for B in args.batches] + \
        [("cifar10", "els_zeros", k, 1) for k in args.cifar_ks]
    queries = {}
    for i, (d, kind, k, B) in enumerate(work):
        C, H, W = data[d].shape[1:]
        g = torch.Generator(device=dev).manual_seed(1000 + i)
        queries[d, kind, k, B] = torch.randn(B, C, H, W, device=dev, generator=g)

    machines = {(d, kind): machine(kind, data[d]) for d, kind, _, _ in work}
    machines64 = {}  # float64 twins, built when first needed

    # 1. autotune: the first call of each shape (compile and trials)
    for d, kind, k, B in work:
        m = machines[d, kind]
        t0 = time.perf_counter()
        m.denoise(queries[d, kind, k, B], args.t, k, backend="triton")
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res["autotune"].append({"data": d, "machine": kind, "k": k, "B": B, "first_call_s": time.perf_counter() - t0})
    print(json.dumps({"autotune_total_s": sum(r["first_call_s"] for r in res["autotune"])}), flush=True)
    save(args.json, res)

    # 2. the Triton engine against the CUDA engine
    for d, kind, k, B in work:
        m = machines[d, kind]
        x = queries[d, kind, k, B]
        H, W = x.shape[2:]
        row = {"data": d, "machine": kind, "C": int(x.shape[1]), "N": m.N, "k": k, "B": B,
               "pairs": pairs(m, B, k, H, W)}
        row["triton_s"] = run(lambda: m.denoise(x, args.t, k, backend="triton"), args.reps)
        row["triton_pairs_per_s"] = row["pairs"] / row["triton_s"]
        row["triton_tflops"] = 2 * row["pairs"] * row["C"] * k * k / row["triton_s"] / 1e12
        row["skipped_key_tiles"] = skipped_share(m, x, args.t, k)
        if has_cuda and (B == 1 or (k == 7 and kind == "els_zeros") or args.smoke):
            row["cuda_s"] = run(lambda: m.denoise(x, args.t, k, backend=ref_backend), 1 if B > 1 else args.reps)
            row["speedup_vs_cuda"] = row["cuda_s"] / row["triton_s"]
        if has_cuda and B == 1:
            if (d, kind) not in machines64:
                machines64[d, kind] = machine(kind, data[d].double())
            ref = machines64[d, kind].denoise(x.double(), args.t, k, backend=ref_backend)
            got = m.denoise(x, args.t, k, backend="triton").double()
            row["max_abs_err_vs_float64"] = float((got - ref).abs().max())
            row["mean_abs_err_vs_float64"] = float((got - ref).abs().mean())
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        save(args.json, res)

    # 3. periodic ELS as attention (MNIST; the smoke test checks the operands and the chunk merge in plain torch)
    if "els_circular" in args.machines:
        res["attention"] = []
        a, b2 = pm.schedules.cosine_legacy.scalar_coefficients(args.t)
        for k in args.ks:
            try:
                K, V = attention_keys(data["mnist"], k, float(a))
            except torch.OutOfMemoryError as e:
                res["attention"].append({"k": k, "error": str(e)[:160]})
                continue
            for B in args.batches:
                x = queries["mnist", "els_circular", k, B]
                Q = attention_queries(x, k, K.shape[1])
                if ("mnist", "els_circular") not in machines64:
                    machines64["mnist", "els_circular"] = machine("els_circular", data["mnist"].double())
                ref = machines64["mnist", "els_circular"].denoise(x.double(), args.t, k, backend=ref_backend)
                ref = ref.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
                row = {"k": k, "B": B, "keys": int(K.shape[0])}
                ops = (("math", torch.float32, "math_fp32"),) if args.smoke else \
                    (("flash", torch.bfloat16, "flash_bf16"), ("efficient", torch.float32, "efficient_fp32"))
                for op, dt, key in ops:
                    if op == "efficient" and B > 1:
                        continue  # 4 s a query image: B = 1 shows the rate
                    try:
                        row[f"{key}_s"] = run(lambda: attention(op, Q, K, V, 0.5 / float(b2), dt, args.attention_chunk), 1)
                        out = attention(op, Q, K, V, 0.5 / float(b2), dt, args.attention_chunk)
                        row[f"{key}_max_abs_err"] = float((out[:, :x.shape[1]] - ref).abs().max())
                    except RuntimeError as e:
                        row[f"{key}_error"] = str(e).splitlines()[0][:160]
                res["attention"].append(row)
                print(json.dumps(row), flush=True)
                save(args.json, res)
            del K, V
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    # 4. backward pass at k = 7 (smoke: the smallest k), B = 1
    kb = 7 if 7 in args.ks else args.ks[0]
    x = queries["mnist", "els_zeros", kb, 1].clone().requires_grad_(True)
    m = machines["mnist", "els_zeros"]
    bwd = {"k": kb}
    for be in ("triton", ref_backend) if has_cuda else ("triton",):
        bwd[f"{be}_forward_backward_s"] = run(lambda: torch.autograd.grad(m.denoise(x, args.t, kb, backend=be).sum(), x),
                                              args.reps)
    res["backward"] = bwd
    print(json.dumps(bwd), flush=True)
    save(args.json, res)

    # 5. the 20-step calibrated sample on the Triton engine (twice: the first tunes the schedule's sizes)
    ks = pm.kschedule.paper_schedule("MNIST_ResNet_zeros")
    if args.smoke:
        ks = pm.KSchedule.ramp(5, 3, 20)
    x1 = torch.randn(args.seeds, 1, *data["mnist"].shape[2:], device=dev, generator=torch.Generator(dev).manual_seed(0))
    den = pm.MachineDenoiser(machines["mnist", "els_zeros"], ks, backend="triton")
    for attempt in ("first", "second"):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = pm.ddim(den, x1, steps=20, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res[f"sample_20_steps_{attempt}_s"] = time.perf_counter() - t0
    res["sample_seeds"] = args.seeds
    res["sample_range"] = [float(out.min()), float(out.max())]
    print(json.dumps({"sample_20_steps_s": res["sample_20_steps_second_s"], "first": res["sample_20_steps_first_s"]}),
          flush=True)
    save(args.json, res)

    # 6. the measured table of backend="auto"
    if args.auto_table:
        rows = [{"op": "local", "rule": r["machine"], "C": r["C"], "k": r["k"], "B": r["B"], "N": r["N"],
                 "dtype": "float32", "times": {"triton": r["triton_s"], "cuda": r["cuda_s"]}}
                for r in res["rows"] if "cuda_s" in r]
        table = {"version": 1, "devices": {name: {"measured": res["date"], "torch": torch.__version__,
                                                  "triton": triton.__version__, "rows": rows}}}
        save(args.auto_table, table)

    # summary
    print("\n| data | machine | k | B | Triton s | pairs/s | CUDA s | Triton vs CUDA | skipped tiles | max err vs float64 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        cu = f"{r['cuda_s']:.4f}" if "cuda_s" in r else ""
        sp = f"{r['speedup_vs_cuda']:.1f}x" if "speedup_vs_cuda" in r else ""
        er = f"{r['max_abs_err_vs_float64']:.1e}" if "max_abs_err_vs_float64" in r else ""
        print(f"| {r['data']} | {r['machine']} | {r['k']} | {r['B']} | {r['triton_s']:.4f} | "
              f"{r['triton_pairs_per_s']:.2e} | {cu} | {sp} | {r['skipped_key_tiles']:.1%} | {er} |")
    for r in res.get("attention", []):
        print("attention", json.dumps(r))
    goal_rows = {(r["k"], r["B"]): r for r in res["rows"] if r["data"] == "mnist" and r["machine"] == "els_zeros"}
    verdict = {}
    if (7, 1) in goal_rows:
        verdict["k7_B1_s"] = goal_rows[7, 1]["triton_s"]
    if (7, 16) in goal_rows:
        verdict["k7_B16_s"] = goal_rows[7, 16]["triton_s"]
    if (3, 1) in goal_rows:
        verdict["k3_pairs_per_s"] = goal_rows[3, 1]["triton_pairs_per_s"]
    verdict["sample_20_steps_16_seeds_s"] = res["sample_20_steps_second_s"]
    res["goals_measured"] = verdict
    save(args.json, res)
    for key, want in GOALS.items():
        got = verdict.get(key)
        ok = got is not None and (got >= want if key.endswith("per_s") else got <= want)
        print(f"goal {key}: {want:g} -> {'not measured' if got is None else f'{got:.4g}'} "
              f"{'MET' if ok else 'not met'}{' (smoke test)' if args.smoke else ''}")


if __name__ == "__main__":
    main()
