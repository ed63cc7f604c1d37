"""When to switch a reverse process to the patch index: the latest time whose index steps keep the
samples within a target correlation of the exact machine's, measured on calibration seeds."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..diffusion.denoisers import IndexedDenoiser, MachineDenoiser
from ..diffusion.samplers import ddim, time_grid, update
from ..index import PatchIndex
from ..index.patch_index import INDEX_OPTION_ARGS
from ..machines.base import docstring
from ..metrics import pearson_r
from ..ops.checks import check_cuda_inputs


@docstring("""The largest switch time ``t_s <= t_max`` of the ``steps``-step DDIM grid such that running the
    patch index at every ``t <= t_s`` (exact above) keeps every calibration sample's Pearson r with the
    exact engine's sample at least ``target_r``; 0.0 when no switch time does.

    Switch times are tried from the latest (fewest index steps) upwards and the search stops at the first
    one that fails. The index runs as an :class:`IndexedDenoiser` in ``"measured"`` mode; use the result as
    that denoiser's ``t_max``.

    Args:
        machine: a local machine (:class:`LS` or :class:`ELS`).
        k: an odd patch size or a :class:`KSchedule` (one k per step), as the sampler will use it.
        x1: calibration noise ``(B, C, H, W)``, numpy or a CPU torch tensor (run in float32); use other seeds
            than the ones you evaluate on.
        labels: ``(B,)`` integer class labels (numpy, a CPU torch tensor or a list) for a machine built with
            labels; None (default): unconditional.
        target_r: the smallest Pearson r with the exact sample that every calibration sample must keep
            (default 0.999).
        steps: steps of the DDIM grid ``t_i = i / steps`` (a positive integer, default 20).
        t_max: the latest switch time considered, in ``[0, 1]`` (default 0.5).
        m: nearest keys per pixel the index retrieves (default 64).
        states: the exact trajectory ``[x_1, x_t1, ..., x_0]`` (``steps + 1`` CPU tensors ``(B, C, H, W)``: the
            ``x_t`` that a :func:`ddim` callback sees, then the final sample) if already computed; None
            (default): it is run here.
        indexes: patch indexes already built for this machine and canvas, ``{k: PatchIndex}``, used instead of
            building them; None (default): built as needed.
        progress: progress bars while indexes are built (default False).
""" + INDEX_OPTION_ARGS + """
    Returns:
        ``(t_s, report)``: the switch time (a float, 0.0 when none passes) and one report row per switch time
        tried, a dict with ``t_switch``, ``index_steps``, ``r_min`` and ``r_median``.
    """)
def calibrate_t_max(machine, k, x1, labels=None, *, target_r: float = 0.999, steps: int = 20, t_max: float = 0.5,
                    m: int = 64, states: Optional[List[torch.Tensor]] = None, indexes: Optional[Dict[int, PatchIndex]] = None,
                    progress: bool = False, kind: Optional[str] = None, nlist: Optional[int] = None,
                    nprobe: Optional[int] = None, pq_m: Optional[int] = None, flat_budget: Optional[int] = None,
                    min_index_keys: Optional[int] = None, merge: Optional[bool] = None) -> Tuple[float, List[dict]]:
    check_cuda_inputs(x1=x1, labels=labels, **{f"states[{i}]": s for i, s in enumerate(states or ())})
    for name, v, lo, hi in (("target_r", target_r, -1.0, 1.0), ("t_max", t_max, 0.0, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not lo <= v <= hi:
            raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    grid = time_grid(steps)
    # the index's settings (m, kind, ...) checked before the exact trajectory is sampled
    pol = IndexedDenoiser(machine, k, m=m, t_max=1.0, mode="measured", progress=progress, kind=kind, nlist=nlist,
                          nprobe=nprobe, pq_m=pq_m, flat_budget=flat_budget, min_index_keys=min_index_keys,
                          merge=merge)
    if states is None:
        states = []
        final = ddim(MachineDenoiser(machine, k), torch.as_tensor(x1).float(), labels, steps=steps,
                     schedule=machine.schedule, callback=lambda i, t, x, x0: states.append(x.clone()), progress=False)
        states.append(final)
    if len(states) != steps + 1:
        raise ValueError(f"states must hold the {steps + 1} states of the exact trajectory, got {len(states)}")
    if indexes:
        pol.indexes.update(indexes)
    report, best = [], 0.0
    for i in [i for i in range(steps - 1, -1, -1) if grid[i] <= t_max]:
        x = states[i].clone()
        for j in range(i, steps):
            t, t1 = float(grid[j]), float(grid[j + 1])
            x = update(machine.schedule, x, pol(x, t, labels), t, t1)
        r = pearson_r(states[-1], x)
        report.append({"t_switch": float(grid[i]), "index_steps": steps - i, "r_min": float(np.min(r)),
                       "r_median": float(np.median(r))})
        if float(np.min(r)) < target_r:
            break
        best = float(grid[i])
    return best, report
