"""Key sharding on this machine: 1 vs 2 gloo ranks (one core each) for one boundary-aware ELS call and for a
DDIM sample, and the bytes each rank exchanges per call.

    python bench/distributed.py [--n-train 60000] [--sample-n-train 6000] [--k 7] [--steps 20] [--ranks 1,2]
                                [--parts call,sample]

The driver launches ``torchrun --nproc-per-node=R`` on this file for each R (OMP/torch threads 1, engine
threads 1 per rank) and prints one JSON line per R and a comparison with the first rank count's result.
``--parts`` picks what is timed: ``call`` (one call on ``--n-train`` images), ``sample`` (a ``--steps``-step
DDIM sample on ``--sample-n-train`` images), ``index`` (the patch index backend on each shard against the exact
engine: one call on ``--index-n-train`` images at t = 0.05, 0.2, 0.5 for each ``--index-tol``, with the share of
pixels the index handed back to the exact engine, the merged bound and the error), or a list (default:
call,sample). The 20-step sample on all 60,000 MNIST images,
1 vs 2 ranks, alone:

    python -S bench/distributed.py --parts sample --sample-n-train 60000 --steps 20 --ranks 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(args):
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import patchmosaic as pm
    from patchmosaic import distributed as pmd
    from common import load

    SCHED = pm.schedules.get_schedule("cosine_legacy")
    pmd.init()
    rank, world = pmd.launch.rank(), pmd.launch.world()
    res = {"ranks": world}

    def timed(fn):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        if world > 1:
            dist.barrier()
        return out, time.perf_counter() - t0

    parts = args.parts.split(",")
    images, _ = load("mnist", max(args.n_train if "call" in parts else 0, args.sample_n_train if "sample" in parts
                                  else 0, args.index_n_train if "index" in parts else 0))
    images = torch.from_numpy(images)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    res["k"] = args.k
    if "call" in parts:
        big = images[: args.n_train]
        m = pmd.ShardedMachine("els", big[pmd.shard_slice(len(big), rank, world)], n_threads=1, data_digest="-")
        out, sec = timed(lambda: m.denoise(x, 0.5, args.k, return_provenance=True))
        res.update(n_train=len(big), call_s=sec, call_sent_bytes=m.last_exchange and m.last_exchange[0],
                   call_received_bytes=m.last_exchange and m.last_exchange[1])
        res["call_out"] = out[0].numpy().ravel().tolist()
        res["call_prov"] = out[1].image.numpy().ravel().tolist()

    if "sample" in parts:
        small = images[: args.sample_n_train]
        ms = pmd.ShardedMachine("els", small[pmd.shard_slice(len(small), rank, world)], n_threads=1, data_digest="-")
        den = pm.MachineDenoiser(ms, args.k)
        sample, sec = timed(lambda: pm.ddim(den, x, steps=args.steps, progress=False))
        res.update(sample_n_train=len(small), steps=args.steps, sample_s=sec, sample=sample.numpy().ravel().tolist(),
                   sample_sent_bytes_per_step=ms.last_exchange and ms.last_exchange[0])
    if "index" in parts:  # the patch index on each shard against the exact engine, same machine, same call
        small = images[: args.index_n_train]
        shard = small[pmd.shard_slice(len(small), rank, world)]
        exact = pmd.ShardedMachine("els", shard, n_threads=1, data_digest="-")
        xi = torch.randn(args.index_batch, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        rows = []
        for tol in (float(v) for v in args.index_tol.split(",")):
            idx = pmd.ShardedMachine("els", shard, n_threads=1, data_digest="-", backend="index",
                                     index_options=dict(tol=tol, exact_backend="cpu"))
            for t in (0.05, 0.2, 0.5):
                a, _ = SCHED.scalar_coefficients(t)
                q = a * small[:args.index_batch] + (1 - a * a) ** 0.5 * xi  # noisy training-like queries
                idx.denoise(q, t, args.k)  # builds this shard's index for k (not timed)
                ref, sec_exact = timed(lambda: exact.denoise(q, t, args.k))
                got, sec_index = timed(lambda: idx.denoise(q, t, args.k))
                li = idx.last_index or {}
                rows.append({"tol": tol, "t": t, "exact_s": sec_exact, "index_s": sec_index,
                             "exact_fraction": li.get("exact_pixels", 0) / max(li.get("pixels", 1), 1),
                             "max_bound": float(idx.last_bound.max()),
                             "max_err": float((got.double() - ref.double()).abs().max())})
        res.update(index_n_train=len(small), index_batch=args.index_batch, index=rows)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(res, f)
    pmd.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--sample-n-train", type=int, default=6000)
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--parts", default="call,sample",
                   help="what to time, comma-separated: call, sample, index (default: call,sample)")
    p.add_argument("--index-n-train", type=int, default=5000, help="training images of the index part")
    p.add_argument("--index-batch", type=int, default=4, help="query images of the index part")
    p.add_argument("--index-tol", default="1e-3,1e-2", help="the index tolerances tried (comma-separated)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.parts or set(args.parts.split(",")) - {"call", "sample", "index"}:
        p.error(f"--parts takes call, sample, index or a comma-separated list of them, got {args.parts!r}")
    if args.worker:
        return worker(args)
    py = [sys.executable] + (["-S"] if sys.flags.no_site else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(q for q in sys.path if q))
    results = {}
    for r in (int(v) for v in args.ranks.split(",")):
        out = os.path.join(tempfile.mkdtemp(), "res.json")
        cmd = py + ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={r}", "--no-python"] + py + [
            os.path.abspath(__file__), "--worker", "--out", out, "--n-train", str(args.n_train),
            "--sample-n-train", str(args.sample_n_train), "--k", str(args.k), "--steps", str(args.steps),
            "--parts", args.parts, "--index-n-train", str(args.index_n_train), "--index-batch", str(args.index_batch),
            "--index-tol", args.index_tol]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        res = json.load(open(out))
        res["job_s"] = time.perf_counter() - t0
        results[r] = res
        print(json.dumps({k: v for k, v in res.items() if k not in ("call_out", "call_prov", "sample", "index")}),
              flush=True)
        for row in res.get("index", []):
            print(f"  {r} rank(s), index part (N={res['index_n_train']}, B={res['index_batch']}, k={res['k']}): "
                  f"tol {row['tol']:g}, t = {row['t']:g}: exact {row['exact_s']:.2f} s, index {row['index_s']:.2f} s "
                  f"(x{row['exact_s'] / row['index_s']:.2f}); pixels computed exactly {row['exact_fraction']:.0%}; "
                  f"largest bound {row['max_bound']:.1e}, largest error {row['max_err']:.1e}", flush=True)
    import numpy as np

    base = results[min(results)]
    for r, res in results.items():
        words = []
        if "call_s" in res:
            words.append(f"one call (N={res['n_train']}, k={res['k']}) {res['call_s']:.2f} s "
                         f"(x{base['call_s'] / res['call_s']:.2f}); per call each rank sends "
                         f"{res['call_sent_bytes'] or 0} B, receives {res['call_received_bytes'] or 0} B; call max "
                         f"|diff| {np.abs(np.subtract(res['call_out'], base['call_out'])).max():.2e}, provenance "
                         f"equal {np.mean(np.equal(res['call_prov'], base['call_prov'])):.4f}")
        if "sample_s" in res:
            words.append(f"{res['steps']}-step sample (N={res['sample_n_train']}, k={res['k']}) "
                         f"{res['sample_s']:.2f} s (x{base['sample_s'] / res['sample_s']:.2f}); sample max |diff| "
                         f"{np.abs(np.subtract(res['sample'], base['sample'])).max():.2e}")
        print(f"{r} rank(s), vs {min(results)}: " + "; ".join(words))

if __name__ == "__main__":
    main()
