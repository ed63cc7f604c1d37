"""The main job: boundary-aware ELS samples from the built-in digits, with novelty and provenance.

``patchmosaic demo`` draws noise seeds, runs 20 DDIM steps of the boundary-aware ELS machine with the
paper's calibrated MNIST k-schedule (class-conditional, one digit class per seed), and writes one
PNG whose columns are seeds and whose rows are: the noise, the machine's sample, the nearest training
image (a sample far from it is novel), and the provenance map (each pixel coloured by the training
image its winning patch came from at the last step, shaded by the sample's brightness: the patch mosaic).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..data import load_default
from ..diffusion.kschedule import paper_schedule
from ..machines import ELS
from ..io.files import check_output
from ..io.images import grid, provenance_picture, to_uint8, write_png
from ..validation import check_memory
from ..diffusion.samplers import ddim


def run_demo(out: str = "patchmosaic_demo.png", n: int = 8, steps: int = 20, seed: int = 0,
             train_per_class: int | None = None, backend: str = "auto", progress: bool = True) -> dict:
    """Run the demo; returns a summary dict (samples, nearest distances, provenance, timings). ``out`` (a ``.png``
    path where a file can be written) and the memory of the run (``n`` seeds: samples, distances, the picture) are
    checked before any work."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of seeds, got {n!r}")
    check_output(out, suffixes=(".png",), what="the demo picture")
    # the ELS calls on n queries, the n x 2000 distances to the training set, and the picture of 4 x n tiles
    tile = (32 * 3 + 2) ** 2 * 3
    check_memory(4 * n * tile + n * 2000 * 8 * 3, f"the demo with n = {n} seeds (distances and the picture)")
    images, labels = load_default()
    if train_per_class is not None:
        if train_per_class < 1:
            raise ValueError(f"train_per_class must be positive, got {train_per_class}")
        keep = np.concatenate([np.nonzero(labels.numpy() == c)[0][:train_per_class] for c in range(10)])
        images, labels = images[keep], labels[keep]
    machine = ELS(images, labels, backend=backend)
    ksched = paper_schedule("MNIST_ResNet_zeros", steps)
    machine.check_request((n, 1, 32, 32), torch.float32, "cpu" if backend == "auto" else backend, provenance=True,
                          k=max(ksched.ks))
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, 1, 32, 32, generator=gen)
    ylab = torch.arange(n) % 10
    last = {}

    def denoiser(x, t, lab):
        x0, prov = machine.denoise(x, t, ksched.k_at(t), labels=lab, return_provenance=True)
        last["prov"] = prov
        return x0

    t0 = time.perf_counter()
    sample = ddim(denoiser, x1, ylab, steps=steps, schedule=machine.schedule, progress=progress)
    elapsed = time.perf_counter() - t0

    flat = images.reshape(len(images), -1)
    dist = torch.cdist(sample.reshape(n, -1).double(), flat.double())  # (Euclidean, not squared)
    nearest = dist.argmin(1)
    prov = last["prov"]
    tiles = []
    for row in range(4):
        for b in range(n):
            if row == 0:
                tiles.append(to_uint8(x1[b].clamp(-3, 3).numpy() / 3))
            elif row == 1:
                tiles.append(to_uint8(sample[b].numpy()))
            elif row == 2:
                tiles.append(to_uint8(images[nearest[b]].numpy()))
            else:
                tiles.append(provenance_picture(sample[b].numpy(), prov.image[b].numpy()))
    write_png(out, grid(tiles, 4, n, pad=2, scale=3))
    return {
        "out": out, "seconds": elapsed, "samples": sample, "labels": ylab,
        "nearest_index": nearest, "nearest_distance": dist.min(1).values,
        "provenance": prov, "k_schedule": ksched,
        "sources_per_sample": [int(np.unique(prov.image[b].numpy()).size) for b in range(n)],
    }
