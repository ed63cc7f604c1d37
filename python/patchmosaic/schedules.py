"""Noise schedules: each maps time ``t`` in ``(0, 1]`` to ``alpha_bar(t)`` (spec section 1).

A schedule is an object with ``alpha_bar(t)`` and ``one_minus_alpha_bar(t)`` (computed without
cancellation where the formula allows, which matters at small ``t`` where ``b^2`` is tiny).
Machines and samplers accept a schedule object, its name, or any callable ``t -> alpha_bar``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np


class Schedule:
    """Base class: ``alpha_bar(t)`` and ``1 - alpha_bar(t)``, both for float or numpy ``t``."""

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

    def __call__(self, t):
        return self.alpha_bar(t)

    def __repr__(self):
        return f"<schedule {self.name}>"


class CosineLegacy(Schedule):
    """The paper's schedule: ``alpha_bar(t) = cos(t / 1.008 * pi / 2) ** 2``; alpha_bar(1) ~ 1.55e-4."""

    name = "cosine_legacy"

    def alpha_bar(self, t):
        return np.cos(np.asarray(t, dtype=np.float64) / 1.008 * math.pi / 2) ** 2

    def one_minus_alpha_bar(self, t):
        return np.sin(np.asarray(t, dtype=np.float64) / 1.008 * math.pi / 2) ** 2


class Cosine(Schedule):
    """Nichol & Dhariwal: ``f(t) = cos((t + s) / (1 + s) * pi / 2) ** 2``, ``alpha_bar = f(t) / f(0)``,
    ``s = 0.008``. Reaches ``alpha_bar(1) = 0``."""

    name = "cosine"
    s = 0.008

    def _angle(self, t):
        return (np.asarray(t, dtype=np.float64) + self.s) / (1 + self.s) * math.pi / 2

    def alpha_bar(self, t):
        return np.cos(self._angle(t)) ** 2 / math.cos(self._angle(0.0)) ** 2

    def one_minus_alpha_bar(self, t):
        # (cos^2 th0 - cos^2 th) / cos^2 th0 = sin(th - th0) sin(th + th0) / cos^2 th0
        th, th0 = self._angle(t), self._angle(0.0)
        return np.sin(th - th0) * np.sin(th + th0) / math.cos(th0) ** 2


@dataclass
class Linear(Schedule):
    """Linear beta (the continuous limit of DDPM's 1e-4..0.02 over 1000 steps):
    ``alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "linear"

    def _integral(self, t):
        t = np.asarray(t, dtype=np.float64)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha_bar(self, t):
        return np.exp(-self._integral(t))

    def one_minus_alpha_bar(self, t):
        return -np.expm1(-self._integral(t))


class FromCallable(Schedule):
    """Wrap a user callable ``t -> alpha_bar(t)``."""

    def __init__(self, fn: Callable, name: str = "custom"):
        self.fn = fn
        self.name = name

    def alpha_bar(self, t):
        return np.asarray(self.fn(np.asarray(t, dtype=np.float64)), dtype=np.float64)


cosine_legacy = CosineLegacy()
cosine = Cosine()
linear = Linear()

SCHEDULES = {"cosine_legacy": cosine_legacy, "cosine": cosine, "linear": linear}

ScheduleLike = Union[str, Schedule, Callable]


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
