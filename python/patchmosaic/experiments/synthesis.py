"""``patchmosaic sample``: machine samples from any data set, on canvases of any size, with provenance.

A local machine needs no training at the canvas size: boundary-aware ELS matches every canvas pixel
to training patches with the same padding signature (spec section 2), so a 256x256 canvas can be
synthesised from 64x64 texture crops, or a 128x128 canvas from 32x32 CIFAR-10 images.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import load
from ..diffusion.denoisers import MachineDenoiser
from ..diffusion.kschedule import KSchedule, from_spec, schedule_from_spec
from ..machines import MACHINES, make_machine
from ..io.files import check_output, write_npz
from ..io.images import grid, provenance_picture, to_uint8, write_png
from ..validation import check_memory
from ..diffusion.samplers import ddim, ddpm


def position_picture(rows: np.ndarray, cols: np.ndarray, H: int, W: int) -> np.ndarray:
    """Each pixel coloured by where in its training image the winning patch is centred (red: row,
    blue: column): a patch copied whole shows as a smooth colour ramp, a mosaic as a patchwork."""
    r = np.asarray(rows, np.float64) / max(H - 1, 1)
    c = np.asarray(cols, np.float64) / max(W - 1, 1)
    rgb = np.stack([0.15 + 0.85 * r, 0.35 + 0.3 * (1 - np.abs(r - c)), 0.15 + 0.85 * c], -1)
    return (rgb * 255 + 0.5).astype(np.uint8)


DEFAULT_K = "paper:MNIST_ResNet_zeros"  # the default k-schedule of a machine with a patch size
LARGE_IMAGE = 128  # training images above this size without --crop / --canvas need force=True
PROBE = 48  # side of the query canvas timed to estimate a run before it starts


def estimate(m, ks, n: int, C: int, Hq: int, Wq: int, steps: int, backend: str) -> Tuple[float, float]:
    """``(patch pairs, seconds)`` that sampling ``n`` images of ``Hq x Wq`` for ``steps`` steps with machine
    ``m`` compares and roughly takes, measured before the run: one call on a noise image of at most
    ``PROBE`` x ``PROBE`` pixels (at the schedule's median ``k`` for a local machine), scaled up by the
    query pixels, images and steps of the run (within a factor of about 3: the time varies with ``k``)."""
    be = None if backend == "auto" else backend
    h, w = (Hq, Wq) if not m.local else (min(Hq, PROBE), min(Wq, PROBE))
    x = torch.randn(1, C, h, w, generator=torch.Generator().manual_seed(0))
    k = sorted(ks.values)[len(ks.values) // 2] if ks is not None else None
    t0 = time.perf_counter()
    m.denoise(x, 0.5, k, backend=be)
    seconds = (time.perf_counter() - t0) * (Hq * Wq) / (h * w) * n * steps
    pairs = float(m.N * m.H * m.W) * Hq * Wq * n * steps if m.local else float(m.N) * n * steps
    return pairs, seconds


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.0f} min" if seconds < 7200
                                                       else f"{seconds / 3600:.0f} h")


def run_sample(data: str = "default", *, out: str = "patchmosaic_sample.png", machine: str = "els",
               boundary: str = "zeros", k: Optional[str] = None, canvas: Optional[Tuple[int, int]] = None,
               n: int = 4, steps: int = 20, sampler: str = "ddim", seed: int = 0,
               labels: Optional[Sequence[int]] = None, classes: Optional[Sequence[int]] = None,
               limit: Optional[int] = None, crop: Optional[int] = None, stride: Optional[int] = None,
               provenance: str = "image", download: bool = False, backend: str = "auto",
               progress: bool = True, force: bool = False, layout=None, data_layout: Optional[str] = None,
               alpha: str = "refuse") -> dict:
    """Sample ``n`` images and write a PNG (samples, then their provenance maps) and an ``.npz`` beside it.

    ``k``: the machine's per-step parameter as text (:func:`patchmosaic.kschedule.schedule_from_spec`): a
    k-schedule for a machine with a patch size (None: the paper's MNIST schedule), a threshold or threshold-schedule
    file for PCA-locality (None: the machine's own threshold), refused for IS and the smoothed denoiser.
    ``labels``: one class per seed (cycled), or None for an unconditional machine. ``provenance``:
    colour the map by the winning key's training ``"image"`` or by its ``"position"`` in that image.
    Training images larger than 128x128 (a whole photograph) without ``crop`` or ``canvas`` are refused
    with their size and the estimated time unless ``force=True``: train on crops instead. With
    ``progress``, the size of the run and its estimated time are printed before it starts.
    ``layout`` (distributed/queries.py): under torchrun, the machine's training images and the seeds spread over
    the ranks; every rank returns the summary, rank 0 writes the files. The ranks first agree that they were given
    the same data, k-schedule, seeds, labels and settings (a ValueError naming what differs, before any work).
    ``data_layout`` and ``alpha``: as ``layout`` and ``alpha`` of :func:`patchmosaic.data.load`.
    ``out`` must be a ``.png`` path where a file can be written (the ``.npz`` goes beside it): checked first.
    Returns a summary dict.
    """
    for name, v in (("n", n), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if provenance not in ("image", "position"):
        raise ValueError(f"provenance must be 'image' or 'position', got {provenance!r}")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    leader = layout is None or layout.leader
    if leader:  # rank 0 writes them: refuse a path that cannot be written before the run, not after it
        check_output(out, suffixes=(".png",), what="the picture (the .npz of the samples goes beside it)")
        check_output(os.path.splitext(out)[0] + ".npz", option="--out (its .npz)", what="the samples' .npz")
    images, train_labels = load(data, limit=limit, classes=classes, crop=crop, stride=stride, download=download,
                                layout=data_layout, alpha=alpha)
    _, C, H, W = images.shape
    Hq, Wq = canvas or (H, W)
    if Hq < 1 or Wq < 1:
        raise ValueError(f"canvas must be positive, got {Hq}x{Wq}")
    ylab = None
    if labels is not None:
        if len(labels) == 0:
            raise ValueError("labels is empty: give one label per seed (cycled), or None")
        ylab = torch.as_tensor([int(labels[i % len(labels)]) for i in range(n)])
    param = MACHINES[machine].parameter if machine in MACHINES else None  # (an unknown name: make_machine says so)
    ks = None  # the machine's per-step parameter: a k-schedule, a threshold schedule (k None: its own), or none
    if param == "k":
        ks = from_spec(DEFAULT_K if k is None else k, steps)
    elif param is not None and k is not None:
        ks = schedule_from_spec(param, k, steps)
    elif machine in MACHINES and k is not None:  # (not ignored silently: compare refuses it too)
        raise ValueError(f"--k: the {machine} machine takes no k-schedule (it has no per-step parameter), got {k!r}")
    # the pictures (a grid of n tiles, twice for a local machine, up to 3x upscaled), the .npz and the sampler's state
    scale = max(1, 96 // max(Hq, Wq)) if max(Hq, Wq) < 96 else 1
    tiles = n * (2 if machine != "is" else 1) * (Hq * scale + 2) * (Wq * scale + 2) * 3
    check_memory(3 * tiles + 8 * n * C * Hq * Wq * 4 + n * Hq * Wq * 24,
                 f"sampling {n} images of {C}x{Hq}x{Wq} (the samples, their noise and provenance, the picture)")
    if layout is not None:  # every rank must sample the same thing: agree before the first collective
        from ..io.runstate import array_digest

        layout.agree(dict(command="sample", data=array_digest(images, train_labels), train_shape=list(images.shape),
                          machine=machine, boundary=boundary, canvas=[Hq, Wq], n=n, steps=steps, sampler=sampler,
                          seed=seed, labels=ylab, k_schedule=None if ks is None else [list(ks.times), list(ks.values)],
                          provenance=provenance, torch=torch.__version__), "patchmosaic sample")
    mk = make_machine if layout is None else layout.machine
    m = mk(machine, images, train_labels if ylab is not None else None, boundary=boundary, backend=backend)
    sizes = sorted(set(ks.ks)) if isinstance(ks, KSchedule) else [None]
    m.check_labels(None if ylab is None else ylab.numpy(), n)
    m.check_request((n, C, Hq, Wq), torch.float32, "cpu" if backend == "auto" else backend,
                    provenance=m.has_provenance, k=sizes[-1])
    for kk in sizes:
        m.check_canvas(Hq, Wq, kk)
    size = f"{n} samples of {Hq}x{Wq} from {len(images)} training image(s) of {H}x{W}, {steps} steps"
    if max(H, W) > LARGE_IMAGE and crop is None and canvas is None:
        pairs, seconds = estimate(m, ks, n, C, Hq, Wq, steps, backend)
        size += (f": {pairs:.2g} patch pairs, roughly {_duration(seconds)} on the "
                 f"{'CUDA' if backend == 'cuda' else 'CPU'} engine (timed on a {PROBE}x{PROBE} query)")
        if not force:
            raise ValueError(f"{data}: training images of {H}x{W} (larger than {LARGE_IMAGE}x{LARGE_IMAGE}) without "
                             f"--crop or --canvas: {size}. Train on crops (e.g. --crop 64 --canvas 256x256) or pass "
                             f"--force to run it anyway")
    if progress and leader:
        print(f"patchmosaic sample: {size}", file=sys.stderr)
    den = MachineDenoiser(m, ks, keep_provenance=m.has_provenance)
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, C, Hq, Wq, generator=gen)
    t0 = time.perf_counter()
    fn, kw = (ddim, {}) if sampler == "ddim" else (ddpm, {"generator": gen})
    if layout is None:
        x = fn(den, x1, ylab, steps=steps, progress=progress, **kw)
        prov = den.provenance
    else:
        x = layout.sample(fn, den, x1, ylab, steps=steps, progress=progress and leader, **kw)
        from ..machines import Provenance

        mine = den.provenance  # this rank's seeds (None where it had none)
        names = ("image", "row", "col", "share")
        prov = None if not m.has_provenance else Provenance(*(
            None if not m.local and f in ("row", "col") else
            layout.gather(None if mine is None else getattr(mine, f), n, "gather of the provenance") for f in names))
    seconds = time.perf_counter() - t0
    if not leader:
        return {"out": out, "samples": x, "seconds": seconds, "train_images": len(images)}
    pics = [to_uint8(x[b].numpy()) for b in range(n)]
    if m.local:
        if provenance == "image":
            pics += [provenance_picture(x[b].numpy(), prov.image[b].numpy()) for b in range(n)]
        else:
            pics += [position_picture(prov.row[b].numpy(), prov.col[b].numpy(), H, W) for b in range(n)]
    write_png(out, grid(pics, 2 if m.local else 1, n, pad=2, scale=scale))
    npz = os.path.splitext(out)[0] + ".npz"
    write_npz(npz, samples=x.numpy(), noise=x1.numpy(), labels=np.zeros(0) if ylab is None else ylab.numpy(),
              **({} if prov is None else {"provenance_image": prov.image.numpy()}))
    return {"out": out, "npz": npz, "samples": x, "seconds": seconds, "k_schedule": ks, "train_images": len(images),
            "sources_per_sample": [int(np.unique(prov.image[b].numpy()).size) for b in range(n)] if m.local else None}
