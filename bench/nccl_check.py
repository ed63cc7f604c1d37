"""Key sharding over NCCL (or gloo), checked against one process: bench/gpu_distributed.sh runs it on a GPU.

    torchrun --standalone --nproc-per-node=2 bench/nccl_check.py --out DIR [--backend auto|nccl|gloo]
                                                                 [--hostid-per-rank]

Every rank builds ShardedMachines (IS, LS, boundary-aware ELS, periodic ELS wrapped and not) over its uneven
slice of 37 random labelled training images (labels sorted, so a class is missing on some ranks), denoises
queries on its device (the GPU when there is one: the CUDA engine or the torch backend computes each rank's
partial state; NCCL exchanges it there) with provenance, in float32 and float64, and compares with one
process's machine over all the images on the same device and with the float64 CPU result. Passing means the
exactness tests' tolerances (float64 within 1e-9 of the range, float32 mean 1e-5 / max 1e-3 of the range),
identical winning images, and bit-identical results on every rank.

--backend auto (default): nccl when CUDA is available, else gloo (so the check also runs on a CPU machine).
--hostid-per-rank: give each rank its own NCCL_HOSTID before NCCL starts. NCCL refuses two ranks on one GPU
("Duplicate GPU detected", since NCCL 2.5): it finds them by host hash and bus id. With another host id per
rank it takes them for two hosts and connects them through its network transport (sockets; the caller sets
NCCL_SOCKET_IFNAME=lo, NCCL_IB_DISABLE=1). For checking on one GPU only; it is slow and not a way to run.
With one rank, ShardedMachine makes no collective; the exchange itself (pack, all_gather, unpack, merge) is
then checked over the one-rank group.

Each rank writes DIR/rank<r>.json; rank 0 prints 'NCCL_CHECK PASS|FAIL ...'. Exit status: 0 pass, 1 a
mismatch, 2 the process group or a collective failed (the error text is in the JSON and on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

RANGE = 2.0
KINDS = [("IS", "is", {}), ("LS", "ls", {}), ("ELS_zeros", "els", {"boundary": "zeros"}),
         ("ELS_circular", "els", {"boundary": "circular"}),
         ("ELS_wrapped", "els", {"boundary": "circular", "wrapped": True})]


def write(out, rank, rep):
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(rep, f, indent=1)


def fail(out, rank, rep, stage, err):
    """Record a failed process group or collective and leave at once (a broken group cannot be torn down)."""
    rep.update(ok=False, stage=stage, error=err)
    write(out, rank, rep)
    tail = " | ".join([line.strip() for line in err.strip().splitlines() if line.strip()][-3:])
    print(f"NCCL_CHECK FAIL rank {rank} at {stage}: {tail}", file=sys.stderr, flush=True)
    if rank == 0:
        print(f"NCCL_CHECK FAIL backend={rep.get('backend')} world={rep.get('world')} stage={stage}", flush=True)
    sys.stdout.flush()
    os._exit(2)


def counts_for(N, world, seed):
    """Uneven contiguous shard sizes (some may be 0), the same on every rank."""
    cuts = np.sort(np.random.default_rng(seed).integers(0, N + 1, world - 1))
    return np.diff(np.concatenate([[0], cuts, [N]])).astype(int)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--hostid-per-rank", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    backend = args.backend if args.backend != "auto" else ("nccl" if cuda else "gloo")
    if args.hostid_per_rank:  # read by NCCL when its communicator starts (after this)
        os.environ["NCCL_HOSTID"] = f"patchmosaic-check-rank{rank}"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()) if cuda \
        else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    import patchmosaic as pm
    from patchmosaic import distributed as pmd
    from patchmosaic.distributed import launch
    from patchmosaic.ops.state import SoftmaxState, merge, pack, unpack

    rep = {"rank": rank, "world": world, "backend": backend, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
           "cuda_engine": bool(pm.cuda_available()), "torch": torch.__version__,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda and backend == "nccl" else None,
           "nccl_hostid": os.environ.get("NCCL_HOSTID")}
    t0 = time.time()
    try:
        if world > 1:
            pmd.init(backend=backend)
        else:  # one rank: the package joins no group, so start one to put the exchange through the backend
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=launch.timeout_seconds()))
    except Exception:
        fail(args.out, rank, rep, "joining the process group", traceback.format_exc())
    cdev = launch.comm_device()
    try:  # a first collective by hand, for the backend's whole error text (NCCL starts its communicator here)
        one = torch.full((1,), float(rank + 1), device=cdev)
        dist.all_reduce(one)
        if cuda:
            torch.cuda.synchronize()
        assert one.item() == world * (world + 1) / 2, one.item()
    except Exception:
        fail(args.out, rank, rep, "the first all_reduce", traceback.format_exc())
    rep["setup_s"] = time.time() - t0

    rng = np.random.default_rng(0)
    N, H, W = 37, 10, 10
    images = rng.uniform(-1, 1, (N, 1, H, W))
    images = np.where(images > 0.3, images, -1.0)  # MNIST-like: repeated background keys, ties in the arg-max
    labels = np.sort(rng.integers(0, 3, N))
    x = rng.standard_normal((3, 1, H, W)) * 0.8
    qlabels = [0, 2, 1]
    cases, ok, digests = [], True, []
    for i, (name, kind, kw) in enumerate(KINDS):
        counts = counts_for(N, world, i)
        start = int(counts[:rank].sum())
        sl = slice(start, start + int(counts[rank]))
        k = 5
        cls = {"is": pm.IS, "ls": pm.LS, "els": pm.ELS}[kind]
        oracle = cls(images, labels, **kw).denoise(x, 0.5, k, labels=qlabels)
        for dtype in (torch.float32, torch.float64):
            np_dtype = np.float32 if dtype == torch.float32 else np.float64
            xd = torch.as_tensor(x, dtype=dtype, device=device)
            try:
                sm = pmd.ShardedMachine(kind, images[sl].astype(np_dtype), labels[sl], **kw)
                got, prov = sm.denoise(xd, 0.5, k, labels=qlabels, return_provenance=True)
                same_describe = sm.describe()
            except pmd.DistributedError as e:
                fail(args.out, rank, rep, f"{name} {dtype}", str(e))
            single = cls(images.astype(np_dtype), labels, **kw)
            ref, rprov = single.denoise(xd, 0.5, k, labels=qlabels, return_provenance=True)
            err = (got.double().cpu() - torch.as_tensor(oracle)).abs().reshape(len(x), -1)
            c = {"case": f"{name} {str(dtype)[6:]}", "counts": counts.tolist(),
                 "engine": "cpu" if not cuda else ("cuda" if rep["cuda_engine"] else "torch"),  # what auto picks
                 "max_vs_same_dtype": float((got - ref).abs().max()),
                 "max_vs_f64": float(err.max()), "mean_vs_f64": float(err.mean(1).max()),
                 "prov_same": float((prov.image == rprov.image).float().mean()),
                 "share_max_diff": float((prov.share.double() - rprov.share.double()).abs().max()),
                 "describe_same": same_describe == single.describe()}
            if dtype == torch.float64:
                c["ok"] = c["max_vs_f64"] <= 1e-9 * RANGE
            else:
                c["ok"] = c["mean_vs_f64"] <= 1e-5 * RANGE and c["max_vs_f64"] <= 1e-3 * RANGE
            c["ok"] = bool(c["ok"] and c["prov_same"] == 1.0 and c["share_max_diff"] <= 1e-6 and c["describe_same"])
            ok &= c["ok"]
            cases.append(c)
            digests.append(hashlib.sha256(got.cpu().numpy().tobytes() + prov.image.cpu().numpy().tobytes())
                           .hexdigest())
    if world == 1:  # the exchange through the backend, as ShardedMachine does it with more ranks
        st = SoftmaxState(torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 1,
                          torch.randn(3, 4, 2), torch.randint(0, 99, (3, 4)))
        buf = pack(st).to(cdev).contiguous()
        bufs = [torch.empty_like(buf)]
        try:
            launch.collective(lambda: dist.all_gather(bufs, buf), "check exchange")
        except pmd.DistributedError as e:
            fail(args.out, rank, rep, "the one-rank exchange", str(e))
        back = merge([unpack(b.cpu(), 2, torch.float32, True) for b in bufs])
        rep["one_rank_exchange_exact"] = bool(torch.equal(back.out, st.out) and torch.equal(back.key, st.key)
                                              and torch.equal(back.s, st.s))
        ok &= rep["one_rank_exchange_exact"]
    everyone = [None] * world
    try:
        launch.collective(lambda: dist.all_gather_object(everyone, digests), "comparison of the ranks' results")
    except pmd.DistributedError as e:
        fail(args.out, rank, rep, "the comparison across ranks", str(e))
    rep["identical_on_every_rank"] = all(d == everyone[0] for d in everyone)
    ok &= rep["identical_on_every_rank"]
    rep.update(ok=bool(ok), cases=cases, total_s=time.time() - t0)
    write(args.out, rank, rep)
    oks = [None] * world
    dist.all_gather_object(oks, bool(ok))
    if rank == 0:
        worst32 = max(c["max_vs_f64"] for c in cases if c["case"].endswith("float32"))
        worst64 = max(c["max_vs_f64"] for c in cases if c["case"].endswith("float64"))
        engines = sorted({c["engine"] for c in cases})
        print(f"NCCL_CHECK {'PASS' if all(oks) else 'FAIL'} backend={dist.get_backend()} world={world} "
              f"device={rep['device_name']} engine={','.join(engines)} nccl={rep['nccl']} "
              f"hostid_per_rank={args.hostid_per_rank} cases={len(cases)} worst_float32={worst32:.1e} "
              f"worst_float64={worst64:.1e} identical_on_every_rank={rep['identical_on_every_rank']} "
              f"seconds={rep['total_s']:.1f}", flush=True)
        for c in cases:
            if not c["ok"]:
                print("  mismatch:", json.dumps(c), flush=True)
    dist.destroy_process_group()
    sys.exit(0 if all(oks) else 1)


if __name__ == "__main__":
    main()
