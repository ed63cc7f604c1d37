"""How far the reference implementation's batch-averaged softmax moves PCA-locality (issue 25): the exact machine
(a softmax over all training images) against its approximation in the Analytic Diffusion Studio (the softmax
normalised within each data-loader batch of 512 images, the batch means averaged with equal weight;
``PCALocality(batch_average=512)``), with the authors' thresholds (MNIST and Fashion-MNIST 0.005, CIFAR-10 0.05).

Per reference network (../shared/models): (1) along the network's own 20-step DDIM trajectories, both machines'
denoiser outputs at every step (how far the approximation moves them); (2) both machines sampled from the network's
seeds (20 DDIM steps) and compared with it: Pearson r per seed, medians, and the paired per-seed difference.
Writes bench/results/pca_approximation/<network>.json and prints a table for RESULTS.

    python bench/pca_approximation.py --networks mnist_resnet_zeros,cifar10k_resnet_zeros_cond --limit 2000 --seeds 16
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
from patchmosaic.diffusion.denoisers import MachineDenoiser, NetworkDenoiser  # noqa: E402
from patchmosaic.diffusion.samplers import time_grid, update  # noqa: E402
from patchmosaic.networks import load_network  # noqa: E402

MNIST, CIFAR = os.path.join(SHARED, "data", "mnist.npz"), os.path.join(SHARED, "data", "cifar10_10k.npz")
FMNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
DATA = {"mnist_resnet_zeros": (MNIST, 0.005), "mnist_unet_zeros": (MNIST, 0.005), "mnist_resnet_circular": (MNIST, 0.005),
        "fmnist20k_resnet_zeros_cond": (FMNIST, 0.005), "cifar10k_resnet_zeros_cond": (CIFAR, 0.05),
        "cifar10k_unet_zeros_cond": (CIFAR, 0.05), "cifar10k_unet_attn_zeros_cond": (CIFAR, 0.05)}


def run(name: str, args) -> dict:
    data, theta = DATA[name]
    card_dir = os.path.join(SHARED, "models", name)
    cond = bool(json.load(open(os.path.join(card_dir, "card.json")))["conditional"])
    images, labels = pm.data.load(data, limit=args.limit)
    labels = labels if cond else None
    ref = np.load(os.path.join(card_dir, "ddim20_samples.npz"))
    seeds = torch.from_numpy(ref["seeds"][: args.seeds])
    ylab = torch.from_numpy(ref["labels"][: args.seeds]) if cond else None
    net = NetworkDenoiser(load_network(os.path.join(card_dir, "model.pt")))
    exact = pm.PCALocality(images, labels, threshold=theta)
    approx = pm.PCALocality(images, labels, threshold=theta, batch_average=args.batch_average)
    # (1) the denoiser outputs along the network's trajectories
    grid = time_grid(args.steps)
    x = seeds[: args.trajectories].float()
    yl = None if ylab is None else ylab[: args.trajectories]
    moves = []
    for i in range(args.steps):
        t, t_next = float(grid[i]), float(grid[i + 1])
        e, a = exact.denoise(x, t, labels=yl), approx.denoise(x, t, labels=yl)
        d = (e.double() - a.double()).abs()
        moves.append({"t": t, "max": float(d.max()), "mean": float(d.mean()),
                      "mean_hood": float(exact.neighbourhood_sizes(t).double().mean())})
        eps = net.eps(x, t, yl)
        ab, b2 = (float(v) for v in exact.schedule.coefficients(t))
        x = update(exact.schedule, x, (x - np.sqrt(b2) * eps) / np.sqrt(ab), t, t_next, eps=eps)
    # (2) samples against the network
    t0 = time.perf_counter()
    rep = pm.compare(net, {"PCA exact": MachineDenoiser(exact), "PCA batch-averaged": MachineDenoiser(approx)},
                     seeds, ylab, batch_size=args.batch, progress=not args.quiet,
                     out_dir=os.path.join(args.out, name), run_id=f"{name}:{args.limit}:{args.seeds}")
    r_e, r_a = (np.asarray(rep["per_seed"][m]["r"]) for m in ("PCA exact", "PCA batch-averaged"))
    out = {"network": name, "data": os.path.basename(data), "threshold": theta, "train_images": len(images),
           "batch_average": args.batch_average, "seeds": len(r_e), "moves": moves,
           "median_r": {"exact": float(np.median(r_e)), "batch_averaged": float(np.median(r_a))},
           "paired_r_difference": {"median": float(np.median(r_a - r_e)), "min": float((r_a - r_e).min()),
                                   "max": float((r_a - r_e).max()), "seeds_lower": int((r_a < r_e).sum())},
           "sample_difference": float((rep["samples"]["PCA exact"] - rep["samples"]["PCA batch-averaged"]).abs()
                                      .reshape(len(r_e), -1).max(1).values.median()),
           "seconds": round(time.perf_counter() - t0, 1), "machine": machine_line(), "date": time.strftime("%Y-%m-%d")}
    os.makedirs(args.out, exist_ok=True)
    pm.io.runstate.write_json(os.path.join(args.out, f"{name}.json"), out)
    worst = max(moves, key=lambda m: m["max"])
    print(f"| {name} | {len(images)} | {theta} | {worst['max']:.3f} (t = {worst['t']:.2f}) | "
          f"{np.mean([m['mean'] for m in moves]):.4f} | {out['median_r']['exact']:.3f} | "
          f"{out['median_r']['batch_averaged']:.3f} | {out['paired_r_difference']['median']:+.4f} "
          f"[{out['paired_r_difference']['min']:+.3f}, {out['paired_r_difference']['max']:+.3f}] | "
          f"{out['sample_difference']:.3f} |", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default="mnist_resnet_zeros,cifar10k_resnet_zeros_cond")
    p.add_argument("--limit", type=int, default=2000, help="training images")
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--trajectories", type=int, default=4, help="network trajectories for the output deviation")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-average", type=int, default=512)
    p.add_argument("--out", default=os.path.join(HERE, "results", "pca_approximation"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    print("| network | train images | theta | largest output change along the network's trajectories | mean change "
          "| median r exact | median r batch-averaged | batch-averaged - exact, per seed: median [min, max] | median "
          "largest sample difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.networks.split(","):
        run(name, args)


if __name__ == "__main__":
    main()
