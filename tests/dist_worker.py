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
            elif step in ("exp1", "exp2"):
                rep.update(experiments(out, step == "exp1"))
            elif step == "cli":
                cli_sample(out, rep)
    finally:
        pmd.shutdown()
    if rep:
        with open(os.path.join(out, f"exp{rep.get('rank', 0)}.json"), "w") as f:
            json.dump(rep, f)


if __name__ == "__main__":
    main()
