"""Peak resident memory of one engine call beyond the training images (run in a fresh process).

    python bench/memory.py --n-train 60000 --k 15 --batch 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load  # noqa: E402

import patchmosaic as pm  # noqa: E402


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--boundary", default="zeros")
    args = p.parse_args()
    images, _ = load("mnist", args.n_train)
    m = pm.ELS(images, boundary=args.boundary)
    x = np.random.default_rng(0).standard_normal((args.batch, 1, 32, 32)).astype(np.float32)
    m.denoise(x[:1, :, :, :], 0.5, 1)  # warm up: the machine's float32 training copy, thread pools
    before = status_mib("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    m.denoise(x, 0.5, args.k)
    dt = time.perf_counter() - t0
    peak = status_mib("VmHWM")
    print(f"{time.strftime('%Y-%m-%d')}: ELS({args.boundary}) N={args.n_train} k={args.k} B={args.batch}: "
          f"training images {images.nbytes / 2**20:.0f} MiB; RSS before the call {before:.0f} MiB, "
          f"peak during it {peak:.0f} MiB -> {peak - before:.0f} MiB beyond "
          f"what was resident (call took {dt:.1f}s)")


if __name__ == "__main__":
    main()
