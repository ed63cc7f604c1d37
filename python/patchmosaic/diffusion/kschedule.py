"""k-schedules: one odd patch size per reverse-process step, indexed by the step's own time t.

Stored as JSON ``{"times": [...], "ks": [...]}``. The paper's published schedules are available by
name (:func:`paper_schedule`), translated from its index convention to ours.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import List

import numpy as np


def nearest_step(times, t: float) -> int:
    """The index of the step whose time is nearest to ``t`` (the earlier step on a tie). Plain Python, so that
    ``torch.compile`` folds it to a constant."""
    t = float(t)
    best, gap = 0, abs(float(times[0]) - t)
    for i in range(1, len(times)):
        g = abs(float(times[i]) - t)
        if g < gap:
            best, gap = i, g
    return best


def _check_times(times, n: int, what: str) -> None:
    if len(times) != n or not n:
        raise ValueError(f"times and {what} must be non-empty and equally long, got {len(times)} and {n}")
    for t in times:
        if not 0 < t <= 1:
            raise ValueError(f"schedule times must lie in (0, 1], got {t}")


@dataclass(frozen=True)
class KSchedule:
    """Patch size ``ks[i]`` for the reverse-process step that starts at time ``times[i]``.

    Args:
        times: the steps' start times, each in ``(0, 1]`` (e.g. ``(1.0, 0.95, ..., 0.05)``).
        ks: one odd positive patch size (pixels) per time, as long as ``times``.
    """

    times: tuple
    ks: tuple

    def __post_init__(self):
        _check_times(self.times, len(self.ks), "ks")
        for k in self.ks:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
                raise ValueError(f"every k in a k-schedule must be an odd positive integer, got {k!r}")

    def k_at(self, t: float) -> int:
        """The k of the step whose time is nearest to ``t`` (the earlier step on a tie). Plain Python, so
        that ``torch.compile`` folds it to a constant."""
        return int(self.ks[nearest_step(self.times, t)])

    value_at = k_at  # the parameter's value at time t (the interface every schedule has)

    @property
    def values(self) -> tuple:
        return self.ks

    def to_json(self, path: str) -> None:
        """Write ``{"times": [...], "ks": [...]}`` atomically to ``path``."""
        from ..io.runstate import write_json

        write_json(path, {"times": list(map(float, self.times)), "ks": list(map(int, self.ks))})

    @classmethod
    def from_json(cls, path: str) -> "KSchedule":
        """Read a schedule written by :meth:`to_json` (extra keys, e.g. a calibration's, are ignored). A
        ValueError names the file when it is not a k-schedule: no ``times``/``ks`` lists of equal length,
        a ``k`` that is not an integer (``7.9`` or ``"7"`` are refused, not rounded), a time outside (0, 1]."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path} is not a readable JSON k-schedule: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("ks"), list) or not isinstance(d.get("times"), list):
            raise ValueError(f"{path} is not a k-schedule: it needs lists 'times' and 'ks'")
        for k in d["ks"]:
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"{path}: every k must be an odd integer, got {k!r}")
        for t in d["times"]:
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise ValueError(f"{path}: every time must be a number in (0, 1], got {t!r}")
        try:
            return cls(tuple(float(t) for t in d["times"]), tuple(d["ks"]))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def constant(cls, k: int, steps: int = 20) -> "KSchedule":
        """The same ``k`` at every step of the grid ``t_i = i / steps``."""
        return cls(tuple(i / steps for i in range(steps, 0, -1)), (int(k),) * steps)

    @classmethod
    def ramp(cls, k_first: int, k_last: int, steps: int = 20) -> "KSchedule":
        """k moving linearly from ``k_first`` (step at t = 1) to ``k_last`` (last step); an even value
        rounds up to the next odd one."""
        ks = np.linspace(k_first, k_last, steps)
        return cls(tuple(i / steps for i in range(steps, 0, -1)), tuple(int(2 * np.floor(k / 2) + 1) for k in ks))


@dataclass(frozen=True)
class ThresholdSchedule:
    """The PCA-locality threshold ``thresholds[i]`` (in ``(0, 1]``) for the reverse-process step that starts at time
    ``times[i]`` (:class:`patchmosaic.PCALocality`; what :func:`patchmosaic.calibrate` gives for it).

    Args:
        times: the steps' start times, each in ``(0, 1]``.
        thresholds: one threshold in ``(0, 1]`` per time, as long as ``times``.
    """

    times: tuple
    thresholds: tuple

    def __post_init__(self):
        _check_times(self.times, len(self.thresholds), "thresholds")
        for v in self.thresholds:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 < v <= 1:
                raise ValueError(f"every threshold of a threshold schedule must be a number in (0, 1], got {v!r}")

    def value_at(self, t: float) -> float:
        """The threshold of the step whose time is nearest to ``t`` (the earlier step on a tie)."""
        return float(self.thresholds[nearest_step(self.times, t)])

    @property
    def values(self) -> tuple:
        return self.thresholds

    def to_json(self, path: str) -> None:
        """Write ``{"times": [...], "thresholds": [...]}`` atomically to ``path``."""
        from ..io.runstate import write_json

        write_json(path, {"times": list(map(float, self.times)), "thresholds": list(map(float, self.thresholds))})

    @classmethod
    def from_json(cls, path: str) -> "ThresholdSchedule":
        """Read a schedule written by :meth:`to_json` (extra keys ignored); a ValueError names the file when it is
        not one."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path} is not a readable JSON threshold schedule: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("thresholds"), list) or not isinstance(d.get("times"), list):
            raise ValueError(f"{path} is not a threshold schedule: it needs lists 'times' and 'thresholds'")
        for v in d["times"] + d["thresholds"]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{path}: times and thresholds must be numbers, got {v!r}")
        try:
            return cls(tuple(float(t) for t in d["times"]), tuple(float(v) for v in d["thresholds"]))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def constant(cls, threshold: float, steps: int = 20) -> "ThresholdSchedule":
        """The same threshold at every step of the grid ``t_i = i / steps``."""
        return cls(tuple(i / steps for i in range(steps, 0, -1)), (float(threshold),) * steps)


def schedule_from_spec(parameter: str, spec, steps: int = 20):
    """A schedule of a machine's ``parameter`` from a short text: for ``"k"`` what :func:`from_spec` reads; for
    ``"threshold"`` a number in (0, 1] (every step) or a threshold-schedule JSON file."""
    if parameter == "k":
        return from_spec(spec, steps)
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


def from_spec(spec, steps: int = 20) -> KSchedule:
    """A k-schedule from a short text: ``"7"`` (constant), ``"ramp:15:5"``, ``"paper:NAME"`` or a JSON file."""
    spec = str(spec)
    if spec.startswith("paper:"):
        return paper_schedule(spec[6:], steps)
    if spec.startswith("ramp:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"a ramp k-schedule reads ramp:K_FIRST:K_LAST, got {spec!r}")
        return KSchedule.ramp(int(parts[1]), int(parts[2]), steps)
    if spec.lstrip("-").isdigit():
        return KSchedule.constant(int(spec), steps)
    if not os.path.exists(spec):
        raise ValueError(f"k-schedule {spec!r} is neither an odd integer, ramp:A:B, paper:NAME nor a JSON file")
    return KSchedule.from_json(spec)


def paper_schedule_names() -> List[str]:
    """Names accepted by :func:`paper_schedule` (e.g. ``"MNIST_ResNet_zeros"``)."""
    return sorted(_paper()["schedules"])


def paper_schedule(name: str, steps: int = 20) -> KSchedule:
    """The paper's calibrated schedule ``name`` on our grid ``t_i = i / steps``, ``i = steps..1``.

    The paper stores entry ``i`` for ``t = i / 20`` (entry 0 unused, its machine starting at t = 0.95);
    our step at ``t = 1`` takes the entry of ``t = 0.95``.
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
