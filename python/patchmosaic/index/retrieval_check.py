"""A cheap check of the one assumption behind an inverted-file index's error bound: that retrieval found the
pixel's nearest keys.

The bound of index/bound.py is exact for a flat (exhaustive) index. An IVF index probes only ``nprobe`` of
its lists, and where nearer keys sit in lists it did not probe, the bound is wrong by any amount (e.g. a
query of pure noise: keys scatter over every list). :func:`check_retrieval` computes a random sample of the
query's pixels exactly with the machine (``denoise(..., pixels=mask)``, a fraction of one exact call) and
compares: a pixel whose exact error is above its bound (beyond float32 rounding) means retrieval failed,
and the result says so (``bound_valid = False``) with a :class:`RetrievalWarning`. A passed check makes
failures elsewhere unlikely, not impossible: with ``n`` checked pixels, a failure rate ``f`` escapes
detection with probability ``(1 - f)^n`` (64 pixels: below 1.2% for ``f = 0.07``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class RetrievalWarning(UserWarning):
    """An inverted-file index missed keys nearer than those it retrieved: its error bound does not hold."""


# exact and indexed outputs are both float32 sums in different orders: allow this much (times the data range)
ROUNDING = 1e-4


def check_retrieval(index, x: torch.Tensor, t, labels, res, n_pixels: int, seed: int = 0) -> None:
    """Fill ``res``'s retrieval fields (``ApproxResult``): ``n_pixels`` random pixels of the float32 CPU
    query ``x`` computed exactly by ``index.machine`` and compared with ``res.x0`` and ``res.bound``."""
    res.bound_conditional = True
    if n_pixels <= 0:
        res.bound_valid = None
        return
    B, C, Hq, Wq = x.shape
    rng = np.random.default_rng(seed)
    chosen = rng.choice(B * Hq * Wq, size=min(int(n_pixels), B * Hq * Wq), replace=False)
    mask = np.zeros(B * Hq * Wq, bool)
    mask[chosen] = True
    mask = torch.from_numpy(mask.reshape(B, Hq, Wq))
    kw = {} if index.patch_mask is None else {"patch_mask": index.patch_mask}
    exact = index.machine.denoise(x, t, index.k, labels=labels, backend="cpu", pixels=mask, **kw)
    err = (exact - res.x0.to(exact.device, exact.dtype)).abs().amax(dim=1)[mask]
    bound = res.bound.to(err.dtype)[mask]
    value_range = max(float(p.value_range) for p in index.parts)
    excess = err - bound - ROUNDING * value_range
    failed = excess > 0
    res.checked_pixels = int(mask.sum())
    res.failed_pixels = int(failed.sum())
    res.worst_excess = float((err - bound).max().clamp_min(0))
    res.bound_valid = res.failed_pixels == 0
    if not res.bound_valid:
        worst = int(torch.argmax(excess))
        warnings.warn(
            f"patch index (kind={index.kind!r}, nprobe={index.nprobe}): the error bound is conditional "
            f"on retrieval and retrieval failed on {res.failed_pixels} of {res.checked_pixels} pixels checked exactly "
            f"(error {float(err[worst]):.3g} where the bound said {float(bound[worst]):.3g}); nearer keys sit in "
            f"lists that were not probed. Raise nprobe or m, use kind='flat', or compute exactly.",
            RetrievalWarning, stacklevel=3)
