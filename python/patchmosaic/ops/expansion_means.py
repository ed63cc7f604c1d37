"""Softmax-weighted means of whole training images for query rows that share them, averaged over groups of rows, on
the compiled CPU engine (cpu/expansion_means.cpp): the smoothed closed-form denoiser's draws in one call, the logits
by expansion in float64 from the images as they are stored (float32 images are read at half the bytes of a float64
copy), then one weighted sum of the images per group (the mean of a group's softmax means), not per row. Forward
only: callers that need derivatives compose the same function from torch operations."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import engines


def expansion_means(X: torch.Tensor, sq: torch.Tensor, Q: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                    row_label: Optional[torch.Tensor] = None, img_label: Optional[np.ndarray] = None,
                    cut: float = 60.0, n_threads: int = 0, groups: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """``m[r] = sum_n w[r, n] X[n] / sum_n w[r, n]`` with ``w[r, n] = exp(l[r, n] - max_n l[r, n])``, ``l[r, n] =
    c1[r] <Q[r], X[n]> - c2[r] sq[n]`` in float64, the weights below ``e^-cut`` of a row's largest and the images
    whose label is not the row's left out; ``out[g]`` the mean of ``m[r]`` over the rows ``r = g, g + G, g + 2G, ...``
    (``G = groups``, which must divide the rows; default: every row its own group, ``out = m``). ``X``: ``(N, D)``
    float32 or float64 on the CPU; ``sq``: ``(N,)`` float64; ``Q``: ``(R, D)``, ``c1``, ``c2``: ``(R,)``, taken in
    float64. Returns ``(out (G, D) float64, how many images some row keeps)``; a NaN logit leaves its image out of
    its row, and a group with a row that keeps no image (its logits all -inf or NaN) is NaN. The result does not
    depend on ``n_threads``."""
    if X.device.type != "cpu" or X.dtype not in (torch.float32, torch.float64) or X.dim() != 2:
        raise ValueError(f"X must be a 2-d float32 or float64 CPU tensor, got {X.dtype} {tuple(X.shape)} on {X.device}")

    def f64(t):
        return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)

    rl = il = None
    if row_label is not None:
        rl = np.ascontiguousarray(row_label.detach().cpu().numpy(), dtype=np.int64)
        il = np.ascontiguousarray(img_label, dtype=np.int64)
    out, kept = engines.CPU.module.expansion_means(np.ascontiguousarray(X.detach().numpy()), f64(sq), f64(Q), f64(c1),
                                                   f64(c2), rl, il, float(cut),
                                                   Q.shape[0] if groups is None else int(groups), int(n_threads))
    return torch.from_numpy(out), int(kept)
