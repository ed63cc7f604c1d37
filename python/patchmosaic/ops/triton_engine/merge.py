"""The merge of the Triton engine's partial softmax states: the items of one row tile (its key ranges) folded in
key order by the merge every engine's states go through (ops/state.py: float64 weights; a tie keeps the earlier
range's key, so the first key with the largest logit wins, as on every engine)."""

from __future__ import annotations

import torch

from ..state import SoftmaxState, merge


def fold(index: torch.Tensor, part_m: torch.Tensor, part_s: torch.Tensor, part_acc: torch.Tensor, part_key):
    """Merge the partial states of each row tile.

    Args:
        index: int64 ``(n_tiles, S)``: the items of each tile in key order, -1 for none.
        part_m: float32 ``(n_items, BM)``: each item's largest shifted logit per row.
        part_s: float64 ``(n_items, BM)``: its sum of weights relative to ``part_m``.
        part_acc: float64 ``(n_items, BM, C)``: its weighted sum of centres, relative to ``part_m``.
        part_key: int64 ``(n_items, BM)`` winning keys, or None.

    Returns:
        ``(m, s, mean, key)`` per tile and row: float64 ``(n_tiles, BM)``, float64, float64 ``(n_tiles, BM, C)``,
        int64 or None.
    """
    states = []
    for j in range(index.shape[1]):  # the tile's key ranges in key order, as ops/state.py's states
        valid = (index[:, j] >= 0)[:, None]
        idx = index[:, j].clamp(min=0)
        m = torch.where(valid, part_m[idx].double(), float("-inf"))
        sj = torch.where(valid, part_s[idx], torch.zeros_like(part_s[idx]))
        mean = part_acc[idx] / torch.where(sj > 0, sj, torch.ones_like(sj))[..., None]
        states.append(SoftmaxState(m, sj, mean, None if part_key is None else part_key[idx]))
    st = merge(states)
    return st.m, st.s, st.out, st.key
