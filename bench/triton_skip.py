"""How often the Triton engine's key-tile skip fires (issue 26), on MNIST and CIFAR-10 across t.

The kernel (ops/triton_engine/kernels.py) skips the exponentials, sums and value products of a key tile when, for
every row of its row tile, the tile's largest logit lies more than 87 (float32's clamped-exponential cut) below
the row's running maximum: those weights are exactly 0, so the result does not change. Its running maximum is
the maximum over the item's earlier key tiles (a skipped tile cannot raise it), so whether a tile is skipped
depends only on the logits, the tile shapes and the work items. This script replays that decision with torch on
the CPU for the plan the engine makes (ops/triton_engine/plan.py: rows in tiles of ``--block-m``, keys in tiles of
``--block-n``, each row tile's keys split into work items as on a GPU with ``--sms`` multiprocessors), from float32
logits, and reports the fraction of key tiles skipped (the share of the exponential work saved), per data set,
machine, k and t. One query image (B = 1), ``--n-train`` training images (fewer than the full set: the CPU has to
form every logit; the rate grows with N, since a running maximum found early prunes more later tiles).
``--check`` runs the real kernel under Triton's interpreter on a small case and compares its count.

    python bench/triton_skip.py --json bench/results/triton_skip.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import SHARED, load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402
from patchmosaic.ops import reference  # noqa: E402
from patchmosaic.ops.triton_engine import plan as planning  # noqa: E402

CUT = 87.0


def machine(kind: str, train: torch.Tensor):
    return pm.ELS(train) if kind == "els_zeros" else pm.ELS(train, boundary="circular")


def skip_counts(train: torch.Tensor, x: torch.Tensor, k: int, t: float, kind: str, block_m: int, block_n: int,
                sms: int, items_per_sm: int = 4, key_chunk: int = 1 << 16, order: str = "pixel"):
    """(key tiles, skipped key tiles, items) of one call (B = 1) under the engine's plan and skip rule; ``order``:
    the rows of each class in pixel order (the engine's), or ``"norm"``: sorted by query patch norm."""
    N, C, H, W = train.shape
    ks = machine(kind, train).keyset(H, W, k)
    groups = SimpleNamespace(grp_img_ptr=np.array([0, N], np.int64), grp_img=np.arange(N, dtype=np.int32),
                             group_of_b=np.zeros(1, np.int32))
    elem = planning.elements(k, C, ks.n_classes, None)
    whole = planning.plan(ks, groups, 1, elem, block_m, 1 << 62, 1)
    total = int(np.sum(whole.items[:, 7] - whole.items[:, 6]))
    kpi = -(-max(2048, -(-total // (items_per_sm * sms))) // 256) * 256 if sms else 1 << 62
    p = planning.plan(ks, groups, 1, elem, block_m, kpi, block_n)
    a, b2 = pm.schedules.cosine_legacy.scalar_coefficients(t)
    a, s = float(a), 0.5 / float(b2)
    tiles = skipped = 0
    # per segment (class): the tile maxima of every row over the segment's keys, then per item its run
    seg_of_item = {}
    for i, it in enumerate(p.items):
        seg_of_item.setdefault((int(it[2]), int(it[4])), []).append(i)
    for (kpos0, img0), items in seg_of_item.items():
        it0 = p.items[items[0]]
        n_pos, n_img = int(it0[3]), int(it0[5])
        kpos = torch.from_numpy(np.asarray(ks.cls_kpos[kpos0:kpos0 + n_pos], np.int64))
        rows = sorted({int(p.items[i][0]) for i in items})
        r0, r1 = rows[0], max(int(p.items[i][0] + p.items[i][1]) for i in items)
        pix = torch.from_numpy(p.row_pix[r0:r1].astype(np.int64))
        Q = reference.patches(x, torch.zeros(len(pix), dtype=torch.int64), pix, k, ks.query_pad)
        if order == "norm":  # rows of one class are independent: any order gives the same result
            Q = Q[torch.argsort(Q.norm(dim=1), stable=True)]
        nkeys = n_img * n_pos
        n_tiles_k = -(-nkeys // block_n)
        tmax = torch.empty((r1 - r0, n_tiles_k), dtype=torch.float32)
        for c0 in range(0, nkeys, key_chunk):
            c1 = min(nkeys, c0 + key_chunk)
            j = torch.arange(c0, c1)
            K = reference.patches(train, j // n_pos, kpos[j % n_pos], k, ks.key_pad)
            L = s * (2 * a * (Q @ K.T) - (a * a) * (K * K).sum(1)[None, :])
            pad = (-(c1 - c0)) % block_n
            if pad:
                L = torch.nn.functional.pad(L, (0, pad), value=-float("inf"))
            tmax[:, c0 // block_n:c0 // block_n + L.shape[1] // block_n] = L.view(len(pix), -1, block_n).amax(-1)
        for i in items:
            row_start, n_rows, k0, k1 = (int(v) for v in p.items[i][[0, 1, 6, 7]])
            seg = tmax[row_start - r0:row_start - r0 + n_rows, k0 // block_n:-(-k1 // block_n)]
            run = torch.cummax(seg, dim=1).values
            before = torch.cat([torch.full((n_rows, 1), -float("inf")), run[:, :-1]], dim=1)
            skip = ((seg - before) < -CUT).all(dim=0)
            tiles += seg.shape[1]
            skipped += int(skip.sum())
    return tiles, skipped, len(p.items)


def query(clean: torch.Tensor, t: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b2 = pm.schedules.cosine_legacy.scalar_coefficients(t)
    x0 = clean[seed % len(clean)][None]
    return (float(a) * x0 + math.sqrt(float(b2)) * torch.randn(x0.shape, generator=g)).float()


def check_against_kernel() -> dict:
    """The emulation against the kernel's own count (Triton's interpreter) on a small MNIST case: 12 digits cropped
    to 16x16, one query at t = 0.05, k = 3, tiles of 32 rows and 32 keys, no split."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import triton_cases  # the test suite's speed-up of the interpreter (bit-identical results)

    triton_cases.interpreter_without_nested_repatching()
    from patchmosaic.ops import triton_engine as te

    crop = (slice(None), slice(None), slice(8, 24), slice(8, 24))
    train = torch.from_numpy(load("mnist", 12)[0][crop]).contiguous()
    x = query(torch.from_numpy(load("mnist", 20)[0][12:][crop]).contiguous(), 0.05, 3)
    out = {}
    te.settings.count, te.settings.block_m, te.settings.block_n = True, 32, 32
    for kind in ("els_zeros", "els_circular"):
        machine(kind, train).denoise(x, 0.05, 3, backend="triton")
        tiles, skipped, _ = skip_counts(train, x, 3, 0.05, kind, 32, 32, 0)
        kernel = dict(te.tuning.last_counts)
        out[kind] = {"kernel": {"key_tiles": kernel["key_tiles"], "skipped": kernel["skipped"]},
                     "emulation": {"key_tiles": tiles, "skipped": skipped}}
    te.settings.count, te.settings.block_m, te.settings.block_n = False, None, 128
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["mnist", "cifar10"])
    p.add_argument("--machines", nargs="+", default=["els_zeros", "els_circular"])
    p.add_argument("--ks", type=int, nargs="+", default=[3, 7, 11])
    p.add_argument("--ts", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.3, 0.6, 1.0])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU whose item split is replayed "
                   "(H100 SXM: 132; 0: no split)")
    p.add_argument("--order", default="pixel", choices=["pixel", "norm"],
                   help="rows of a class in pixel order (the engine's) or sorted by query patch norm")
    p.add_argument("--check", action="store_true", help="compare with the kernel's own count (interpreter)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "triton_skip.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    res = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
           "n_train": args.n_train, "block_m": args.block_m, "block_n": args.block_n, "sms": args.sms,
           "order": args.order, "rows": []}
    if args.check:
        res["check"] = check_against_kernel()
        print(json.dumps(res["check"]), flush=True)
    for name in args.data:
        if name == "mnist":
            train = torch.from_numpy(load("mnist", args.n_train)[0])
            from patchmosaic.data import preprocess

            clean = preprocess(np.load(os.path.join(SHARED, "data", "mnist.npz"))["x_test"][:16])
        else:
            x, _ = load("cifar10")
            train, clean = torch.from_numpy(x[:args.n_train]), torch.from_numpy(x[9000:9016])
        for kind in args.machines:
            for k in args.ks:
                for t in args.ts:
                    t0 = time.perf_counter()
                    tiles, skipped, n_items = skip_counts(train, query(clean, t, 1), k, t, kind, args.block_m,
                                                          args.block_n, args.sms, order=args.order)
                    row = {"data": name, "machine": kind, "k": k, "t": t, "key_tiles": tiles, "skipped": skipped,
                           "fraction": skipped / tiles, "items": n_items, "s": round(time.perf_counter() - t0, 1)}
                    res["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                    with open(args.json, "w") as f:
                        json.dump(res, f, indent=1)
    print("\n| data | machine | k | " + " | ".join(f"t = {t}" for t in args.ts) + " |")
    print("|---|---|---|" + "---|" * len(args.ts))
    for name in args.data:
        for kind in args.machines:
            for k in args.ks:
                rows = {r["t"]: r for r in res["rows"] if r["data"] == name and r["machine"] == kind and r["k"] == k}
                print(f"| {name} | {kind} | {k} | " + " | ".join(f"{rows[t]['fraction']:.1%}" for t in args.ts) + " |")


if __name__ == "__main__":
    main()
