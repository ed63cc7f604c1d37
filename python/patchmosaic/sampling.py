"""Reverse processes (spec section 3) as small pure functions over a denoiser callable.

A denoiser is ``denoiser(x_t, t, labels) -> x0_hat`` with ``x_t`` a ``(B, C, H, W)`` tensor and ``t`` a
float. Samplers step on a time grid ``1 = t_S > ... > t_1 > t_0 = 0`` (default ``t_i = i / S``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .progress import Progress
from .schedules import ScheduleLike, get_schedule


def time_grid(steps: int = 20) -> np.ndarray:
    """The default grid ``[1, (S-1)/S, ..., 1/S, 0]`` (descending, ``S + 1`` points)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    return np.arange(steps, -1, -1, dtype=np.float64) / steps


def ddim(denoiser: Callable, x1: torch.Tensor, labels=None, *, grid: Optional[Sequence[float]] = None,
         steps: int = 20, schedule: ScheduleLike = "cosine_legacy", callback: Optional[Callable] = None,
         progress: bool = True) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from noise ``x1`` at ``t = grid[0]`` down to ``grid[-1]`` (0).

    Each update from ``t`` to ``t'``: ``x0 = denoiser(x_t, t, labels)``, ``eps = (x_t - a x0) / b``,
    ``x_t' = a' x0 + b' eps``; at ``t' = 0`` the result is ``x0``. ``callback(i, t, x_t, x0)`` is
    called after each denoiser evaluation. Returns the final sample.
    """
    sched = get_schedule(schedule)
    grid = time_grid(steps) if grid is None else np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 2 or np.any(np.diff(grid) >= 0) or grid[0] > 1 or grid[-1] < 0:
        raise ValueError("grid must be strictly decreasing within [0, 1] with at least two points")
    x = x1
    bar = Progress(len(grid) - 1, "ddim", enabled=progress)
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x0 = denoiser(x, t, labels)
        if callback is not None:
            callback(i, t, x, x0)
        if t_next <= 0:
            x = x0
        else:
            a, b2 = (float(v) for v in sched.coefficients(t))
            a2, b22 = (float(v) for v in sched.coefficients(t_next))
            eps = (x - a * x0) / np.sqrt(b2)
            x = a2 * x0 + np.sqrt(b22) * eps
        bar.update()
    bar.close()
    return x
