"""PSPC-Square against its reference implementation (plai-group/pspc, ``pspc/denoisers.py``, CC BY-NC-SA), on the
same CPU, data and noise levels, in one process, the two interleaved (issue 27).

The reference is not part of this project: pass a checkout with ``--pspc PATH`` (its ``pspc`` package is imported from
there; its data set class is replaced by a stand-in holding the images, the only thing its denoisers read). Both sides
denoise the same query with the same training images (raw uint8 pixels, ``x / 127.5 - 1``, at their own size: MNIST
28 x 28, no mirrors) at the same noise level: theirs in the variance-exploding coordinates ``D(z, sigma)``, ours
``pm.PSPC.denoise(a z, t(sigma), p)`` (``a = 1 / sqrt(1 + sigma^2)``, ``t`` the cosine-legacy time of ``sigma``), which
is the same posterior mean; the outputs are compared. Each configuration is timed ``--repeat`` times, the two sides
alternating, and the best of each kept (the machine is shared: the best is the least disturbed); our first call at a
size (which builds and caches the size's table of crops) is reported apart, and so is the process's first call of the
engine (loading the compiled core).

    python bench/vs_pspc.py --pspc /work/pspc --n-train 2000 --sizes 5,9 --threads 1 --json bench/results/vs_pspc.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import patchmosaic as pm  # noqa: E402
from common import SHARED, machine_line  # noqa: E402


class Images:
    """What the reference's denoisers read of a data set: its length, items ``(uint8 CHW, label)``, shape, channels
    and resolution."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.image_shape = list(x.shape[1:])
        self.num_channels = x.shape[1]
        self.resolution = x.shape[2]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def reference_modules(path: str):
    if not os.path.isfile(os.path.join(path, "pspc", "denoisers.py")):
        raise SystemExit(f"--pspc {path}: no pspc/denoisers.py there (a checkout of plai-group/pspc)")
    sys.path.insert(0, path)
    import pspc.denoisers as den  # noqa: E402
    import pspc.utils as utils  # noqa: E402

    return den, utils


def raw_mnist(n: int) -> np.ndarray:
    x = np.load(os.path.join(SHARED, "data", "mnist.npz"))["x_train"][:n]
    return np.ascontiguousarray(x[:, None])  # (N, 1, 28, 28) uint8


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pspc", default=os.environ.get("PSPC"), help="a checkout of plai-group/pspc")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--sizes", default="5,9", help="comma-separated patch sizes p")
    p.add_argument("--sigmas", default="0.5,2.0", help="comma-separated noise levels (EDM sigma)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides) and our engine's threads")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not args.pspc:
        raise SystemExit("--pspc PATH (or $PSPC) is required: a checkout of plai-group/pspc")
    torch.set_num_threads(args.threads)
    den, utils = reference_modules(args.pspc)
    x = raw_mnist(args.n_train)
    N, C, H, W = x.shape
    data = Images(x)
    train = torch.from_numpy(x).float() / 127.5 - 1  # the reference's default_preprocess_fn
    sched = pm.schedules.cosine_legacy
    report = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": machine_line(),
              "torch": torch.__version__, "threads": args.threads, "n_train": N, "shape": [C, H, W],
              "batch": args.batch, "repeat": args.repeat, "runs": []}
    gen = torch.Generator().manual_seed(0)
    # the process's first call of the engine (loading the compiled core, registering the ops), reported apart
    _, report["ours_process_first_call_s"] = timed(lambda: pm.PSPC(train[:2]).denoise(train[:1], 0.5, 1))
    for p_size in (int(v) for v in args.sizes.split(",")):
        theirs = den.PSPCSquareDenoiser(data, torch.tensor([p_size, p_size]))
        ours = pm.PSPC(train, n_threads=args.threads)
        first = True
        for sigma in (float(v) for v in args.sigmas.split(",")):
            t = sched.time_at_sigma(sigma)
            a = 1.0 / np.sqrt(1.0 + sigma * sigma)
            clean = train[torch.randint(N, (args.batch,), generator=gen)]
            z = clean + sigma * torch.randn(clean.shape, generator=gen)  # x = x0 + sigma n
            tz = torch.full((args.batch,), sigma)
            cold = None
            if first:
                _, cold = timed(lambda: ours.denoise(a * z, t, p_size))  # builds the table of crops
                first = False
            best_t, best_o = np.inf, np.inf
            for _ in range(args.repeat):
                ref, s_t = timed(lambda: theirs(z, tz))
                out, s_o = timed(lambda: ours.denoise(a * z, t, p_size))
                best_t, best_o = min(best_t, s_t), min(best_o, s_o)
            diff = float((ref.double() - out.double()).abs().max())
            run = {"p": p_size, "sigma": sigma, "t": t, "reference_s": best_t, "ours_s": best_o,
                   "ours_first_call_s": cold, "speedup": best_t / best_o, "max_abs_diff": diff}
            report["runs"].append(run)
            print(f"p={p_size} sigma={sigma:g} (t={t:.4f}): reference {best_t * 1e3:8.1f} ms, ours {best_o * 1e3:6.2f} ms"
                  + ("" if cold is None else f" (first call {cold * 1e3:.1f} ms)")
                  + f", {best_t / best_o:6.1f}x; max |difference| {diff:.2g}", flush=True)
            if args.json:
                pm.io.runstate.write_json(args.json, report)
    print(f"{platform.processor() or platform.machine()}; {machine_line()}; torch threads {args.threads}")


if __name__ == "__main__":
    main()
