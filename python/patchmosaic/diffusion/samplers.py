"""Reverse processes (spec section 3) as small pure functions over a denoiser.

A denoiser is ``denoiser(x_t, t, labels) -> x0_hat`` with ``x_t`` a ``(B, C, H, W)`` tensor and ``t`` a
float, and owns its noise schedule (``denoiser.schedule``: :class:`MachineDenoiser`, :class:`NetworkDenoiser`
and :class:`IndexedDenoiser` have one). Samplers take the schedule from the denoiser; ``schedule=`` serves
plain functions (default ``"cosine_legacy"``), and naming a different one than the denoiser's is an error.
Samplers step on a time grid ``1 = t_S > ... > t_1 > t_0 = 0`` (default ``t_i = i / S``).

One update from ``t`` to ``t'`` (``a, b`` and ``a', b'`` from the noise schedule, ``b = sqrt(1 - a^2)``)::

    x0    = denoiser(x_t, t, labels)
    eps   = (x_t - a x0) / b
    sigma = eta * sqrt((1 - a'^2) / (1 - a^2)) * sqrt(1 - a^2 / a'^2)      # 0 for DDIM, DDPM's for eta = 1
    x_t'  = a' x0 + sqrt(b'^2 - sigma^2) eps + sigma z,   z ~ N(0, I) from ``generator``

and the step that reaches ``t' = 0`` returns ``x0``. With ``eta = 1`` the update draws from the DDPM
posterior ``q(x_t' | x_t, x0)`` (mean and variance of Ho et al. for the step ``t -> t'``).

The loop is plain Python over a grid of Python floats, so ``torch.compile(fullgraph=True)`` of a whole
``ddim`` over a machine denoiser traces into one graph (the progress bar is off while compiling).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..io.progress import Progress
from ..machines.base import docstring
from ..schedules import Schedule, ScheduleLike, get_schedule, same_schedule
from ..validation import check_memory
from .inputs import as_images, as_labels, like_input


def time_grid(steps: int = 20) -> np.ndarray:
    """The default grid ``[1, (S-1)/S, ..., 1/S, 0]`` (descending, ``S + 1`` points)."""
    _check_steps(steps)
    return np.arange(steps, -1, -1, dtype=np.float64) / steps


def _check_steps(steps) -> None:
    """A positive integer number of steps whose grid (as Python floats: 32 bytes a step) fits in memory."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer, float)) or \
            (isinstance(steps, float) and not math.isfinite(steps)) or \
            int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if int(steps) > 1_000_000:  # only a grid above 32 MB is worth a look at the memory (none under torch.compile)
        check_memory(32 * (int(steps) + 1), f"a time grid of {int(steps)} steps", advice="use fewer steps")


def check_grid(grid: Optional[Sequence[float]], steps: int = 20) -> np.ndarray:
    """``grid`` as a float64 array (default: :func:`time_grid`), or a ValueError naming the problem."""
    g = time_grid(steps) if grid is None else np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or len(g) < 2:
        raise ValueError(f"grid must be a 1-D sequence of at least two times, got shape {tuple(g.shape)}")
    if not np.all(np.isfinite(g)) or np.any(np.diff(g) >= 0) or g[0] > 1 or g[-1] < 0 or g[0] <= 0:
        raise ValueError(f"grid must be strictly decreasing within [0, 1] and start above 0, got {g.tolist()}")
    return g


def _grid_floats(grid: Optional[Sequence[float]], steps: int) -> list:
    """The grid as Python floats (constants for ``torch.compile``); checked like :func:`check_grid`."""
    if grid is None:
        _check_steps(steps)
        return [i / steps for i in range(int(steps), -1, -1)]
    return [float(v) for v in check_grid(grid, steps)]


def denoiser_schedule(denoiser, schedule: Optional[ScheduleLike] = None) -> Schedule:
    """The schedule a sampler runs ``denoiser`` on: its own; ``schedule`` for a plain function (default
    ``cosine_legacy``); a ValueError if both are given and differ."""
    own = getattr(denoiser, "schedule", None)
    if own is None:
        return get_schedule("cosine_legacy" if schedule is None else schedule)
    own = get_schedule(own)
    if schedule is not None and not same_schedule(own, schedule):
        raise ValueError(f"the denoiser runs on the noise schedule {own.name!r}, but schedule={get_schedule(schedule).name!r} "
                         "was given; drop schedule= (a denoiser owns its schedule)")
    return own


def common_schedule(denoisers: dict) -> Schedule:
    """The one schedule shared by named denoisers (e.g. a network and the machines compared with it), or a
    ValueError naming two that differ."""
    first_name, first = None, None
    for name, d in denoisers.items():
        s = denoiser_schedule(d)
        if first is None:
            first_name, first = name, s
        elif not same_schedule(first, s):
            raise ValueError(f"{first_name!r} runs on the noise schedule {first.name!r} but {name!r} on {s.name!r}; "
                             "sample both on the same schedule")
    return first


def step_coefficients(schedule, t: float, t_next: float, eta: float = 0.0):
    """``(a, b, a', sqrt(b'^2 - sigma^2), sigma)`` of one update from ``t`` to ``t_next > 0`` (floats)."""
    sched = get_schedule(schedule)
    a, b2 = sched.scalar_coefficients(t)
    a1, b12 = sched.scalar_coefficients(t_next)
    sigma = 0.0
    if eta:
        # DDPM posterior variance of the step t -> t': (1 - ab') / (1 - ab) * (1 - ab / ab')
        sigma = eta * math.sqrt(max(b12 / b2 * (1.0 - a * a / (a1 * a1)), 0.0))
    return a, math.sqrt(b2), a1, math.sqrt(max(b12 - sigma * sigma, 0.0)), sigma


def update(schedule, x: torch.Tensor, x0: torch.Tensor, t: float, t_next: float, eta: float = 0.0,
           generator: Optional[torch.Generator] = None, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One step of the module docstring from ``x_t`` (given the denoiser's ``x0``) to ``t_next``;
    ``x0`` itself when ``t_next <= 0``. ``generator`` draws the noise when ``eta > 0``; ``eps``, when
    the caller already has it (an eps network), is used instead of ``(x_t - a x0) / b``."""
    if t_next <= 0:
        return x0
    a, b, a1, c_eps, sigma = step_coefficients(schedule, t, t_next, eta)
    if eps is None:
        eps = (x - a * x0) / b
    x = a1 * x0 + c_eps * eps
    if sigma > 0:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
        x = x + sigma * z.to(x.device)
    return x


# the arguments every sampler shares
SAMPLER_ARGS = """\
        denoiser: ``denoiser(x_t, t, labels) -> x0_hat``, called with a torch tensor ``x_t`` and a float ``t``:
            a :class:`MachineDenoiser`, :class:`NetworkDenoiser`, :class:`IndexedDenoiser` (whose
            ``.schedule`` is used) or a plain function.
        x1: the starting noise ``(B, C, H, W)`` at ``t = grid[0]``, float32 or float64, numpy or torch (CPU,
            or CUDA where torch has it), as ``Machine.denoise`` takes ``x``.
        labels: ``(B,)`` integer class labels (numpy, torch, a list, or one int for every image), passed to
            every denoiser call as an int64 tensor; None (default): unconditional.
        grid: descending times from ``grid[0]`` in ``(0, 1]`` to ``grid[-1] >= 0`` (0 ends on ``x0_hat``);
            None (default): ``t_i = i / steps``.
        steps: number of steps of the default grid (a positive integer, default 20).
        schedule: the noise schedule of a plain-function denoiser (``"cosine_legacy"`` when None, the
            default); for a denoiser with its own schedule, omit it (a different one is a ValueError).
        callback: ``callback(i, t, x_t, x0)`` after each denoiser evaluation (``i`` counts from 0), with
            torch tensors; None (default): no callback.
        progress: a progress bar on stderr (default True).
"""
RETURNS = """
    Returns:
        the sample at ``grid[-1]``, as ``Machine.denoise`` answers: a numpy array of ``x1``'s dtype for numpy
        ``x1``, else a torch tensor (``x1``'s dtype, on its device).
"""


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(i, t, x_t, x0), got {type(callback).__name__}")


def check_x0(x0, x: torch.Tensor, i: int, where: str) -> None:
    """A ValueError unless a denoiser's answer at step ``i`` has the images' shape and finite values (not checked
    under torch.compile: a compiled graph cannot branch on the values)."""
    if tuple(getattr(x0, "shape", ())) != tuple(x.shape):
        raise ValueError(f"the denoiser returned {type(x0).__name__} of shape {tuple(getattr(x0, 'shape', ()))} "
                         f"for images of shape {tuple(x.shape)} (step {i}, {where})")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(torch.as_tensor(x0)).all()):
        raise ValueError(f"the denoiser returned NaN or infinite values at step {i} ({where})")


@docstring("""The update of the module docstring, with any ``eta``, from ``x1`` at ``t = grid[0]`` down to
    ``grid[-1]``. :func:`ddim` (``eta = 0``) and :func:`ddpm` (``eta = 1``) call it.

    Args:
""" + SAMPLER_ARGS + """\
        eta: the noise scale in ``[0, 1]``: 0 (default) deterministic DDIM, 1 the DDPM posterior.
        generator: a seeded ``torch.Generator`` drawing the noise, required when ``eta > 0``; default None.
        desc: the progress bar's label (default ``"sampling"``).
""" + RETURNS)
def reverse_process(denoiser: Callable, x1, labels=None, *, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None, grid: Optional[Sequence[float]] = None,
                    steps: int = 20, schedule: Optional[ScheduleLike] = None, callback: Optional[Callable] = None,
                    progress: bool = True, desc: str = "sampling") -> torch.Tensor:
    sched = denoiser_schedule(denoiser, schedule)
    g = _grid_floats(grid, steps)
    x, is_numpy = as_images(x1, "x1")
    labels = as_labels(labels, x.shape[0])
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if eta > 0 and generator is None:
        raise ValueError("a stochastic sampler (eta > 0) needs a seeded torch.Generator")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a seeded torch.Generator (torch.Generator().manual_seed(s)), got "
                        f"{type(generator).__name__}")
    check_callback(callback)
    bar = Progress(len(g) - 1, desc, enabled=progress and not torch.compiler.is_compiling())
    for i in range(len(g) - 1):
        t, t_next = g[i], g[i + 1]
        x0 = denoiser(x, t, labels)
        check_x0(x0, x, i, f"t = {t}")
        if callback is not None:
            callback(i, t, x, x0)
        x = update(sched, x, x0, t, t_next, eta, generator)
        bar.update()
    bar.close()
    return like_input(x, is_numpy)


@docstring("""Deterministic DDIM (``eta = 0``) from the noise ``x1`` at ``t = grid[0]`` down to ``grid[-1]``.

    Args:
""" + SAMPLER_ARGS + RETURNS)
def ddim(denoiser: Callable, x1, labels=None, *, grid: Optional[Sequence[float]] = None, steps: int = 20,
         schedule: Optional[ScheduleLike] = None, callback: Optional[Callable] = None,
         progress: bool = True) -> torch.Tensor:
    return reverse_process(denoiser, x1, labels, eta=0.0, grid=grid, steps=steps, schedule=schedule,
                           callback=callback, progress=progress, desc="ddim")


@docstring("""Stochastic DDPM (``eta = 1``): ancestral sampling with the posterior variance of each step, from
    the noise ``x1`` at ``t = grid[0]`` down to ``grid[-1]``.

    Args:
""" + SAMPLER_ARGS + """\
        generator: a seeded ``torch.Generator`` that draws the noise of every step (required; keyword only).
""" + RETURNS)
def ddpm(denoiser: Callable, x1, labels=None, *, generator: torch.Generator, grid: Optional[Sequence[float]] = None,
         steps: int = 20, schedule: Optional[ScheduleLike] = None, callback: Optional[Callable] = None,
         progress: bool = True) -> torch.Tensor:
    return reverse_process(denoiser, x1, labels, eta=1.0, generator=generator, grid=grid, steps=steps,
                           schedule=schedule, callback=callback, progress=progress, desc="ddpm")
