"""The variance-exploding (EDM, k-diffusion) view of the project's denoisers, and EDM's samplers.

The project's process is variance preserving: ``x_t = a x0 + b eps`` with ``a = sqrt(alpha_bar(t))``,
``b = sqrt(1 - alpha_bar(t))``. Karras et al. (EDM, 2022), k-diffusion and PSPC (Niedoba et al. 2025) write the same
process as ``x = x0 + sigma n`` with

    x_VE = x_VP / a,        sigma = b / a        (alpha_bar(t) = 1 / (1 + sigma^2)),

and a denoiser ``D(x, sigma)`` returns the same posterior mean ``E[x0 | x]``. So

    D_VE(x, sigma) = D_VP(a x, t(sigma)),        D_VP(x_t, t) = D_VE(x_t / a, sigma(t)),

with ``t(sigma)`` the inverse of the noise schedule (:meth:`patchmosaic.schedules.Schedule.time_at_sigma`: closed
forms for the built-in schedules, bisection otherwise). :func:`as_sigma_denoiser` makes any of the project's
denoisers (a machine with its k-schedule, a network) a ``D(x, sigma)``; :func:`from_sigma_denoiser` makes a
``D(x, sigma)`` (e.g. a network trained in that convention) a denoiser of the project, for ``ddim`` and ``compare``.

EDM's samplers integrate the probability-flow ODE ``dx / dsigma = (x - D(x, sigma)) / sigma`` on a descending grid of
noise levels ending at 0: Euler (PSPC's default), or Heun (the second-order correction on every step but the one that
reaches 0). :func:`edm_sigmas` is EDM's grid ``(sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) -
sigma_max^(1/rho)))^rho`` (defaults 80, 0.002, 7) followed by 0. Euler in ``sigma`` on the noise levels of a time grid
is exactly the project's deterministic DDIM on that grid (one update ``x' = D + sigma' (x - D) / sigma`` in both), so
the two give the same samples to float rounding (tests/test_edm.py).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..io.progress import Progress
from ..machines.base import docstring
from ..schedules import ScheduleLike, get_schedule
from ..validation import check_memory, check_time
from .inputs import as_images, as_labels, like_input
from .samplers import check_callback, check_x0, denoiser_schedule


def _name(fn) -> str:
    """A stable name of a callable without a description (its module and qualified name, no address)."""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _sigma_float(sigma) -> float:
    if torch.is_tensor(sigma):
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be one noise level per call, got a tensor of shape {tuple(sigma.shape)}")
        sigma = float(sigma.reshape(()))
    elif isinstance(sigma, np.ndarray):
        if sigma.size != 1:
            raise ValueError(f"sigma must be one noise level per call, got an array of shape {sigma.shape}")
        sigma = float(sigma.reshape(()))
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a number, got {sigma!r}")
    return float(sigma)


class SigmaDenoiser:
    """A denoiser of the project as an EDM / k-diffusion denoiser ``D(x, sigma, labels=None)`` for
    ``x = x0 + sigma n``: ``D(x, sigma) = denoiser(a x, t(sigma), labels)``, ``a = 1 / sqrt(1 + sigma^2)``, ``t`` the
    time of the denoiser's schedule at that noise level. Made by :func:`as_sigma_denoiser`.

    Attributes:
        denoiser: the wrapped denoiser; schedule: its noise schedule.
    """

    def __init__(self, denoiser, schedule: Optional[ScheduleLike] = None):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable as denoiser(x_t, t, labels), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.schedule = denoiser_schedule(denoiser, schedule)

    def describe(self) -> dict:
        """What changes its results: the wrapped denoiser's description and the schedule."""
        inner = getattr(self.denoiser, "describe", None)
        return {"type": "SigmaDenoiser", "denoiser": inner() if callable(inner) else _name(self.denoiser),
                "schedule": self.schedule.describe()}

    def time(self, sigma) -> float:
        """The denoiser's time ``t`` at the noise level ``sigma`` (a ValueError above ``sigma(t = 1)``)."""
        return self.schedule.time_at_sigma(_sigma_float(sigma))

    def __call__(self, x, sigma, labels=None):
        s = _sigma_float(sigma)
        t = self.schedule.time_at_sigma(s)
        xt, is_numpy = as_images(x)
        a = 1.0 / math.sqrt(1.0 + s * s)
        out = torch.as_tensor(self.denoiser(a * xt, t, labels))
        return like_input(out, is_numpy)


class VPDenoiser:
    """An EDM / k-diffusion denoiser ``D(x, sigma, labels)`` as a denoiser of the project on ``schedule``:
    ``denoiser(x_t, t, labels) = D(x_t / a, sigma(t), labels)``. Made by :func:`from_sigma_denoiser`; ``ddim``,
    ``calibrate`` and ``compare`` take it (``.schedule``; ``eps`` and ``score`` as the project's denoisers have)."""

    def __init__(self, D: Callable, schedule: ScheduleLike = "cosine_legacy", accepts_labels: bool = True):
        if not callable(D):
            raise TypeError(f"D must be callable as D(x, sigma, labels), got {type(D).__name__}")
        self.D = D
        self.schedule = get_schedule(schedule)
        self.accepts_labels = bool(accepts_labels)

    def __call__(self, x, t, labels=None):
        t = check_time(float(t))
        a, b2 = self.schedule.scalar_coefficients(t)
        if not b2 > 0 or not a > 0:
            raise ValueError(f"t = {t} has no finite noise level sigma on the schedule {self.schedule.name!r}")
        xt, is_numpy = as_images(x)
        sigma = math.sqrt(b2) / a
        out = self.D(xt / a, sigma, labels) if self.accepts_labels else self.D(xt / a, sigma)
        return like_input(torch.as_tensor(out).to(xt.dtype), is_numpy)

    def eps(self, x, t, labels=None):
        xt, is_numpy = as_images(x)
        a, b2 = self.schedule.scalar_coefficients(float(t))
        return like_input((xt - a * torch.as_tensor(self(xt, t, labels))) / math.sqrt(b2), is_numpy)

    def score(self, x, t, labels=None):
        xt, is_numpy = as_images(x)
        _, b2 = self.schedule.scalar_coefficients(float(t))
        return like_input(-torch.as_tensor(self.eps(xt, t, labels)) / math.sqrt(b2), is_numpy)

    def describe(self) -> dict:
        inner = getattr(self.D, "describe", None)
        return {"type": "VPDenoiser", "D": inner() if callable(inner) else _name(self.D),
                "schedule": self.schedule.describe()}


def as_sigma_denoiser(denoiser, schedule: Optional[ScheduleLike] = None) -> SigmaDenoiser:
    """The project's denoiser ``denoiser(x_t, t, labels)`` (a :class:`patchmosaic.MachineDenoiser` with its
    k-schedule, a :class:`patchmosaic.NetworkDenoiser`, or a plain function) as an EDM / k-diffusion denoiser
    ``D(x, sigma, labels=None)`` of ``x = x0 + sigma n``: ``D(x, sigma) = denoiser(x / sqrt(1 + sigma^2), t(sigma))``.

    Args:
        denoiser: the denoiser; its own ``.schedule`` gives ``t(sigma)``.
        schedule: the schedule of a plain function without one (default ``"cosine_legacy"``); naming another than
            the denoiser's own is a ValueError.

    Returns:
        a :class:`SigmaDenoiser`; ``sigma`` above the schedule's ``sigma(t = 1)`` (80.2 for cosine-legacy) is a
        ValueError.
    """
    return SigmaDenoiser(denoiser, schedule)


def from_sigma_denoiser(D: Callable, schedule: ScheduleLike = "cosine_legacy", *,
                        accepts_labels: bool = True) -> VPDenoiser:
    """An EDM / k-diffusion denoiser ``D(x, sigma, labels)`` (e.g. a network trained in that convention, or
    :func:`as_sigma_denoiser`'s result) as a denoiser of the project on ``schedule``, for ``ddim``, ``calibrate``
    and ``compare``: ``denoiser(x_t, t) = D(x_t / a, b / a)``.

    Args:
        D: the callable ``D(x, sigma, labels) -> x0_hat`` of ``x = x0 + sigma n`` (torch tensors in and out).
        schedule: the project's noise schedule the result runs on (default ``"cosine_legacy"``).
        accepts_labels: False: ``D`` is called as ``D(x, sigma)`` (default True).

    Returns:
        a :class:`VPDenoiser` (with ``.schedule``, ``eps`` and ``score``).
    """
    return VPDenoiser(D, schedule, accepts_labels)


def edm_sigmas(steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """EDM's noise levels (Karras et al. 2022, eq. 5): ``steps`` levels from ``sigma_max`` down to ``sigma_min``,
    spaced evenly in ``sigma^(1/rho)``, then 0 (``steps + 1`` float64 values). PSPC's CIFAR-10 grid is the
    default (18 levels).

    Args:
        steps: the number of noise levels before the final 0, an int >= 2 (default 18).
        sigma_min: the smallest (default 0.002).
        sigma_max: the largest (default 80).
        rho: the spacing's exponent (default 7).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if steps > 1_000_000:  # three float64 arrays of the levels
        check_memory(24 * (int(steps) + 1), f"EDM's noise levels for {int(steps)} steps", advice="use fewer steps")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min!r}, {sigma_max!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    i = np.arange(steps, dtype=np.float64)
    s = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.concatenate([s, [0.0]])


def sigma_grid(grid: Sequence[float], schedule: ScheduleLike = "cosine_legacy") -> np.ndarray:
    """The noise levels ``sigma(t)`` of a time grid (descending; a final ``t = 0`` gives 0): the grid on which EDM's
    Euler sampler is the project's DDIM."""
    sched = get_schedule(schedule)
    return np.array([0.0 if float(t) <= 0 else float(sched.sigma(float(t))) for t in grid])


def _check_sigmas(sigmas) -> list:
    s = [float(v) for v in np.asarray(sigmas, dtype=np.float64).reshape(-1)]
    if len(s) < 2 or not all(math.isfinite(v) for v in s) or any(b >= a for a, b in zip(s, s[1:])) or s[-1] < 0 \
            or s[0] <= 0:
        raise ValueError(f"sigmas must be a strictly decreasing sequence of at least two noise levels >= 0, got {s}")
    return s


@docstring("""EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 without churn; PSPC's sampler): the
    probability-flow ODE ``dx / dsigma = (x - D(x, sigma)) / sigma`` from ``x`` at ``sigmas[0]`` down to ``sigmas[-1]``
    (0 ends on the last ``D``), with Euler steps or Heun's (the second-order correction on every step whose end is
    not 0).

    Args:
        D: ``D(x, sigma, labels) -> x0_hat`` of ``x = x0 + sigma n``: :func:`as_sigma_denoiser` of a machine or a
            network, or an EDM-convention callable.
        x: the starting state at ``sigmas[0]`` ``(B, C, H, W)``, numpy or torch; EDM starts from ``sigma_max`` times
            standard-normal noise (``x1 * sigmas[0]``); the project's DDIM from ``x1`` at ``t = 1`` is
            ``x1 / a(1) = x1 sqrt(1 + sigma(1)^2)``.
        labels: ``(B,)`` class labels or None (default), passed to every ``D`` call.
        sigmas: the descending noise levels (default :func:`edm_sigmas`: EDM's 18 and 0).
        solver: ``"euler"`` (default) or ``"heun"``.
        callback: ``callback(i, sigma, x, x0)`` after each step's first ``D`` call; None (default).
        progress: a progress bar on stderr (default True).

    Returns:
        the sample at ``sigmas[-1]``, numpy for numpy ``x``, else a torch tensor of ``x``'s dtype.
    """)
def edm_sample(D: Callable, x, labels=None, *, sigmas=None, solver: str = "euler", callback: Optional[Callable] = None,
               progress: bool = True):
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    s = _check_sigmas(edm_sigmas() if sigmas is None else sigmas)
    z, is_numpy = as_images(x, "x")
    labels = as_labels(labels, z.shape[0])
    check_callback(callback)
    bar = Progress(len(s) - 1, f"edm {solver}", enabled=progress and not torch.compiler.is_compiling())
    for i in range(len(s) - 1):
        sg, sn = s[i], s[i + 1]
        x0 = D(z, sg, labels)
        check_x0(x0, z, i, f"sigma = {sg}")
        x0 = torch.as_tensor(x0).to(z.dtype)
        if callback is not None:
            callback(i, sg, z, x0)
        d = (z - x0) / sg
        z_next = x0 + (sn / sg) * (z - x0) if sn > 0 else x0  # = z + (sn - sg) d, the Euler step, without cancellation
        if solver == "heun" and sn > 0:
            x0n = D(z_next, sn, labels)
            check_x0(x0n, z, i, f"sigma = {sn}, Heun's second evaluation")
            x0n = torch.as_tensor(x0n).to(z.dtype)
            z_next = z + (sn - sg) * 0.5 * (d + (z_next - x0n) / sn)
        z = z_next
        bar.update()
    bar.close()
    return like_input(z, is_numpy)


__all__ = ["SigmaDenoiser", "VPDenoiser", "as_sigma_denoiser", "from_sigma_denoiser", "edm_sigmas", "sigma_grid",
           "edm_sample"]
