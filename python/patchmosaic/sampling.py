"""Reverse processes (spec section 3) as small pure functions over a denoiser callable.

A denoiser is ``denoiser(x_t, t, labels) -> x0_hat`` with ``x_t`` a ``(B, C, H, W)`` tensor and ``t`` a
float. Samplers step on a time grid ``1 = t_S > ... > t_1 > t_0 = 0`` (default ``t_i = i / S``).

One update from ``t`` to ``t'`` (``a, b`` and ``a', b'`` from the noise schedule, ``b = sqrt(1 - a^2)``)::

    x0    = denoiser(x_t, t, labels)
    eps   = (x_t - a x0) / b
    sigma = eta * sqrt((1 - a'^2) / (1 - a^2)) * sqrt(1 - a^2 / a'^2)      # 0 for DDIM, DDPM's for eta = 1
    x_t'  = a' x0 + sqrt(b'^2 - sigma^2) eps + sigma z,   z ~ N(0, I) from ``generator``

and the step that reaches ``t' = 0`` returns ``x0``. With ``eta = 1`` the update draws from the DDPM
posterior ``q(x_t' | x_t, x0)`` (mean and variance of Ho et al. for the step ``t -> t'``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .progress import Progress
from .schedules import ScheduleLike, get_schedule


def time_grid(steps: int = 20) -> np.ndarray:
    """The default grid ``[1, (S-1)/S, ..., 1/S, 0]`` (descending, ``S + 1`` points)."""
    if int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    return np.arange(steps, -1, -1, dtype=np.float64) / steps


def check_grid(grid: Optional[Sequence[float]], steps: int = 20) -> np.ndarray:
    """``grid`` as a float64 array (default: :func:`time_grid`), or a ValueError naming the problem."""
    g = time_grid(steps) if grid is None else np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or len(g) < 2:
        raise ValueError(f"grid must be a 1-D sequence of at least two times, got shape {tuple(g.shape)}")
    if not np.all(np.isfinite(g)) or np.any(np.diff(g) >= 0) or g[0] > 1 or g[-1] < 0 or g[0] <= 0:
        raise ValueError(f"grid must be strictly decreasing within [0, 1] and start above 0, got {g.tolist()}")
    return g


def step_coefficients(schedule, t: float, t_next: float, eta: float = 0.0):
    """``(a, b, a', sqrt(b'^2 - sigma^2), sigma)`` of one update from ``t`` to ``t_next > 0``."""
    a, b2 = (float(v) for v in schedule.coefficients(t))
    a1, b12 = (float(v) for v in schedule.coefficients(t_next))
    sigma = 0.0
    if eta:
        # DDPM posterior variance of the step t -> t': (1 - ab') / (1 - ab) * (1 - ab / ab')
        sigma = eta * np.sqrt(max(b12 / b2 * (1.0 - a * a / (a1 * a1)), 0.0))
    return a, np.sqrt(b2), a1, np.sqrt(max(b12 - sigma * sigma, 0.0)), sigma


def update(schedule, x: torch.Tensor, x0: torch.Tensor, t: float, t_next: float, eta: float = 0.0,
           generator: Optional[torch.Generator] = None, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One step of the module docstring from ``x_t`` (given the denoiser's ``x0``) to ``t_next``;
    ``x0`` itself when ``t_next <= 0``. ``generator`` draws the noise when ``eta > 0``; ``eps``, when
    the caller already has it (an eps network), is used instead of ``(x_t - a x0) / b``."""
    if t_next <= 0:
        return x0
    a, b, a1, c_eps, sigma = step_coefficients(get_schedule(schedule), t, t_next, eta)
    if eps is None:
        eps = (x - a * x0) / b
    x = a1 * x0 + c_eps * eps
    if sigma > 0:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
        x = x + sigma * z.to(x.device)
    return x


def reverse_process(denoiser: Callable, x1: torch.Tensor, labels=None, *, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None, grid: Optional[Sequence[float]] = None,
                    steps: int = 20, schedule: ScheduleLike = "cosine_legacy", callback: Optional[Callable] = None,
                    progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    """The update of the module docstring from ``x1`` at ``t = grid[0]`` down to ``grid[-1]``.

    ``callback(i, t, x_t, x0)`` is called after each denoiser evaluation (``i`` counts from 0).
    """
    sched = get_schedule(schedule)
    g = check_grid(grid, steps)
    if not torch.is_tensor(x1) or x1.ndim != 4:
        raise ValueError(f"x1 must be a (B, C, H, W) tensor, got {type(x1).__name__} "
                         f"of shape {tuple(getattr(x1, 'shape', ()))}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if eta > 0 and generator is None:
        raise ValueError("a stochastic sampler (eta > 0) needs a seeded torch.Generator")
    x = x1
    bar = Progress(len(g) - 1, desc, enabled=progress)
    for i in range(len(g) - 1):
        t, t_next = float(g[i]), float(g[i + 1])
        x0 = denoiser(x, t, labels)
        if callback is not None:
            callback(i, t, x, x0)
        x = update(sched, x, x0, t, t_next, eta, generator)
        bar.update()
    bar.close()
    return x


def ddim(denoiser: Callable, x1: torch.Tensor, labels=None, *, grid: Optional[Sequence[float]] = None,
         steps: int = 20, schedule: ScheduleLike = "cosine_legacy", callback: Optional[Callable] = None,
         progress: bool = True) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from noise ``x1`` at ``t = grid[0]`` down to ``grid[-1]`` (0)."""
    return reverse_process(denoiser, x1, labels, eta=0.0, grid=grid, steps=steps, schedule=schedule,
                           callback=callback, progress=progress, desc="ddim")


def ddpm(denoiser: Callable, x1: torch.Tensor, labels=None, *, generator: torch.Generator,
         grid: Optional[Sequence[float]] = None, steps: int = 20, schedule: ScheduleLike = "cosine_legacy",
         callback: Optional[Callable] = None, progress: bool = True) -> torch.Tensor:
    """Stochastic DDPM (eta = 1): ancestral sampling with the posterior variance, noise from ``generator``."""
    return reverse_process(denoiser, x1, labels, eta=1.0, generator=generator, grid=grid, steps=steps,
                           schedule=schedule, callback=callback, progress=progress, desc="ddpm")
