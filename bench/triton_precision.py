"""The error budget of the Triton engine's split precision (issue 26): float32 logit errors of the tf32x3 products
against float64, on MNIST and CIFAR-10 patches, k = 3..23, t = 0.02..1.

For each data set, patch size and time: ``--queries`` query patches of noisy images (``x_t = a x0 + b eps``,
cosine_legacy schedule; MNIST test digits, CIFAR-10 images 9000+), ``--keys`` key patches of training images
(zero padding, positions drawn uniformly), and their shifted logits ``s (2 a q.k - a^2 |k|^2)`` computed

- in float64 from the same float32 patches (the reference),
- as the Triton kernels compute them (ops/triton_engine/precision.py): split precision with the tensor core's
  accumulation rounded to nearest (``rn``) or towards zero (``rz``, the worse), a fresh accumulator per chunk of
  ``--chunk`` elements as the kernel does; ``rz_carry``: one truncating accumulator carried through the whole
  patch (what chaining ``tl.dot(a, b, acc)`` would do, for comparison); and plain float32 (``ieee``: what the
  float32 CPU and CUDA engines do).

Reported per (data, k, t): the largest absolute logit error, and ``kappa``, the largest error in units of
``u = 2^-24 s a |k| (2 |q| + a |k|)``: float32's unit roundoff times the size of the two terms the logit is formed
from (the scale of the test suite's ``lam = 6e-8 s |Q| |a K|`` when ``|q| ~ a |k|``), per model.

    python bench/triton_precision.py --json bench/results/triton_precision.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import SHARED, load, machine_line  # noqa: E402

import patchmosaic as pm  # noqa: E402
from patchmosaic.ops.triton_engine import precision  # noqa: E402

MODES = ("rz", "rz_carry", "rn", "ieee")


def patches(images: torch.Tensor, k: int, idx: np.ndarray, pos: np.ndarray) -> torch.Tensor:
    """Zero-padded ``k x k`` patches (all channels) of ``images[idx]`` at flat positions ``pos``."""
    N, C, H, W = images.shape
    r = k // 2
    pad = torch.nn.functional.pad(images[torch.from_numpy(idx)], (r, r, r, r))
    i, j = pos // W, pos % W
    out = torch.stack([pad[n, :, i[n]:i[n] + k, j[n]:j[n] + k].reshape(-1) for n in range(len(idx))])
    return out.contiguous()


def data(name: str):
    """(keys' images, queries' clean images) as float32 tensors in [-1, 1]."""
    if name == "mnist":
        train, _ = load("mnist", 60000)
        from patchmosaic.data import preprocess

        test = preprocess(np.load(os.path.join(SHARED, "data", "mnist.npz"))["x_test"][:1000]).numpy()
        return torch.from_numpy(train), torch.from_numpy(test)
    x, _ = load("cifar10")
    return torch.from_numpy(x[:9000]), torch.from_numpy(x[9000:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["mnist", "cifar10"])
    p.add_argument("--ks", type=int, nargs="+", default=list(range(3, 24, 2)))
    p.add_argument("--ts", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.3, 0.6, 1.0])
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--keys", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=32, help="patch elements per kernel chunk (BLOCK_D)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "triton_precision.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    res = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
           "torch": torch.__version__, "unit": "2^-24 s a |k| (2 |q| + a |k|)", "rows": []}
    for name in args.data:
        train, clean = data(name)
        N, C, H, W = train.shape
        rng = np.random.default_rng(0)
        for k in args.ks:
            kidx = rng.integers(0, N, args.keys)
            kpos = rng.integers(0, H * W, args.keys)
            K = patches(train, k, kidx, kpos)
            qidx = rng.integers(0, len(clean), args.queries)
            qpos = rng.integers(0, H * W, args.queries)
            eps = torch.from_numpy(rng.standard_normal((args.queries, C, H, W)).astype(np.float32))
            for t in args.ts:
                a, b2 = pm.schedules.cosine_legacy.scalar_coefficients(t)
                a, s = float(a), 0.5 / float(b2)
                xt = (a * clean[torch.from_numpy(qidx)] + math.sqrt(b2) * eps).float()
                Q = patches(xt, k, np.arange(args.queries), qpos)
                ref = precision.exact_logits(Q, K, a, s)
                qn, kn = Q.double().norm(dim=1)[:, None], K.double().norm(dim=1)[None, :]
                unit = 2.0 ** -24 * s * a * kn * (2 * qn + a * kn)
                row = {"data": name, "C": C, "k": k, "t": t, "s": s, "a": a,
                       "logit_spread": float((ref.amax(1) - ref.amin(1)).median())}
                for mode in MODES:
                    got = precision.logits(Q, K, a, s, mode.split("_")[0], args.chunk, flush=mode != "rz_carry")
                    err = (got.double() - ref).abs()
                    kappa = err / unit.clamp(min=1e-300)
                    row[f"{mode}_max_abs"] = float(err.max())
                    row[f"{mode}_kappa_max"] = float(kappa.max())
                    row[f"{mode}_kappa_p99"] = float(torch.quantile(kappa.flatten()[::7].float(), 0.99))
                res["rows"].append(row)
                print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}),
                      flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    # summary: worst kappa per data set and model, and the worst absolute errors
    print("\n| data | k | worst kappa rz | rz carried | rn | float32 | worst abs logit error rz (at t) | float32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.data:
        for k in args.ks:
            rows = [r for r in res["rows"] if r["data"] == name and r["k"] == k]
            w = max(rows, key=lambda r: r["rz_max_abs"])
            print(f"| {name} | {k} | {max(r['rz_kappa_max'] for r in rows):.2f} | "
                  f"{max(r['rz_carry_kappa_max'] for r in rows):.2f} | "
                  f"{max(r['rn_kappa_max'] for r in rows):.2f} | {max(r['ieee_kappa_max'] for r in rows):.2f} | "
                  f"{w['rz_max_abs']:.2e} ({w['t']}) | {max(r['ieee_max_abs'] for r in rows):.2e} |")


if __name__ == "__main__":
    main()
