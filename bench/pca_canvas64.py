"""PCA-locality on a 64x64 canvas (issue 25): 10,000 CIFAR-10 training images upsampled bilinearly to 64x64x3 (D =
12,288, beyond the reference implementation's dense D x D product per batch), the authors' 64x64 threshold 0.02.

Times, on this CPU: building the machine (the covariance's thin SVD, float64), and per step of a sampler the parts of
a call -- the noise level's masks (ops/wiener_mask.py: the Wiener matrix U diag(shrink) U^T as a float32 product with
an error bound, its exact largest entry, then the element table, entries the bound cannot decide recomputed in
float64; the float64 matrix's own time alongside, for comparison) and the softmax over all training images on the
same-position engine (B = 1) -- and prints the counts behind each part.

    python bench/pca_canvas64.py --n-train 10000 --times 0.9,0.5,0.2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

import patchmosaic as pm  # noqa: E402
from common import SHARED, machine_line  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.02)
    p.add_argument("--times", default="0.9,0.5,0.2")
    p.add_argument("--json", default=os.path.join(HERE, "results", "pca_canvas64.json"))
    args = p.parse_args()
    x = np.load(os.path.join(SHARED, "data", "cifar10_10k.npz"))["x_train"][: args.n_train]
    x = torch.from_numpy(x.transpose(0, 3, 1, 2) if x.shape[-1] == 3 else x).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False).clamp(-1, 1)
    N, C, H, W = x.shape
    D = C * H * W
    t0 = time.perf_counter()
    m = pm.PCALocality(x, threshold=args.threshold)
    build = time.perf_counter() - t0
    r = m._U.shape[1]
    print(f"{N} images {C}x{H}x{W} (D = {D}), rank {r}: machine built (thin SVD, float64) in {build:.1f} s", flush=True)
    q = (0.5 * x[:1] + 0.8 * torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(0))).float()
    rows = []
    for t in (float(v) for v in args.times.split(",")):
        t0 = time.perf_counter()
        M = m.matrix(t)  # the float64 matrix, for comparison (the masks no longer need it)
        t_matrix64 = time.perf_counter() - t0
        del M
        m._level, m._tables = (None, None, None), {}
        t0 = time.perf_counter()
        m._noise_level(t)  # the float32 product with its error bound, and the exact largest entry
        t_level = time.perf_counter() - t0
        checked_max = m._checked
        t0 = time.perf_counter()
        table = m._table(t, m.threshold)  # the exact neighbourhoods: the bound decides, float64 where it cannot
        t_table = time.perf_counter() - t0
        nnz = int(table[1].numel())
        t0 = time.perf_counter()
        m.denoise(q, t)
        t_softmax = time.perf_counter() - t0
        row = {"t": t, "matrix64_s": t_matrix64, "masks_product_s": t_level, "masks_table_s": t_table,
               "recomputed": checked_max + m._checked, "softmax_s": t_softmax,
               "step_s": t_level + t_table + t_softmax, "mean_hood": nnz / D, "gemm_flops": 2.0 * D * D * r,
               "softmax_pairs": float(N) * nnz}
        rows.append(row)
        print(f"t={t}: masks {t_level:.1f} s (float32 product of {row['gemm_flops'] / 1e12:.2f} TFLOP at most, its "
              f"largest entry) + {t_table:.1f} s (table; {row['recomputed']} entries recomputed in float64) [the "
              f"float64 matrix alone: {t_matrix64:.1f} s], softmax over {N} images {t_softmax:.2f} s (mean "
              f"neighbourhood {nnz / D:.0f} elements, {row['softmax_pairs']:.2g} element-image pairs): "
              f"{row['step_s']:.1f} s per step", flush=True)
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
           "n_train": N, "D": D, "rank": r, "threshold": args.threshold, "build_s": build, "steps": rows}
    pm.io.runstate.write_json(args.json, out)


if __name__ == "__main__":
    main()
