"""When to switch a reverse process to the patch index: the latest time whose index steps keep the
samples within a target correlation of the exact machine's, measured on calibration seeds."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..diffusion.denoisers import IndexedDenoiser, MachineDenoiser
from ..diffusion.samplers import ddim, time_grid, update
from ..index import PatchIndex
from ..metrics import pearson_r


def calibrate_t_max(machine, k, x1, labels=None, *, target_r: float = 0.999, steps: int = 20, t_max: float = 0.5,
                    m: int = 64, states: Optional[List[torch.Tensor]] = None, indexes: Optional[Dict[int, PatchIndex]] = None,
                    progress: bool = False, **index_kw) -> Tuple[float, List[dict]]:
    """The largest switch time ``t_s <= t_max`` of the ``steps``-step DDIM grid such that running the
    patch index at every ``t <= t_s`` (exact above) keeps every calibration sample's Pearson r with the
    exact engine's sample at least ``target_r``; 0.0 when no switch time does.

    ``x1``: calibration noise ``(B, C, H, W)`` (use other seeds than the ones you evaluate on).
    ``states``: the exact trajectory ``[x_1, x_t1, ..., x_0]`` if already computed (else it is run
    here). Switch times are tried from the latest (fewest index steps) upwards and the search stops at
    the first one that fails. Returns ``(t_s, report)``, one report row per switch time tried.
    """
    grid = time_grid(steps)
    if states is None:
        states = []
        final = ddim(MachineDenoiser(machine, k), torch.as_tensor(x1).float(), labels, steps=steps,
                     schedule=machine.schedule, callback=lambda i, t, x, x0: states.append(x.clone()), progress=False)
        states.append(final)
    if len(states) != steps + 1:
        raise ValueError(f"states must hold the {steps + 1} states of the exact trajectory, got {len(states)}")
    pol = IndexedDenoiser(machine, k, m=m, t_max=1.0, mode="measured", progress=progress, **index_kw)
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
