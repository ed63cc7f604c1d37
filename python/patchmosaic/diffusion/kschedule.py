"""k-schedules: one odd patch size per reverse-process step, indexed by the step's own time t.

Stored as JSON ``{"times": [...], "ks": [...]}``. The paper's published schedules are available by
name (:func:`paper_schedule`), translated from its index convention to ours.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from importlib import resources
from typing import List, Optional

import numpy as np

from ..schedules import nearest_step



def _read_json(path: str, what: str):
    """The JSON value in ``path``; a ValueError naming the file and ``what`` it should hold when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not a readable JSON {what}: {type(e).__name__}: {str(e)[:200]}") from None


def _check_times(times, n: int, what: str) -> None:
    if len(times) != n or not n:
        raise ValueError(f"times and {what} must be non-empty and equally long, got {len(times)} and {n}")
    for t in times:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < t <= 1:
            raise ValueError(f"schedule times must be numbers in (0, 1], got {t!r}")
    if len({float(t) for t in times}) != len(times):
        raise ValueError(f"schedule times must be distinct (a repeated time's {what} would never be used), got "
                         f"{tuple(map(float, times))}")


@dataclass(frozen=True)
class KSchedule:
    """Patch size ``ks[i]`` for the reverse-process step that starts at time ``times[i]``.

    Args:
        times: the steps' start times, each in ``(0, 1]`` (e.g. ``(1.0, 0.95, ..., 0.05)``).
        ks: one positive patch size (pixels) per time, as long as ``times``; odd unless ``odd=False``.
        odd: True (default): every size odd, as the centred patches of LS and ELS need. False: any positive size,
            for the corner-anchored patches of :class:`patchmosaic.PSPC` (whose published CIFAR-10 schedule
            starts with the whole 32 x 32 image; the machines with centred patches refuse an even size).
    """

    times: tuple
    ks: tuple
    odd: bool = True

    def __post_init__(self):
        _check_times(self.times, len(self.ks), "ks")
        if not isinstance(self.odd, bool):
            raise TypeError(f"odd must be True or False, got {self.odd!r}")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or (self.odd and k % 2 == 0):
                what = "an odd positive integer" if self.odd else "a positive integer"
                raise ValueError(f"every k in a k-schedule must be {what}, got {k!r}"
                                 + (" (KSchedule(..., odd=False) holds even sizes too)" if self.odd and not
                                    isinstance(k, bool) and isinstance(k, (int, np.integer)) and k >= 1 else ""))

    def k_at(self, t: float) -> int:
        """The k of the step whose time is nearest to ``t`` (the earlier step on a tie). Plain Python, so
        that ``torch.compile`` folds it to a constant."""
        return int(self.ks[nearest_step(self.times, t)])

    value_at = k_at  # the parameter's value at time t (the interface every schedule has)

    @property
    def values(self) -> tuple:
        return self.ks

    def to_json(self, path: str) -> None:
        """Write ``{"times": [...], "ks": [...]}`` atomically to ``path`` (and ``"odd": false`` for a schedule that
        may hold even sizes)."""
        from ..io.runstate import write_json

        write_json(path, {"times": list(map(float, self.times)), "ks": list(map(int, self.ks)),
                          **({} if self.odd else {"odd": False})})

    @classmethod
    def from_json(cls, path: str) -> "KSchedule":
        """Read a schedule written by :meth:`to_json` (extra keys, e.g. a calibration's, are ignored). A
        ValueError names the file when it is not a k-schedule: no ``times``/``ks`` lists of equal length,
        a ``k`` that is not an integer (``7.9`` or ``"7"`` are refused, not rounded), a time outside (0, 1]."""
        d = _read_json(path, "k-schedule")
        if not isinstance(d, dict) or not isinstance(d.get("ks"), list) or not isinstance(d.get("times"), list):
            raise ValueError(f"{path} is not a k-schedule: it needs lists 'times' and 'ks'")
        odd = d.get("odd", True)
        if not isinstance(odd, bool):
            raise ValueError(f"{path}: 'odd' must be true or false, got {odd!r}")
        for k in d["ks"]:
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"{path}: every k must be an {'odd ' if odd else ''}integer, got {k!r}")
        for t in d["times"]:
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise ValueError(f"{path}: every time must be a number in (0, 1], got {t!r}")
        try:
            return cls(tuple(float(t) for t in d["times"]), tuple(d["ks"]), odd)
        except (ValueError, OverflowError) as e:  # (an integer time too large for a float)
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def constant(cls, k: int, steps: int = 20, odd: bool = True) -> "KSchedule":
        """The same ``k`` at every step of the grid ``t_i = i / steps`` (``odd=False``: ``k`` may be even)."""
        return cls(tuple(i / steps for i in range(steps, 0, -1)), (k,) * steps, odd)  # (k checked, not truncated)

    @classmethod
    def ramp(cls, k_first: int, k_last: int, steps: int = 20) -> "KSchedule":
        """k moving linearly from ``k_first`` (step at t = 1) to ``k_last`` (last step); an even value
        rounds up to the next odd one."""
        ks = np.linspace(k_first, k_last, steps)
        return cls(tuple(i / steps for i in range(steps, 0, -1)), tuple(int(2 * np.floor(k / 2) + 1) for k in ks))


class NumberSchedule:
    """What a schedule of one number per step (a :class:`ThresholdSchedule`, a blend's
    :class:`patchmosaic.WeightSchedule`) does with its ``times`` and its values (the field named ``FIELD``)."""

    FIELD = "values"
    WHAT = "schedule"

    @property
    def values(self) -> tuple:
        return getattr(self, self.FIELD)

    def value_at(self, t: float) -> float:
        """The value of the step whose time is nearest to ``t`` (the earlier step on a tie)."""
        return float(self.values[nearest_step(self.times, t)])

    def to_json(self, path: str) -> None:
        """Write ``{"times": [...], FIELD: [...]}`` atomically to ``path``."""
        from ..io.runstate import write_json

        write_json(path, {"times": list(map(float, self.times)), self.FIELD: list(map(float, self.values))})

    @classmethod
    def from_json(cls, path: str):
        """Read a schedule written by :meth:`to_json` (extra keys ignored); a ValueError names the file when it is
        not one."""
        d = _read_json(path, cls.WHAT)
        if not isinstance(d, dict) or not isinstance(d.get(cls.FIELD), list) or not isinstance(d.get("times"), list):
            raise ValueError(f"{path} is not a {cls.WHAT}: it needs lists 'times' and '{cls.FIELD}'")
        for v in d["times"] + d[cls.FIELD]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{path}: times and {cls.FIELD} must be numbers, got {v!r}")
        try:
            return cls(tuple(float(t) for t in d["times"]), tuple(float(v) for v in d[cls.FIELD]))
        except (ValueError, OverflowError) as e:
            raise ValueError(f"{path}: {e}") from None


@dataclass(frozen=True)
class ThresholdSchedule(NumberSchedule):
    """A threshold ``thresholds[i]`` (in ``(0, 1]``) for the reverse-process step that starts at time ``times[i]``:
    PCA-locality's ``theta`` (:class:`patchmosaic.PCALocality`), PSPC-Flex's mass ``tau`` (:class:`patchmosaic.PSPC`);
    what :func:`patchmosaic.calibrate` gives for them. ``to_json`` / ``from_json``: ``{"times": [...],
    "thresholds": [...]}``.

    Args:
        times: the steps' start times, each in ``(0, 1]``.
        thresholds: one threshold in ``(0, 1]`` per time, as long as ``times``.
    """

    times: tuple
    thresholds: tuple
    FIELD = "thresholds"
    WHAT = "threshold schedule"

    def __post_init__(self):
        _check_times(self.times, len(self.thresholds), "thresholds")
        for v in self.thresholds:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 < v <= 1:
                raise ValueError(f"every threshold of a threshold schedule must be a number in (0, 1], got {v!r}")

    @classmethod
    def constant(cls, threshold: float, steps: int = 20) -> "ThresholdSchedule":
        """The same threshold at every step of the grid ``t_i = i / steps``."""
        return cls(tuple(i / steps for i in range(steps, 0, -1)), (float(threshold),) * steps)


def schedule_from_spec(parameter: str, spec, steps: int = 20):
    """A schedule of a machine's ``parameter`` from a short text: for ``"k"`` what :func:`from_spec` reads; for
    ``"p"`` (a size that may be even: PSPC) the same with even sizes allowed, or ``pspc`` (the published CIFAR-10
    schedule on this grid); for ``"threshold"`` a number in (0, 1] (every step), a threshold-schedule JSON file, or
    ``pspc`` (PSPC-Flex's published mass schedule)."""
    if parameter == "k":
        return from_spec(spec, steps)
    if str(spec) == "pspc" and parameter in ("p", "threshold"):
        return published_schedule("square" if parameter == "p" else "flex", steps=steps)
    if parameter == "p":
        return from_spec(spec, steps, odd=False)
    if parameter != "threshold":
        raise ValueError(f"no schedule for the parameter {parameter!r}")
    spec = str(spec)
    try:
        value = float(spec)
    except ValueError:
        if not os.path.exists(spec):
            raise ValueError(f"threshold schedule {spec!r} is neither a number in (0, 1] nor a JSON file") from None
        return ThresholdSchedule.from_json(spec)
    return ThresholdSchedule.constant(value, steps)


def from_spec(spec, steps: int = 20, odd: bool = True) -> KSchedule:
    """A k-schedule from a short text: ``"7"`` (constant), ``"ramp:15:5"``, ``"paper:NAME"`` or a JSON file;
    ``odd=False``: a constant may be even (a JSON file says itself whether it may)."""
    spec = str(spec)
    if spec.startswith("paper:"):
        return paper_schedule(spec[6:], steps)
    if spec.startswith("ramp:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"a ramp k-schedule reads ramp:K_FIRST:K_LAST, got {spec!r}")
        return KSchedule.ramp(int(parts[1]), int(parts[2]), steps)
    if spec.lstrip("-").isdigit():
        return KSchedule.constant(int(spec), steps, odd)
    if not os.path.exists(spec):
        raise ValueError(f"k-schedule {spec!r} is neither an odd integer, ramp:A:B, paper:NAME nor a JSON file")
    return KSchedule.from_json(spec)


def paper_schedule_names() -> List[str]:
    """Names accepted by :func:`paper_schedule` (e.g. ``"MNIST_ResNet_zeros"``)."""
    return sorted(_paper()["schedules"])


def paper_schedule(name: str, steps: int = 20) -> KSchedule:
    """The paper's calibrated schedule ``name`` on our grid ``t_i = i / steps``, ``i = steps..1``.

    The paper stores entry ``i`` for ``t = i / 20`` (entry 0 unused, its machine starting at t = 0.95): its
    sampler (``ScheduledScoreMachine.forward`` in the paper's code) steps ``i = len(scales) - 1, ..., 1`` at
    ``t = i / len(scales)`` with patch size ``scales[i]``. Our step at ``t = 1`` takes the entry of ``t = 0.95``.
    """
    table = _paper()["schedules"]
    if name not in table:
        raise ValueError(f"unknown paper k-schedule {name!r}; known: {sorted(table)}")
    entries = table[name]
    n = len(entries)
    times = tuple(i / steps for i in range(steps, 0, -1))
    ks = tuple(int(entries[min(n - 1, max(1, int(round(t * n))))]) for t in times)
    return KSchedule(times, ks)


def _paper():
    with resources.files("patchmosaic.data").joinpath("paper_kschedules.json").open("r") as f:
        return json.load(f)


# PSPC's published CIFAR-10 schedules (plai-group/pspc, pspc/denoisers.py: CIFAR_PATCH_SCHEDULE and
# CIFAR_THRESHOLD_SCHEDULE), one entry per noise level of EDM's 18-step grid (sigma 80 -> 0.002, rho 7)
PSPC_SQUARE_SIZES = (32, 32, 32, 32, 32, 32, 32, 23, 15, 11, 7, 5, 3, 3, 3, 3, 3, 3)
PSPC_FLEX_TAUS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.7, 0.5, 0.4, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3)


def published_schedule(kind: str = "square", steps: Optional[int] = 20, grid=None, schedule="cosine_legacy",
                       max_size: Optional[int] = None):
    """PSPC's published CIFAR-10 schedule (Niedoba et al. 2025) on this project's time grid: ``kind="square"`` the
    patch sizes (a :class:`KSchedule` with ``odd=False``: it starts at 32, the whole image), ``"flex"`` the masses
    ``tau`` (a :class:`ThresholdSchedule`).

    Their denoiser takes, at noise level ``sigma``, the entry of the EDM noise level nearest to it (``argmin |sigma_i
    - sigma|`` over the 18 levels, the first on a tie); here each step's time ``t`` is mapped to ``sigma(t) = b / a`` of
    ``schedule`` and looked up by the same rule.

    Args:
        kind: ``"square"`` or ``"flex"``.
        steps: the grid ``t_i = i / steps`` (default 20); None: their own 18 noise levels, as times of ``schedule``
            (an EDM sampler on :func:`patchmosaic.edm_sigmas` then meets the published values exactly).
        grid: descending times instead of ``steps`` (a final 0 is dropped).
        schedule: the noise schedule mapping times to noise levels (default cosine-legacy, whose ``sigma(1)`` is
            80.2).
        max_size: square only: sizes above it are cut to it (for images smaller than 32 x 32); None: as published.
    """
    from ..schedules import get_schedule
    from .edm import edm_sigmas

    if kind not in ("square", "flex"):
        raise ValueError(f"kind must be 'square' or 'flex', got {kind!r}")
    sched = get_schedule(schedule)
    edm = edm_sigmas(len(PSPC_SQUARE_SIZES))[:-1]
    if grid is not None:
        g = np.asarray(grid, dtype=np.float64)
        if g.ndim != 1 or not len(g) or not np.all(np.isfinite(g)) or np.any(np.diff(g) >= 0) or g[0] > 1 \
                or g[-1] < 0 or g[0] <= 0:
            raise ValueError(f"grid must be strictly decreasing times within [0, 1] that start above 0, got "
                             f"{g.tolist() if g.size <= 30 else g.shape}")
        times = tuple(float(t) for t in g if t > 0)
    elif steps is None:
        times = tuple(sched.time_at_sigma(float(s)) for s in edm)
    else:
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 1:
            raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
        times = tuple(i / steps for i in range(int(steps), 0, -1))
    idx = [int(np.argmin(np.abs(edm - float(sched.sigma(t))))) for t in times]
    if kind == "flex":
        return ThresholdSchedule(times, tuple(PSPC_FLEX_TAUS[j] for j in idx))
    sizes = [PSPC_SQUARE_SIZES[j] for j in idx]
    if max_size is not None:
        sizes = [min(int(p), int(max_size)) for p in sizes]
    return KSchedule(times, tuple(sizes), odd=False)
