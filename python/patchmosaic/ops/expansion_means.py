"""Softmax-weighted means of whole training images for query rows that share them, on the compiled CPU engine
(cpu/expansion_means.cpp): the smoothed closed-form denoiser's draws in one call, the logits by expansion in float64
from the images as they are stored (float32 images are read at half the bytes of a float64 copy), each image read
once for the logits and the means: a streaming softmax per block of images (the blocks fixed by N), merged in block
order. Forward only: callers that need derivatives compose the same function from torch operations."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import engines


def expansion_means(X: torch.Tensor, sq: torch.Tensor, Q: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                    row_label: Optional[torch.Tensor] = None, img_label: Optional[np.ndarray] = None,
                    cut: float = 60.0, n_threads: int = 0) -> Tuple[torch.Tensor, int]:
    """``out[r] = sum_n w[r, n] X[n] / sum_n w[r, n]`` with ``w[r, n] = exp(l[r, n] - max_n l[r, n])``, ``l[r, n] =
    c1[r] <Q[r], X[n]> - c2[r] sq[n]`` in float64, the weights below ``e^-cut`` of a row's largest and the images
    whose label is not the row's left out. ``X``: ``(N, D)`` float32 or float64 on the CPU; ``sq``: ``(N,)``
    float64; ``Q``: ``(R, D)``, ``c1``, ``c2``: ``(R,)``, taken in float64. Returns ``(out (R, D) float64, how
    many images some row keeps against that cut)``; the result does not depend on ``n_threads``. A block of images
    may add an image below ``e^-cut`` of its row's largest weight but not of the block's running largest, so the
    means are those of the exact cut to ``N e^-cut`` relative (below float64 rounding for N under 10^9 at the
    default cut 60); ``cut`` below 30 is refused."""
    if X.device.type != "cpu" or X.dtype not in (torch.float32, torch.float64) or X.dim() != 2:
        raise ValueError(f"X must be a 2-d float32 or float64 CPU tensor, got {X.dtype} {tuple(X.shape)} on {X.device}")

    def f64(t):
        return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)

    rl = il = None
    if row_label is not None:
        rl = np.ascontiguousarray(row_label.detach().cpu().numpy(), dtype=np.int64)
        il = np.ascontiguousarray(img_label, dtype=np.int64)
    out, kept = engines.CPU.module.expansion_means(np.ascontiguousarray(X.detach().numpy()), f64(sq), f64(Q), f64(c1),
                                                   f64(c2), rl, il, float(cut), int(n_threads))
    return torch.from_numpy(out), int(kept)
