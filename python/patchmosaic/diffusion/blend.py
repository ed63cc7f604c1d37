"""A per-step convex blend of two denoisers on one noise schedule:
``x0_hat(x, t) = w(t) first(x, t) + (1 - w(t)) second(x, t)``, ``w(t)`` in ``[0, 1]`` a number or a
:class:`WeightSchedule` (one weight per reverse-process step), which
:func:`patchmosaic.experiments.blend_calibration.calibrate_blend` calibrates against a network as ``calibrate``
does a k-schedule. E.g. boundary-aware ELS blended with the Wiener filter: the local patch mosaic and the
Gaussian (linear) posterior mean of the whole training set, each step in the proportion that best matches the
network.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .denoisers import _Denoiser, _call_args, full_description
from .inputs import as_images, like_input
from .kschedule import NumberSchedule, _check_times
from .samplers import common_schedule
from ..machines.base import docstring


def check_weight(w) -> float:
    """A blend weight: a finite number in ``[0, 1]`` (a ValueError or TypeError naming it otherwise)."""
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
        raise TypeError(f"a blend weight must be a number in [0, 1], got {w!r}")
    if not (math.isfinite(float(w)) and 0.0 <= float(w) <= 1.0):
        raise ValueError(f"a blend weight must be a number in [0, 1], got {w!r}")
    return float(w)


@dataclass(frozen=True)
class WeightSchedule(NumberSchedule):
    """The weight ``weights[i]`` (in ``[0, 1]``) of a blend's first denoiser in the reverse-process step that starts
    at time ``times[i]``. ``to_json`` / ``from_json``: ``{"times": [...], "weights": [...]}``.

    Args:
        times: the steps' start times, each in ``(0, 1]``.
        weights: one weight in ``[0, 1]`` per time, as long as ``times``.
    """

    times: tuple
    weights: tuple
    FIELD = "weights"
    WHAT = "weight schedule"

    def __post_init__(self):
        _check_times(self.times, len(self.weights), "weights")
        for w in self.weights:
            check_weight(w)


class BlendDenoiser(_Denoiser):
    """``w(t) first(x, t, labels) + (1 - w(t)) second(x, t, labels)``: two denoisers on the same noise schedule
    (a :class:`MachineDenoiser`, :class:`NetworkDenoiser`, or another blend), mixed per step.

    Args:
        first, second: the two denoisers; their noise schedules must be the same (a ValueError otherwise).
        weight: the first denoiser's weight, a number in ``[0, 1]`` (every step) or a :class:`WeightSchedule`.
    """

    def __init__(self, first, second, weight):
        for name, d in (("first", first), ("second", second)):
            if not callable(d) or getattr(d, "schedule", None) is None:
                raise TypeError(f"{name} must be a denoiser with a noise schedule (MachineDenoiser, NetworkDenoiser, "
                                f"...), got {type(d).__name__}")
        self.schedule = common_schedule({"first": first, "second": second})
        if not isinstance(weight, WeightSchedule):
            weight = check_weight(weight)
        self.first, self.second, self.weight = first, second, weight

    def weight_at(self, t: float) -> float:
        """The first denoiser's weight at time ``t``."""
        return self.weight.value_at(t) if isinstance(self.weight, WeightSchedule) else self.weight

    def describe(self) -> dict:
        """What changes this denoiser's results: both denoisers' descriptions and the weights."""
        d = {"type": "BlendDenoiser", "first": full_description(self.first),
             "second": full_description(self.second)}
        if isinstance(self.weight, WeightSchedule):
            d["weights"], d["times"] = list(map(float, self.weight.weights)), list(map(float, self.weight.times))
        else:
            d["weight"] = self.weight
        return d

    @docstring("""``x0_hat``: the blend of the two denoisers' ``x0_hat`` at the step's weight (a denoiser with
        weight 0 is not called).

        Args:
""" + _call_args() + """
        Returns:
            ``x0_hat`` with the shape and dtype of ``x``; numpy for numpy ``x``, else a torch tensor.
        """)
    def __call__(self, x, t, labels=None):
        xt, is_numpy = as_images(x)
        w = self.weight_at(float(t))
        if w == 1.0:
            out = self.first(xt, t, labels)
        elif w == 0.0:
            out = self.second(xt, t, labels)
        else:
            out = w * self.first(xt, t, labels) + (1.0 - w) * self.second(xt, t, labels)
        return like_input(out, is_numpy)
