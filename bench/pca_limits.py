"""What bounds a warm PCA-locality call on MNIST (issue 25's 20x target), measured on the machine's own masks.

Four questions, each on the Studio's DDIM timesteps (linear betas 1e-4..0.02 over 1000 steps, t = (tau + 1) / 1000)
and MNIST's published threshold 0.005:

1. ``--part significance``: along a 20-step DDIM sample from one seed, the share of (pixel, training image) pairs
   whose logit is within 60 of its pixel's largest (weight above e^-60 of the largest), and the share of blocks of
   16 images holding at least one (a trailing partial block left out). Any pruning that is exact to e^-60 must
   still compute these.
2. ``--part plans``: per row, the vector loads of the engine's plan in a simplified form of its cost model (an
   element 2, a run 4, a chained row's added and dropped elements 2 each plus 8; runs split at image rows; no
   minimum saving for chains), against plans the engine does not have: the added and dropped elements as
   horizontal or vertical runs of prefix sums (4 each), a row chained from the row above (r - W) or other
   earlier rows as well as from r - 1, and the best any chaining can do: every row summed from whichever row (or on
   its own) makes the total least, a minimum spanning tree over the rows (scipy).
3. ``--part overhead``: the engine alone (one thread) on a synthetic table of 4 scattered elements per row (N images of
   uniform noise, MNIST's 784 rows): what a row costs besides its distances, per row and block of 16 images.
4. ``--part bounds``: the share of the Wiener matrix's entries that the Cauchy-Schwarz bound
   ``|L[m, n]| <= sqrt(L[m, m] L[n, n])`` leaves undecided (at or above the threshold): the entries a mask build
   that skips the decided ones would still compute.

    python bench/pca_limits.py --n-train 2000 --json bench/results/pca_limits/mnist2000.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import patchmosaic as pm  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
THETA = 0.005
EL, RUN, OVERHEAD = 2, 4, 8  # the engine's cost model (aligned_softmax.cpp: chain_rows), in vector loads
TAUS = list(range(950, -1, -50))


def studio_schedule():
    ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    grid = (np.arange(1000) + 1) / 1000.0
    return pm.schedules.FromCallable(lambda t: np.interp(np.asarray(t, np.float64), grid, ac), name="studio_ddim")


def runs(S: np.ndarray, side: int, vertical: bool) -> np.ndarray:
    """Lengths of the maximal runs of consecutive elements of the sorted set S within image rows (or columns)."""
    if len(S) == 0:
        return np.zeros(0, np.int64)
    if vertical:
        S = np.sort((S % side) * side + S // side)
    brk = np.flatnonzero((np.diff(S) != 1) | (S[1:] // side != S[:-1] // side))
    edges = np.concatenate([[0], brk + 1, [len(S)]])
    return np.diff(edges)


def set_cost(S: np.ndarray, side: int) -> int:
    """An added or dropped set's loads as runs of prefix sums where cheaper than its elements, in the cheaper
    orientation."""
    return min(int(np.minimum(RUN, EL * runs(S, side, v)).sum()) for v in (False, True))


def plan_costs(rows, side: int) -> dict:
    total = {"engine": 0, "delta_runs": 0, "row_above": 0, "five_predecessors": 0}
    own = np.array([min(RUN * len(runs(S, side, False)), EL * len(S)) for S in rows], np.float64)  # on its own
    for r, S in enumerate(rows):
        if len(S) == 0:
            continue
        best = {k: own[r] for k in total}
        for off in (1, 2, side - 1, side, side + 1):
            p = r - off
            if p < 0 or len(rows[p]) == 0:
                continue
            add, drop = np.setdiff1d(S, rows[p]), np.setdiff1d(rows[p], S)
            by_elements = EL * (len(add) + len(drop)) + OVERHEAD
            by_runs = set_cost(add, side) + set_cost(drop, side) + OVERHEAD
            if off == 1:
                best["engine"] = min(best["engine"], by_elements)
                best["delta_runs"] = min(best["delta_runs"], by_runs)
            if off in (1, side):
                best["row_above"] = min(best["row_above"], by_elements)
            best["five_predecessors"] = min(best["five_predecessors"], by_elements)
        for k in total:
            total[k] += best[k]
    total["tree"] = tree_cost(rows, own)
    return {k: v / len(rows) for k, v in total.items()}


def tree_cost(rows, own: np.ndarray) -> float:
    """The least total over rows each summed on its own (cost ``own``) or from any other row (added and dropped
    elements): a minimum spanning tree over the rows and a root whose edge to each row is that row's own cost."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    D = len(rows)
    M = np.zeros((D, D))  # (PCA-locality: a row per element)
    for r, S in enumerate(rows):
        M[r, S] = 1.0
    sizes = M.sum(1)
    delta = sizes[:, None] + sizes[None, :] - 2 * (M @ M.T)
    w = np.zeros((D + 1, D + 1))
    w[:D, :D] = EL * delta + OVERHEAD
    w[:D, :D][(sizes[:, None] == 0) | (sizes[None, :] == 0)] = np.inf  # an empty row is nobody's predecessor
    w[D, :D] = w[:D, D] = own
    w[w == 0] = 1e-12  # (a zero weight means no edge to scipy)
    w[np.isinf(w)] = 0
    np.fill_diagonal(w, 0)
    return float(minimum_spanning_tree(w).sum())


def row_overhead(n: int, per_row: int = 4, repeat: int = 30) -> dict:
    """CPU ms per call of the engine (ops.aligned_softmax, one thread) on 784 rows of ``per_row`` scattered
    elements (even elements only: no runs; drawn anew per row: no chains)."""
    from patchmosaic import ops

    rng = np.random.default_rng(0)
    D = 784
    train = torch.from_numpy(rng.uniform(-1, 1, (n, 1, 28, 28)).astype(np.float32))
    q = torch.from_numpy(rng.uniform(-1, 1, (1, 1, 28, 28)).astype(np.float32))
    rows = [np.sort(rng.choice(np.arange(0, D, 2), per_row, replace=False)) for _ in range(D)]
    table = (torch.from_numpy(np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)),
             torch.from_numpy(np.concatenate(rows).astype(np.int32)), None,
             torch.arange(D + 1, dtype=torch.int64), torch.arange(D, dtype=torch.int32))
    labels = ops.LabelIndex.from_labels(None).tensors()
    a = torch.tensor([0.5], dtype=torch.float64)

    def call():
        return ops.aligned_softmax(train, q, a, a, None, None, *labels, *table, False, "cpu", 1, 1 << 32)

    call()
    c0 = time.process_time()
    for _ in range(repeat):
        call()
    ms = 1000 * (time.process_time() - c0) / repeat
    return {"per_row": per_row, "ms_per_call": ms, "ns_per_row_and_block": 1e6 * ms / (D * -(-n // 16))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--part", default="significance,plans,overhead,bounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    parts = args.part.split(",")
    x = np.load(os.path.join(SHARED, "data", "mnist.npz"))["x_train"][: args.n_train][:, None]
    x = (x.astype(np.float32) / 255.0 - 0.5) * 2
    sched = studio_schedule()
    m = pm.PCALocality(x, threshold=THETA, schedule=sched)
    side = x.shape[-1]
    out = {"command": " ".join(["bench/pca_limits.py"] + sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
           "n_train": args.n_train, "threshold": THETA, "rows": []}
    Y = torch.from_numpy(x.reshape(len(x), -1)).double()
    xt = torch.randn(1, *x.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    if "overhead" in parts:
        out["overhead"] = row_overhead(args.n_train)
        print(json.dumps(out["overhead"]), flush=True)
    for k, tau in enumerate(TAUS):
        t = (tau + 1) / 1000
        a, b2 = sched.scalar_coefficients(t)
        row = {"timestep": tau, "t": t, "hood": float(m.neighbourhood_sizes(t).double().mean())}
        if "significance" in parts:
            mask = m.mask(t).double()  # column m: output element m's neighbourhood
            logit = -(((xt.reshape(1, -1) - a * Y) ** 2) @ mask) / (2 * b2)  # temperature 1
            sig = logit >= logit.max(0).values - 60
            n16 = len(Y) // 16 * 16
            row["pairs_significant"] = float(sig.double().mean())
            row["blocks_needed"] = float(sig[:n16].reshape(n16 // 16, 16, -1).any(1).double().mean())
            x0 = m.denoise(xt, t).double()  # the sample's next step (DDIM, eta 0)
            if k + 1 < len(TAUS):
                a1, b21 = sched.scalar_coefficients((TAUS[k + 1] + 1) / 1000)
                xt = a1 * x0 + np.sqrt(b21) * (xt - a * x0) / np.sqrt(b2)
        if "plans" in parts:
            hp, he = (v.numpy() for v in m.cached_table(t, THETA)[:2])
            rows = [np.sort(he[hp[r] : hp[r + 1]]) for r in range(len(hp) - 1)]
            row["loads_per_row"] = plan_costs(rows, side)
        if "bounds" in parts:
            M = m.matrix(t)  # L with each row divided by its diagonal (by 1 below 1e-6)
            d = (m._factor(t) ** 2).sum(1)  # L's diagonal
            dd = torch.where(d.abs() < 1e-6, torch.ones_like(d), d)
            top = M.abs().max()
            bound = torch.sqrt(d[:, None] * d[None, :]) / dd[:, None]
            row["mask_share"] = float((M.abs() >= THETA * top).double().mean())
            row["cauchy_schwarz_undecided"] = float((bound >= THETA * top).double().mean())
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    if "plans" in parts:
        tot = {k: sum(r["loads_per_row"][k] for r in out["rows"]) for k in out["rows"][0]["loads_per_row"]}
        out["plans_total_ratio"] = {k: tot["engine"] / v for k, v in tot.items()}
        print("loads, engine / alternative, over the 20 timesteps:", out["plans_total_ratio"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
