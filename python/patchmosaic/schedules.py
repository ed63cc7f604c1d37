"""Noise schedules: each maps time ``t`` in ``(0, 1]`` to ``alpha_bar(t)`` (spec section 1).

A schedule is an object with ``alpha_bar(t)`` and ``one_minus_alpha_bar(t)`` (computed without
cancellation where the formula allows, which matters at small ``t`` where ``b^2`` is tiny). Each formula is
written once and evaluates on a Python float (``math``), a numpy array or a torch tensor (differentiable,
so gradients with respect to ``t`` flow through it). Machines and samplers accept a schedule object, its
name, or any callable ``t -> alpha_bar``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch


def _xp(t):
    """The namespace whose cos / sin / exp / expm1 / sqrt apply to ``t``."""
    if isinstance(t, torch.Tensor):
        return torch
    if isinstance(t, numbers.Real) and not isinstance(t, np.ndarray):
        return math
    return np


def _as(t):
    xp = _xp(t)
    if xp is np:
        return np.asarray(t, dtype=np.float64)
    return float(t) if xp is math else t


class Schedule:
    """Base class: ``alpha_bar(t)`` and ``1 - alpha_bar(t)`` for a float, a numpy array or a tensor ``t``."""

    name = "custom"

    def alpha_bar(self, t):
        raise NotImplementedError

    def one_minus_alpha_bar(self, t):
        return 1.0 - self.alpha_bar(t)

    def coefficients(self, t):
        """Return float64 arrays ``(a, b2)``: ``a = sqrt(alpha_bar)``, ``b2 = 1 - alpha_bar``."""
        t = np.asarray(t, dtype=np.float64)
        ab = np.asarray(self.alpha_bar(t), dtype=np.float64)
        b2 = np.asarray(self.one_minus_alpha_bar(t), dtype=np.float64)
        return np.sqrt(np.clip(ab, 0.0, 1.0)), np.clip(b2, 0.0, 1.0)

    def scalar_coefficients(self, t: float):
        """``(a, b2)`` as Python floats for one time ``t`` (what a sampler's step and a machine called with a
        float ``t`` use; foldable to constants by ``torch.compile``)."""
        ab = float(self.alpha_bar(float(t)))
        b2 = float(self.one_minus_alpha_bar(float(t)))
        return math.sqrt(min(max(ab, 0.0), 1.0)), min(max(b2, 0.0), 1.0)

    def torch_coefficients(self, t: torch.Tensor):
        """``(a, b2)`` as float64 tensors of the shape of ``t``, differentiable in ``t``."""
        t = t.to(torch.float64)
        ab = self.alpha_bar(t)
        b2 = self.one_minus_alpha_bar(t)
        return torch.sqrt(ab.clamp(0.0, 1.0)), b2.clamp(0.0, 1.0)

    def __call__(self, t):
        return self.alpha_bar(t)

    # ----- the variance-exploding (EDM) view: x_VE = x_t / a, sigma = b / a ----------------------------------
    def sigma(self, t):
        """The variance-exploding noise level of time ``t``: ``sigma = b / a = sqrt((1 - alpha_bar) / alpha_bar)``
        (so ``alpha_bar = 1 / (1 + sigma^2)``); a float for a float ``t``, else an array or tensor."""
        xp = _xp(t)
        return xp.sqrt(self.one_minus_alpha_bar(t) / self.alpha_bar(t))

    def time_at_sigma(self, sigma: float) -> float:
        """The time ``t`` in ``(0, 1]`` whose noise level :meth:`sigma` is ``sigma > 0`` (the inverse of the
        schedule at ``alpha_bar(t) = 1 / (1 + sigma^2)``): a closed form for the built-in schedules, bisection to
        float rounding for others (their ``b^2 / a^2`` must rise with ``t``). A ValueError for a ``sigma`` that is
        not a finite number > 0 or lies above the schedule's largest, ``sigma(1)``."""
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < float(sigma) < math.inf:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        sigma = float(sigma)
        top = float(self.sigma(1.0))
        if sigma > top * (1 + 1e-12):
            raise ValueError(f"sigma = {sigma:g} lies above the largest noise level of the schedule {self.name!r}, "
                             f"sigma(t = 1) = {top:g}")
        if sigma >= top:
            return 1.0
        return min(max(self._time_at_sigma(sigma), math.ulp(0.0)), 1.0)

    def _time_at_sigma(self, sigma: float) -> float:
        """Bisection on ``log(b^2 / a^2)``, which rises with ``t`` (to the last float)."""
        target = 2 * math.log(sigma)
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            ab, b2 = float(self.alpha_bar(mid)), float(self.one_minus_alpha_bar(mid))
            if b2 <= 0 or math.log(b2) - math.log(ab) < target:
                lo = mid
            else:
                hi = mid
        return hi if abs(float(self.sigma(hi)) - sigma) <= abs(float(self.sigma(lo)) - sigma) or lo == 0 else lo

    def describe(self) -> dict:
        """The schedule as it matters for results: its name and alpha_bar on a grid of t (a custom callable
        is told apart by its values)."""
        t = np.linspace(0.005, 1.0, 32)
        return {"name": self.name, "alpha_bar": [float(v) for v in np.asarray(self.alpha_bar(t), np.float64)]}

    def __repr__(self):
        return f"<schedule {self.name}>"


class CosineLegacy(Schedule):
    """The paper's schedule: ``alpha_bar(t) = cos(t / 1.008 * pi / 2) ** 2``; alpha_bar(1) ~ 1.55e-4."""

    name = "cosine_legacy"

    def alpha_bar(self, t):
        return _xp(t).cos(_as(t) / 1.008 * math.pi / 2) ** 2

    def one_minus_alpha_bar(self, t):
        return _xp(t).sin(_as(t) / 1.008 * math.pi / 2) ** 2

    def sigma(self, t):
        return _xp(t).tan(_as(t) / 1.008 * math.pi / 2)

    def _time_at_sigma(self, sigma: float) -> float:
        return math.atan(sigma) / (math.pi / 2) * 1.008


class Cosine(Schedule):
    """Nichol & Dhariwal: ``f(t) = cos((t + s) / (1 + s) * pi / 2) ** 2``, ``alpha_bar = f(t) / f(0)``,
    ``s = 0.008``. Reaches ``alpha_bar(1) = 0``."""

    name = "cosine"
    s = 0.008

    def _angle(self, t):
        return (_as(t) + self.s) / (1 + self.s) * math.pi / 2

    def alpha_bar(self, t):
        return _xp(t).cos(self._angle(t)) ** 2 / math.cos(self._angle(0.0)) ** 2

    def one_minus_alpha_bar(self, t):
        # (cos^2 th0 - cos^2 th) / cos^2 th0 = sin(th - th0) sin(th + th0) / cos^2 th0
        xp, th, th0 = _xp(t), self._angle(t), self._angle(0.0)
        return xp.sin(th - th0) * xp.sin(th + th0) / math.cos(th0) ** 2

    def _time_at_sigma(self, sigma: float) -> float:
        # cos^2 th = cos^2 th0 / (1 + sigma^2)  <=>  tan th = sqrt(sigma^2 + sin^2 th0) / cos th0
        th0 = self._angle(0.0)
        th = math.atan2(math.sqrt(sigma * sigma + math.sin(th0) ** 2), math.cos(th0))
        return th / (math.pi / 2) * (1 + self.s) - self.s


@dataclass
class Linear(Schedule):
    """Linear beta (the continuous limit of DDPM's 1e-4..0.02 over 1000 steps):
    ``alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "linear"

    def __post_init__(self):
        for field in ("beta_min", "beta_max"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < np.inf:
                raise ValueError(f"Linear: {field} must be a finite number >= 0, got {v!r}")
        if not (self.beta_min > 0 or self.beta_max > 0):
            raise ValueError(f"Linear: beta_min and beta_max are both 0 (no noise at any time), got beta_min="
                             f"{self.beta_min!r}, beta_max={self.beta_max!r}")

    def _integral(self, t):
        t = _as(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha_bar(self, t):
        return _xp(t).exp(-self._integral(t))

    def one_minus_alpha_bar(self, t):
        return -_xp(t).expm1(-self._integral(t))

    def _time_at_sigma(self, sigma: float) -> float:
        # beta_min t + (beta_max - beta_min) t^2 / 2 = log(1 + sigma^2), the root in its cancellation-free form
        L = math.log1p(sigma * sigma)
        d = self.beta_max - self.beta_min
        return 2 * L / (self.beta_min + math.sqrt(self.beta_min ** 2 + 2 * d * L))


class FromCallable(Schedule):
    """Wrap a user callable ``t -> alpha_bar(t)``: one that takes a float64 numpy array of times is called once per
    array (a callable that also takes torch tensors keeps gradients with respect to ``t``); one that takes only a
    float (e.g. written with ``math.cos``) is called once per time."""

    def __init__(self, fn: Callable, name: str = "custom"):
        self.fn = fn
        self.name = name

    def alpha_bar(self, t):
        if isinstance(t, torch.Tensor):
            try:
                out = self.fn(t)
            except Exception:  # a numpy-only callable
                out = None
            if not isinstance(out, torch.Tensor):
                out = torch.as_tensor(self._checked(np.asarray(t.detach().cpu().numpy(), np.float64)), device=t.device)
            elif out.shape != t.shape:
                raise ValueError(self._shape_message(tuple(t.shape), tuple(out.shape)))
            if not torch.compiler.is_compiling():  # (a compiled graph cannot branch on the values)
                self._in_range(out.detach().cpu().numpy(), t.detach().cpu().numpy())
            return out.to(torch.float64)
        if _xp(t) is math:
            return float(self._checked(np.asarray([t], dtype=np.float64))[0])
        return self._checked(np.asarray(t, dtype=np.float64))

    def _checked(self, t: np.ndarray) -> np.ndarray:
        import warnings

        try:
            with warnings.catch_warnings():
                # (numpy < 2.3 lets math.cos take a one-element array, with a DeprecationWarning, returning a float)
                warnings.simplefilter("error", DeprecationWarning)
                out = np.asarray(self.fn(t), dtype=np.float64)
        except Exception as array_error:  # a callable of one float (math.cos, ...): once per time
            try:
                out = np.array([float(self.fn(float(v))) for v in t.reshape(-1)], dtype=np.float64).reshape(t.shape)
            except Exception as e:
                raise TypeError(f"the schedule callable {getattr(self.fn, '__name__', self.name)!r} failed on a "
                                f"numpy array of times ({type(array_error).__name__}: {array_error}) and on a single "
                                f"float time ({type(e).__name__}: {e}); it must map t in (0, 1] to alpha_bar(t)") \
                    from None
        if out.shape != t.shape:
            raise ValueError(self._shape_message(t.shape, out.shape))
        return self._in_range(out, t)

    def _in_range(self, out: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``out`` where every alpha_bar lies in [0, 1] (to rounding: 1e-12), else a ValueError naming the first
        that does not (a NaN, a negative value or one above 1 is not a noise level, and is not clipped silently)."""
        bad = ~((out >= -1e-12) & (out <= 1 + 1e-12))
        if bad.any():
            i = np.flatnonzero(bad.reshape(-1))[0]
            got, at = float(out.reshape(-1)[i]), float(t.reshape(-1)[i])
            raise ValueError(f"the schedule callable {getattr(self.fn, '__name__', self.name)!r} must return "
                             f"alpha_bar(t) in [0, 1], got {got} at t = {at}")
        return out

    def _shape_message(self, want, got) -> str:
        return (f"the schedule callable {getattr(self.fn, '__name__', self.name)!r} must return one alpha_bar per "
                f"time (an array of the times' shape {tuple(want)}), got shape {tuple(got)}; e.g. "
                "lambda t: np.cos(t * np.pi / 2) ** 2 instead of a constant")


cosine_legacy = CosineLegacy()
cosine = Cosine()
linear = Linear()

SCHEDULES = {"cosine_legacy": cosine_legacy, "cosine": cosine, "linear": linear}

ScheduleLike = Union[str, Schedule, Callable]


def nearest_step(times, t: float) -> int:
    """The index of the step whose time is nearest to ``t`` (the earlier step on a tie, equal gaps up to 1e-12: a
    time halfway between two steps of a grid, computed in floating point, is a tie). Plain Python, so that
    ``torch.compile`` folds it to a constant."""
    t = float(t)
    best, gap = 0, abs(float(times[0]) - t)
    for i in range(1, len(times)):
        g = abs(float(times[i]) - t)
        if g < gap - 1e-12:
            best, gap = i, g
    return best


def get_schedule(schedule: ScheduleLike = "cosine_legacy") -> Schedule:
    """Resolve a schedule name, object or callable to a :class:`Schedule`."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; known: {sorted(SCHEDULES)}")
        return SCHEDULES[schedule]
    if callable(schedule):
        return FromCallable(schedule)
    raise TypeError(f"schedule must be a name, a Schedule or a callable, got {type(schedule).__name__}")


def same_schedule(a: ScheduleLike, b: ScheduleLike) -> bool:
    """Whether two schedules give the same alpha_bar (the same object, or equal values on a grid of t)."""
    a, b = get_schedule(a), get_schedule(b)
    if a is b:
        return True
    t = np.linspace(0.005, 1.0, 64)
    return bool(np.allclose(np.asarray(a.alpha_bar(t), np.float64), np.asarray(b.alpha_bar(t), np.float64),
                            rtol=1e-12, atol=1e-15))
