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
from patchmosaic.index import key_vectors  # noqa: E402

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
            if kind != "is":  # a neighbourhood mask (a random one with its centre): the same merge
                mask = rng.random((case.k, case.k)) < 0.6
                mask[case.k // 2, case.k // 2] = True
                got_m = sm.denoise(x.astype(dtype), case.t, case.k, labels=case.qlabels, patch_mask=mask)
                ref_m = single.denoise(x.astype(dtype), case.t, case.k, labels=case.qlabels, patch_mask=mask)
                ref_m64 = one_process(case, np.float64).denoise(x, case.t, case.k, labels=case.qlabels,
                                                                patch_mask=mask)
                err_m = np.abs(got_m.astype(np.float64) - ref_m64)
                entry[name]["mask_max_vs_same_dtype"] = float(np.abs(got_m.astype(np.float64) - ref_m).max())
                entry[name]["mask_mean_vs_f64"] = [float(e.mean()) for e in err_m]
                entry[name]["mask_max_vs_f64"] = [float(e.max()) for e in err_m]
        report.append(entry)
    hashes = [None] * world
    dist.all_gather_object(hashes, [[e[n]["bytes"] for n in ("float64", "float32")] for e in report])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "cases": report, "identical_on_every_rank":
                   all(h == hashes[0] for h in hashes)}, f)


def data_local(out):
    """``ShardedDataLocal`` on uneven shards against the one-process ``DataLocal`` over all the images (both
    boundaries, a conditional call, float32 and float64, a call with a time per image)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((70, 1, 10, 10))
    train = np.tanh(0.5 * (x + np.roll(x, 1, 2) + 0.5 * np.roll(x, 1, 3)))  # correlated neighbours
    labels = np.arange(70) % 3
    counts = split(len(train), world, rng)
    start = int(counts[:rank].sum())
    sl = slice(start, start + int(counts[rank]))
    q = 0.7 * train[:3] + 0.7 * rng.standard_normal((3, 1, 10, 10))
    res = []
    for boundary in ("zeros", "circular"):
        for dtype in (np.float64, np.float32):
            sm = pmd.ShardedDataLocal(train[sl].astype(dtype), labels[sl], statistics=train, boundary=boundary,
                                      n_threads=1)
            one = pm.DataLocal(train.astype(dtype), labels, boundary=boundary, statistics=train, n_threads=1)
            one64 = pm.DataLocal(train, labels, boundary=boundary, n_threads=1)
            for t, k, lab in ((0.3, 3, [0, 1, 2]), (0.8, 5, None), (np.array([0.2, 0.6, 0.2]), 3, [2, 2, 0])):
                got = sm.denoise(q.astype(dtype), t, k, labels=lab)
                ref = one.denoise(q.astype(dtype), t, k, labels=lab)
                ref64 = one64.denoise(q, t, k, labels=lab)
                err = np.abs(got.astype(np.float64) - ref64)
                res.append({"boundary": boundary, "dtype": np.dtype(dtype).name, "k": k,
                            "max_vs_same_dtype": float(np.abs(got.astype(np.float64) - ref).max()),
                            "max_vs_f64": float(err.max()), "mean_vs_f64": float(err.mean()),
                            "same_mask": bool(torch.equal(sm.mask(0.3, 3), one.mask(0.3, 3))),
                            "describe_same": sm.describe() == one.describe(),
                            "bytes": hashlib.sha256(got.tobytes()).hexdigest()})
    hashes = [None] * world
    dist.all_gather_object(hashes, [r["bytes"] for r in res])
    with open(os.path.join(out, f"datalocal{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "counts": counts.tolist(), "cases": res,
                   "identical_on_every_rank": all(h == hashes[0] for h in hashes)}, f)


# the patch index backend: (name, machine, kwargs, labelled call, canvas, k, index options, engine of rank 0)
INDEX_TOL = 1e-5  # the bound a pixel the index keeps may have: below the float32 mean tolerance (1e-5 of the range)
INDEX_CASES = [
    ("ELS_zeros", "els", {"boundary": "zeros"}, True, (10, 10), 3, {}, "index"),
    ("ELS_zeros", "els", {"boundary": "zeros"}, False, (12, 14), 5, {}, "index"),  # a larger canvas
    ("ELS_circular", "els", {"boundary": "circular"}, False, (10, 10), 3, {}, "index"),
    ("ELS_circular", "els", {"boundary": "circular", "wrapped": True}, True, (10, 10), 5,
     {"kind": "ivf", "nlist": 4, "nprobe": 4, "min_index_keys": 0}, "index"),  # an inverted file (every list probed)
    ("LS", "ls", {}, True, (10, 10), 3, {}, "index"),
    ("LS", "ls", {}, False, (10, 10), 5, {}, "index"),
    ("ELS_zeros", "els", {"boundary": "zeros"}, True, (10, 10), 3, {}, "cpu"),  # rank 0 exact, the others indexed
]


def index_backend(out):
    """``ShardedMachine(..., backend="index")`` on uneven shards against the one-process exact machine, for ELS
    (both boundaries) and LS, conditional or not, at low t (the index serves) and higher t (it falls back)."""
    from conftest import noisy

    rank, world = dist.get_rank(), dist.get_world_size()
    rng = np.random.default_rng(18)
    N = 36
    train = rng.uniform(-1, 1, (N, 1, 10, 10))
    train[N // 2:] = np.where(train[N // 2:] > 0.3, train[N // 2:], -1.0)  # MNIST-like: repeated blank patches
    labels = np.arange(N) % 3
    report, hashes = [], []
    for c, (name, kind, kw, labelled, canvas, k, extra, engine0) in enumerate(INDEX_CASES):
        crng = np.random.default_rng(100 + c)
        counts = split(N, world, crng)
        while len(set(counts.tolist())) == 1:  # uneven shards in every case
            counts = split(N, world, crng)
        start = int(counts[:rank].sum())
        sl = slice(start, start + int(counts[rank]))
        t = np.array([0.01, 0.05, 0.15, 0.4])
        qlabels = np.array([0, 1, 2, 0])
        x = np.concatenate([noisy(crng, train[labels == qlabels[b]], 1, t[b], "cosine_legacy", canvas)
                            for b in range(len(t))]).astype(np.float32)
        lab = qlabels if labelled else None
        opts = dict({"m": 16, "tol": INDEX_TOL}, **extra)
        backend = engine0 if rank == 0 else "index"
        t0 = time.perf_counter()
        sm = pmd.ShardedMachine(kind, train[sl].astype(np.float32), labels[sl], n_threads=1, backend=backend,
                                index_options=opts if backend == "index" else None, **kw)
        got, prov = sm.denoise(x, t, k, labels=lab, return_provenance=True)
        seconds = time.perf_counter() - t0
        cls = {"els": pm.ELS, "ls": pm.LS}[kind]
        one32 = cls(train.astype(np.float32), labels, n_threads=1, **kw)
        ref, rprov = one32.denoise(x, t, k, labels=lab, return_provenance=True)
        ref64, prov64 = cls(train, labels, n_threads=1, **kw).denoise(x.astype(np.float64), t, k, labels=lab,
                                                                      return_provenance=True)
        err = np.abs(got.astype(np.float64) - ref64)
        bound = sm.last_bound.numpy()
        same = (prov.image == prov64.image) & (prov.row == prov64.row) & (prov.col == prov64.col)
        pad = one32.keyset(canvas[0], canvas[1], k).key_pad
        ids = [(p.image * 100 + p.row * 10 + p.col).ravel() for p in (prov, prov64)]  # key ids, 10 x 10 images
        tied = np.all(key_vectors(train, ids[0], 10, 10, k, pad) == key_vectors(train, ids[1], 10, 10, k, pad),
                      axis=1).reshape(same.shape)
        info = sm.last_index or {"pixels": 0, "exact_pixels": 0}
        report.append({
            "case": f"{name} k={k} canvas={canvas} labels={labelled} {extra} rank0={engine0}",
            "counts": counts.tolist(), "seconds": seconds,
            "mean_vs_f64": [float(e.mean()) for e in err], "max_vs_f64": [float(e.max()) for e in err],
            "max_vs_f32": float(np.abs(got - ref).max()),
            "prov_same": float(np.mean(prov.image == rprov.image)),
            "prov_same_f64": float(np.mean(same)),
            # the engines keep the first of tied keys; shards computed by different engines (the index
            # re-scores in float64) may keep another of them: the same patch, hence the same centre
            "prov_same_or_tied": float(np.mean(same | tied)),
            "prov_in_range": bool(((prov.image >= 0) & (prov.image < N)).all()),
            "prov_label_ok": (not labelled) or bool(np.all(labels[prov.image] == qlabels[:, None, None])),
            "share_max_diff": float(np.abs(prov.share.astype(np.float64) - rprov.share).max()),
            "share_max_diff_f64": float(np.abs(prov.share.astype(np.float64) - prov64.share).max()),
            "bound_max": float(bound.max()), "bound_shape": list(bound.shape),
            "pixels": info["pixels"], "exact_pixels": info["exact_pixels"],
            "bound_conditional": info.get("bound_conditional"),
        })
        hashes.append(hashlib.sha256(got.tobytes() + prov.image.tobytes() + bound.tobytes()).hexdigest())
    bad = {}
    for opts, what in (({"m": 16, "tolerance": 1e-3}, "unknown"), ({"m": 0}, "m")):
        try:
            pmd.ShardedMachine("els", train[:2].astype(np.float32), backend="index", index_options=opts)
            bad[what] = None
        except ValueError as e:
            bad[what] = str(e)
    every = [None] * world
    dist.all_gather_object(every, hashes)
    with open(os.path.join(out, f"index{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "cases": report, "bad_options": bad,
                   "identical_on_every_rank": all(h == every[0] for h in every)}, f)


class MachineNet(torch.nn.Module):
    """A 'network' that is a machine with a known k-schedule (as in test_calibrate.py); ``stop_after`` calls
    it raises, to interrupt a run."""

    def __init__(self, machine, ks, stop_after=None):
        super().__init__()
        self.machine, self.ks, self.calls, self.stop_after = machine, ks, 0, stop_after

    def forward(self, t, x, labels=None):
        self.calls += 1
        if self.stop_after is not None and self.calls > self.stop_after:
            raise KeyboardInterrupt("interrupted")
        t0 = float(t[0])
        return self.machine.eps(x, t0, self.ks.k_at(t0), labels=labels)


def experiments(out, first):
    """Samplers, calibrate and compare with seeds spread over the ranks (and keys, on a grid). ``first``: the
    first job, which is interrupted mid-run; the second (another number of ranks) resumes its files."""
    from patchmosaic.distributed.queries import Layout
    from patchmosaic.experiments.calibrate import calibrate
    from patchmosaic.experiments.compare import compare

    lay = Layout()
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (24, 1, 10, 10)).astype(np.float32)
    labels = np.arange(24) % 3
    x1 = torch.randn(5, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    true = pm.KSchedule((1.0, 0.8, 0.6, 0.4, 0.2), (9, 7, 7, 5, 3))
    shared = os.environ["SHARED_DIR"]
    rep = {"rank": lay.rank, "n_key": lay.n_key, "n_query": lay.n_query}
    m = lay.machine("els", train, labels, n_threads=1)
    rep["sharded"] = type(m).__name__
    one = pm.ELS(train, labels, n_threads=1)
    got = lay.sample(pm.ddim, pm.MachineDenoiser(m, 3), x1, y, steps=5, progress=False)
    ref = pm.ddim(pm.MachineDenoiser(one, 3), x1, y, steps=5, progress=False)
    rep["ddim_max_diff"] = float((got - ref).abs().max())

    net_machine = pm.LS(train, labels, n_threads=1)
    state = os.path.join(shared, "calibrate.state.npz")
    args = dict(candidates=(3, 5, 7, 9, 11), steps=5, progress=False, state=state)
    net = MachineNet(net_machine, true, stop_after=2 if first else None)
    try:
        c = calibrate(net, m, x1, y, layout=lay, **args)
        rep["calibrate_interrupted"] = False
    except KeyboardInterrupt:  # the first job stops here; the second resumes its state file
        rep["calibrate_interrupted"] = True
    rep["calibrate_calls"] = net.calls
    if not first:
        c1 = calibrate(MachineNet(net_machine, true), one, x1, y, candidates=args["candidates"], steps=5,
                       progress=False)
        rep["schedule_same"] = c.schedule == c1.schedule
        rep["cosine_max_diff"] = float(np.abs(c.cosine - c1.cosine).max())

    machines = {"ELS": pm.MachineDenoiser(m, 3), "IS": pm.MachineDenoiser(lay.machine("is", train, labels, n_threads=1))}
    net = MachineNet(net_machine, true, stop_after=7 if first else None)
    kw = dict(steps=5, batch_size=1, progress=False)
    try:
        r = compare(net, machines, x1, y, out_dir=shared, layout=lay, **kw)
        rep["compare_interrupted"] = False
    except KeyboardInterrupt:
        rep["compare_interrupted"] = True
    rep["compare_calls"] = net.calls
    if first:
        return rep
    r1 = compare(MachineNet(net_machine, true), {"ELS": pm.MachineDenoiser(one, 3),
                                                 "IS": pm.MachineDenoiser(pm.IS(train, labels))}, x1, y, **kw)
    rep["compare_r_max_diff"] = max(float(np.abs(np.subtract(r["per_seed"][n]["r"], r1["per_seed"][n]["r"])).max())
                                    for n in ("ELS", "IS"))
    rep["compare_samples_max_diff"] = max(float((r["samples"][n] - r1["samples"][n]).abs().max())
                                          for n in ("network", "ELS", "IS"))
    return rep


def cli_sample(out, rep):
    """``patchmosaic sample`` as torchrun runs it (every rank calls main), against one process."""
    from patchmosaic.experiments import cli
    from patchmosaic.experiments.synthesis import run_sample

    path = os.path.join(os.environ["SHARED_DIR"], f"sample{dist.get_world_size()}.png")
    argv = ["sample", "--limit", "60", "--labels", "0,1", "--n", "3", "--steps", "3", "--k", "3", "--out", path,
            "--quiet"]
    rank = dist.get_rank()
    rep["cli_rc"] = cli.main(argv)  # leaves the process group at its end
    if rank == 0:
        ref = run_sample(limit=60, labels=[0, 1], n=3, steps=3, k="3", out=os.path.join(out, "one.png"),
                         progress=False)
        with np.load(path[:-4] + ".npz") as z:
            rep["cli_max_diff"] = float(np.abs(z["samples"] - ref["samples"].numpy()).max())
            with np.load(ref["npz"]) as r:
                rep["cli_prov_same"] = float(np.mean(z["provenance_image"] == r["provenance_image"]))


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
    if msg:
        assert launch.broken()
        launch.exit_now(3)  # what the CLI does after a DistributedError
    sys.exit(0)


def mismatch(rep):
    """Issue 28: API calls whose ranks were given different seeds, data or runs refuse on every rank, naming the
    ranks, instead of mixing the ranks' inputs."""
    from cases import MachineNet
    from patchmosaic.distributed.queries import Layout

    rank = launch.rank()
    rng = np.random.default_rng(28)
    train = rng.uniform(-1, 1, (6, 1, 6, 6)).astype(np.float32)
    x1 = torch.from_numpy(rng.standard_normal((2, 1, 6, 6)).astype(np.float32)) + rank  # other seeds per rank
    layout = Layout(1)
    den = pm.MachineDenoiser(pm.ELS(train), 3)
    got = []
    for call in (lambda: layout.sample(pm.ddim, den, x1, steps=2, progress=False),
                 lambda: pm.calibrate(MachineNet(pm.ELS(train), 3), pm.ELS(train), x1, candidates=(3,), steps=2,
                                      progress=False,
                                      layout=layout),
                 lambda: Layout(2).machine("els", train + rank)):
        try:
            call()
            got.append(None)
        except launch.RanksDisagree as e:
            got.append(str(e))
    rep["mismatch"] = got
    rep["rank"] = rank


def one_sided(rep):
    """Failures that only some ranks see (a NaN in one rank's slice, a query whose class or keys only one rank
    holds) raise on every rank, and the calls after them stay in step; mixed engines, the DataLocal statistics,
    the DDPM generators and IS's patch-size sweep (reviews of 2026-12-08)."""
    from patchmosaic.distributed.queries import Layout

    rank = launch.rank()
    rng = np.random.default_rng(5)
    train = rng.uniform(-1, 1, (4, 1, 6, 6))
    x = rng.standard_normal((1, 1, 6, 6))
    got = {}

    def attempt(name, call):
        try:
            call()
            got[name] = None
        except (ValueError, TypeError) as e:
            got[name] = f"{type(e).__name__}: {e}"

    lone = pmd.ShardedMachine("els", train[:1] if rank == 0 else train[:0], n_threads=1)  # rank 1: no keys
    attempt("nan_query", lambda: lone.denoise(np.full_like(x, np.nan), 0.5, 3))
    good = lone.denoise(x, 0.5, 3)  # the next call: in step, the one-process result
    got["after_diff"] = float(np.abs(good - pm.ELS(train[:1]).denoise(x, 0.5, 3)).max())
    bad = train.copy()
    bad[3, 0, 2, 2] = np.nan
    attempt("nan_shard", lambda: pmd.ShardedMachine("ls", bad[:2] if rank == 0 else bad[2:], n_threads=1))
    lab = np.array([0, 0, 1, 1])  # rank 0 holds class 0, rank 1 class 1
    by_class = pmd.ShardedMachine("ls", train[:2] if rank == 0 else train[2:], lab[:2] if rank == 0 else lab[2:],
                                  n_threads=1)
    attempt("t_range", lambda: by_class.denoise(np.concatenate([x, x]), [0.5, 1.5], 3, labels=[0, 1]))
    mixed = pmd.ShardedMachine("is", train[:2] if rank == 0 else train[2:], n_threads=1,
                               backend="torch" if rank == 0 else "cpu")
    got["is_mixed_diff"] = float(np.abs(mixed.denoise(x, 0.3) - pm.IS(train).denoise(x, 0.3)).max())
    attempt("is_denoise_ks", lambda: mixed.denoise_ks(x, 0.3, [3, 5]))
    attempt("datalocal_own_statistics", lambda: pmd.ShardedDataLocal(train[2 * rank: 2 * rank + 2],
                                                                       statistics=train[2 * rank: 2 * rank + 2]))
    lay = Layout(2)  # the two ranks share one query shard
    den = pm.MachineDenoiser(lay.machine("els", train.astype(np.float32), n_threads=1), 3)
    attempt("ddpm_generators", lambda: lay.sample(pm.ddpm, den, torch.from_numpy(x.astype(np.float32)), steps=2,
                                                  progress=False, generator=torch.Generator().manual_seed(rank)))
    split = Layout(1)  # query shards of 2 and 1 seeds: their draws advance the generators differently
    sden = pm.MachineDenoiser(split.machine("els", train.astype(np.float32), n_threads=1), 3)
    gen = torch.Generator().manual_seed(11)
    x3 = torch.from_numpy(rng.standard_normal((3, 1, 6, 6)).astype(np.float32))
    for i in range(2):  # the same generator twice: the second call agrees as the first did
        attempt(f"ddpm_call{i}", lambda: split.sample(pm.ddpm, sden, x3, steps=2, progress=False, generator=gen))
    rep["one_sided"] = got


def main():
    mode, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    if mode in ("kill", "stall"):
        failure(out, mode)
        return
    pmd.init()
    rep = {}
    try:
        for step in mode.split(","):
            if step == "keys":
                keys(out)
            elif step == "index":
                index_backend(out)
            elif step == "datalocal":
                data_local(out)
            elif step in ("exp1", "exp2"):
                rep.update(experiments(out, step == "exp1"))
            elif step == "cli":
                cli_sample(out, rep)
            elif step == "mismatch":
                mismatch(rep)
            elif step == "onesided":
                one_sided(rep)
    finally:
        pmd.shutdown()
    if rep:
        with open(os.path.join(out, f"exp{rep.get('rank', 0)}.json"), "w") as f:
            json.dump(rep, f)


if __name__ == "__main__":
    main()
