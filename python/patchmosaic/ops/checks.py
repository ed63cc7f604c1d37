"""The checks an op makes of its values, once per call, before any work (shapes and types are the
machines' to check, before the op is called; these need the data)."""

from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_memory


def values(x: torch.Tensor, name: str, t: Optional[torch.Tensor], a: torch.Tensor, inv_2b2: torch.Tensor) -> None:
    """Every value of ``x`` finite, ``t`` in (0, 1] (when given as a tensor) and a schedule that leaves noise
    to remove at every t: one reduction, read once (one device sync for CUDA tensors), and the details
    only when something is wrong."""
    ok = torch.isfinite(x).all() & (torch.isfinite(a) & torch.isfinite(inv_2b2) & (inv_2b2 > 0)).all()
    if t is not None:
        ok = ok & (torch.isfinite(t) & (t > 0) & (t <= 1)).all()
    if bool(ok):
        return
    finite(x, name)
    times(t, a, inv_2b2)


def finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values (shape {tuple(x.shape)})")


def times(t: Optional[torch.Tensor], a: torch.Tensor, inv_2b2: torch.Tensor) -> None:
    """``t`` in (0, 1] (when given as a tensor), and a schedule that leaves noise to remove at every t."""
    if t is not None:
        ok = torch.isfinite(t) & (t > 0) & (t <= 1)
        if not bool(ok.all()):
            raise ValueError(f"t must lie in (0, 1], got {float(t[~ok][0])}")
    bad = ~(torch.isfinite(a) & torch.isfinite(inv_2b2) & (inv_2b2 > 0))
    if bool(bad.any()):
        at = "" if t is None else f" at t = {float(t[bad][0])}"
        raise ValueError(f"the schedule gives alpha_bar(t) = 1{at}: no noise to remove")


def memory(nbytes: int, what: str, limit: int) -> None:
    check_memory(int(nbytes), what, None if limit <= 0 else int(limit))


def local_bytes(query: torch.Tensor, train: torch.Tensor, backend: str, provenance: bool) -> int:
    """Working memory of a local-machine call beyond its inputs, from the shapes alone."""
    B, C, Hq, Wq = query.shape
    item = query.element_size()
    pix = B * Hq * Wq
    need = 2 * query.numel() * item + pix * 16  # output (+ a conversion), stats
    if provenance:
        need += pix * (8 + item)
    if train.dtype != query.dtype:
        need += train.numel() * item
    if backend == "cpu":  # the engine's per-row partial softmax states (double)
        need += 2 * pix * (C + 3) * 8
    elif backend == "torch":
        from .reference import BUDGET

        need += 8 * BUDGET * item
    return need
