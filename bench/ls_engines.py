"""LS on the same-position engine against LS on the key-set engine (issue 25: "LS gains the same way"), side by side
in one process on the same calls: ``pm.LS(...).denoise`` (ops.aligned_softmax: each training image's squared
residual once, summed over every pixel's patch) and the same machine through ops.local_softmax with LS's key set
(the engine LS used before), float32, CPU engine, interleaved repeats, the best of each.

    python bench/ls_engines.py --data mnist,cifar10 --n-train 2000 --ks 3,7,11,15 --batch 1,8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

import patchmosaic as pm  # noqa: E402
from common import load, machine_line  # noqa: E402
from patchmosaic import ops  # noqa: E402
from patchmosaic.machines import keysets  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist,cifar10")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--ks", default="3,7,11,15")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--t", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=os.path.join(HERE, "results", "ls_engines.json"))
    args = p.parse_args()
    rows = []
    print(f"{machine_line()}, {time.strftime('%Y-%m-%d')}, t = {args.t}, float32, CPU engine ({ops.cpu_variant()})")
    print("| data | N | B | k | key-set engine (s) | same-position engine (s) | speed-up | max difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.data.split(","):
        images, _ = load(name, args.n_train)
        m = pm.LS(images)
        N, C, H, W = images.shape
        train = m.train_as(torch.float32, torch.device("cpu"))
        lv, lp, li = m._label_tensors
        for B in (int(v) for v in args.batch.split(",")):
            x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(B))
            a, s, _ = m.coefficients(args.t, B)
            for k in (int(v) for v in args.ks.split(",")):
                classes = keysets.class_maps("ls", H, W, H, W, k)
                old_fn = lambda: ops.local_softmax(train, x, a, s, None, None, lv, lp, li, *classes, k, False,  # noqa
                                                   "cpu", 0, 0)[0]
                new_fn = lambda: m.denoise(x, args.t, k)  # noqa: E731
                t_old, t_new = float("inf"), float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    u = old_fn()
                    t_old = min(t_old, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    v = new_fn()
                    t_new = min(t_new, time.perf_counter() - t0)
                diff = float((u - v).abs().max())
                rows.append({"data": name, "N": N, "B": B, "k": k, "key_set_s": t_old, "same_position_s": t_new,
                             "speedup": t_old / t_new, "max_difference": diff})
                print(f"| {name} | {N} | {B} | {k} | {t_old:.4f} | {t_new:.4f} | {t_old / t_new:.1f}x | {diff:.1e} |",
                      flush=True)
    pm.io.runstate.write_json(args.json, {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                                          "machine": machine_line(), "rows": rows})


if __name__ == "__main__":
    main()
