"""One rank of the distributed tests (tests/test_distributed.py launches it with torchrun, or by hand for the
failure tests). ``python dist_worker.py MODE OUT``; each rank writes ``OUT/rank<r>.json``."""

import hashlib
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

import patchmosaic as pm  # noqa: E402
from patchmosaic import distributed as pmd  # noqa: E402
from patchmosaic.distributed import launch  # noqa: E402

KINDS = {"IS": ("is", {}), "LS": ("ls", {}), "ELS_zeros": ("els", {"boundary": "zeros"}),
         "ELS_circular": ("els", {"boundary": "circular"})}


def one_process(case, dtype):
    kind, kw = KINDS[case.machine]
    if case.machine == "ELS_circular":
        kw = dict(kw, wrapped=case.wrapped)
    cls = {"is": pm.IS, "ls": pm.LS, "els": pm.ELS}[kind]
    return cls(case.train.astype(dtype), case.labels, n_threads=1, **kw)


def split(N, world, rng):
    """Uneven contiguous counts (some may be 0) summing to N."""
    cuts = np.sort(rng.integers(0, N + 1, world - 1))
    return np.diff(np.concatenate([[0], cuts, [N]])).astype(int)


def keys(out):
    from cases import draw, queries

    rank, world = dist.get_rank(), dist.get_world_size()
    report = []
    first = int(os.environ.get("FIRST_SEED", "0"))
    seeds = list(range(first, first + int(os.environ.get("N_SEEDS", "8"))))
    for seed in seeds:
        case = draw(seed)
        if seed % 4 == 1:  # a class absent from some ranks: labels sorted, so contiguous shards hold few classes
            case.labels = np.sort(case.labels)
        x = queries(case, seed)
        rng = np.random.default_rng(seed)
        counts = split(len(case.train), world, rng)
        start = int(counts[:rank].sum())
        sl = slice(start, start + int(counts[rank]))
        kind, kw = KINDS[case.machine]
        if case.machine == "ELS_circular":
            kw = dict(kw, wrapped=case.wrapped)
        entry = {"seed": seed, "case": repr(case), "counts": counts.tolist()}
        for dtype in (np.float64, np.float32):
            name = np.dtype(dtype).name
            sm = pmd.ShardedMachine(kind, case.train[sl].astype(dtype), case.labels[sl], n_threads=1, **kw)
            got, prov = sm.denoise(x.astype(dtype), case.t, case.k, labels=case.qlabels, return_provenance=True)
            single = one_process(case, dtype)
            ref, rprov = single.denoise(x.astype(dtype), case.t, case.k, labels=case.qlabels, return_provenance=True)
            ref64 = one_process(case, np.float64).denoise(x, case.t, case.k, labels=case.qlabels)
            err = np.abs(got.astype(np.float64) - ref64)
            entry[name] = {
                "max_vs_same_dtype": float(np.abs(got.astype(np.float64) - ref).max()),
                "mean_vs_f64": [float(e.mean()) for e in err], "max_vs_f64": [float(e.max()) for e in err],
                "prov_same": float(np.mean(prov.image == rprov.image)),
                "share_max_diff": float(np.abs(prov.share.astype(np.float64) - rprov.share).max()),
                "prov_in_range": bool(((prov.image >= 0) & (prov.image < len(case.train))).all()),
                "prov_label_ok": bool(np.all(case.labels[prov.image] == np.asarray(case.qlabels).reshape(
                    (-1,) + (1,) * (prov.image.ndim - 1)))),
                "describe_same": sm.describe() == single.describe(),  # the data digest included
                "bytes": hashlib.sha256(got.tobytes() + prov.image.tobytes() + prov.share.tobytes()).hexdigest(),
            }
        report.append(entry)
    hashes = [None] * world
    dist.all_gather_object(hashes, [[e[n]["bytes"] for n in ("float64", "float32")] for e in report])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "cases": report, "identical_on_every_rank":
                   all(h == hashes[0] for h in hashes)}, f)


def failure(out, how):
    """Rank 1 dies (``kill``) or stalls (``stall``) inside a call, between its own work and the exchange."""
    pmd.init(timeout=float(os.environ.get("PATCHMOSAIC_DIST_TIMEOUT", "3")))
    rank = dist.get_rank()
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    m = pmd.ShardedMachine("els", *pmd.shard(train), n_threads=1)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    m.denoise(x, 0.5, 3)  # one good call first
    if rank == 1:
        real = launch.collective

        def dying(fn, what, group=None):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGSTOP)
            return real(fn, what, group)

        launch.collective = dying
    t0 = time.time()
    try:
        m.denoise(x, 0.5, 3)
        msg = None
    except pmd.DistributedError as e:
        msg = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "message": msg, "seconds": time.time() - t0}, f)
    sys.exit(3 if msg else 0)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    if mode in ("kill", "stall"):
        failure(out, mode)
        return
    pmd.init()
    try:
        {"keys": keys}[mode](out)
    finally:
        pmd.shutdown()


if __name__ == "__main__":
    main()
