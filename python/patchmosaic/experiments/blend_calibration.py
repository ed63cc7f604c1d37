"""Calibration of a blend's per-step weight (:class:`patchmosaic.diffusion.blend.BlendDenoiser`) against a trained
network, the way :func:`patchmosaic.calibrate` calibrates a k-schedule: along the network's own DDIM trajectory from
each seed, at every step, the blend at every candidate weight on the network's current ``x_t`` (each denoiser
called once per step); the weight whose score is most cosine-similar to the network's is that seed's choice, and the
schedule takes the median over seeds per step, rounded to the nearest candidate weight (``median="lower"``: the
lower median), as :func:`patchmosaic.calibrate` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..diffusion.blend import BlendDenoiser, WeightSchedule, check_weight
from ..diffusion.denoisers import NetworkDenoiser, full_description
from ..diffusion.inputs import as_labels
from ..diffusion.samplers import check_grid, common_schedule
from ..io.runstate import fingerprint, write_json
from ..ops.checks import check_cuda_inputs
from .calibrate import check_median, per_step_choices, trajectory_cosines

DEFAULT_WEIGHTS = tuple(i / 10 for i in range(11))  # 0, 0.1, ..., 1


@dataclass
class BlendCalibration:
    """What :func:`calibrate_blend` returns (S steps, M seeds, K candidate weights).

    Args:
        schedule: the calibrated :class:`WeightSchedule`, per step the median over seeds of ``choices[i]`` rounded
            to the nearest candidate (or their lower median, with ``median="lower"``).
        candidates: the K candidate weights tried, a tuple.
        choices: ``(S, M)``: the weight chosen at step i for seed m.
        cosine: ``(S, M, K)`` float64: the cosine of the network's and the blend's scores.
    """

    schedule: WeightSchedule
    candidates: tuple
    choices: np.ndarray
    cosine: np.ndarray

    def denoiser(self, first, second) -> BlendDenoiser:
        """The blend of ``first`` and ``second`` with the calibrated weights."""
        return BlendDenoiser(first, second, self.schedule)

    def to_json(self, path: str, **info) -> None:
        """The schedule (readable by ``WeightSchedule.from_json``) plus the per-seed choices and cosines."""
        write_json(path, {"times": list(map(float, self.schedule.times)),
                          "weights": list(map(float, self.schedule.weights)),
                          "candidates": list(map(float, self.candidates)), "choices": self.choices.tolist(),
                          "cosine": np.round(self.cosine, 6).tolist(), **info})


def calibrate_blend(network, first, second, x1: torch.Tensor, labels=None, *,
                    candidates: Optional[Sequence[float]] = None, grid: Optional[Sequence[float]] = None,
                    steps: int = 20, state: Optional[str] = None, run_id: str = "", progress: bool = True,
                    device=None, median: str = "rounded") -> BlendCalibration:
    """Calibrate the weight of ``first`` in a blend with ``second`` against ``network``, step by step.

    Args:
        network: an eps network module ``net(t, x, labels)`` (run on the denoisers' noise schedule) or a
            :class:`NetworkDenoiser` on the same schedule as the denoisers (a ValueError otherwise).
        first, second: the denoisers to blend (:class:`MachineDenoiser` with its parameter or schedule, ...).
        x1: the noise seeds, a ``(M, C, H, W)`` float torch tensor.
        labels: ``(M,)`` integer class labels for a conditional network and denoisers; None: unconditional.
        candidates: the weights to try, numbers in ``[0, 1]`` (at most 101); None (default): 0, 0.1, ..., 1.
        grid, steps: the time grid, as for :func:`patchmosaic.calibrate` (default: 20 uniform steps).
        state: an npz file saved after every step and resumed from (tied to the network, both denoisers, the
            candidates, grid, seeds, labels and ``run_id``); None: nothing saved.
        run_id: a string that goes into the state's fingerprint.
        progress: a progress bar on stderr.
        device: where the trajectories run; None: the device of ``x1``.
        median: ``"rounded"`` (default) or ``"lower"``, as for :func:`patchmosaic.calibrate`.

    Returns:
        a :class:`BlendCalibration`.
    """
    check_cuda_inputs(x1=x1, labels=labels, device=device)
    check_median(median)
    probe = BlendDenoiser(first, second, 1.0)  # checks both denoisers and their common schedule
    net = network if isinstance(network, NetworkDenoiser) else NetworkDenoiser(network, probe.schedule)
    common_schedule({"network": net, "blend": probe})
    if not torch.is_tensor(x1) or x1.ndim != 4 or not x1.dtype.is_floating_point:
        raise ValueError(f"x1 must be a (M, C, H, W) float tensor of seeds, got "
                         f"{getattr(x1, 'dtype', type(x1).__name__)} of shape {tuple(getattr(x1, 'shape', ()))}")
    if candidates is None:
        candidates = DEFAULT_WEIGHTS
    elif isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__len__") or not 0 < len(candidates) <= 101:
        raise ValueError(f"candidates must be a sequence of 1 to 101 weights in [0, 1], got {candidates!r}")
    candidates = tuple(check_weight(w) for w in candidates)
    g = check_grid(grid, steps)
    dev = x1.device if device is None else torch.device(device)
    x1 = x1.detach().cpu()
    lab = as_labels(labels, x1.shape[0])
    fp = fingerprint(kind="calibrate_blend", run_id=run_id, network=net.describe(), first=full_description(first),
                     second=full_description(second), grid=g.tolist(), candidates=list(candidates), x1=x1.float(),
                     labels=None if lab is None else lab.numpy())

    def x0_of(xd, t, lab_mine):  # each denoiser once per step; the candidates are their mixtures
        u = first(xd, t, lab_mine) if any(w > 0 for w in candidates) else 0.0
        v = second(xd, t, lab_mine) if any(w < 1 for w in candidates) else 0.0
        return [w * u + (1.0 - w) * v for w in candidates]

    cos = trajectory_cosines(net, probe.schedule, x1, lab, candidates, x0_of, grid=g, state=state, fp=fp,
                             layout=None, progress=progress, device=dev, desc="calibrate blend")
    choices, times, values = per_step_choices(cos, candidates, g, median)
    schedule = WeightSchedule(times, tuple(float(v) for v in values))
    return BlendCalibration(schedule, candidates, choices, cos)
