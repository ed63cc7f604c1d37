"""The merge of the Triton engine's partial softmax states: the items of one row tile (its key ranges) folded in
key order, as softmax_state.hpp's ``merge_state`` does (float64 weights; a tie keeps the earlier range's key, so the
first key with the largest logit wins, as on every engine)."""

from __future__ import annotations

import torch


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
    valid = index >= 0
    idx = index.clamp(min=0)
    m = torch.where(valid[..., None], part_m[idx].double(), float("-inf"))  # (T, S, BM)
    s = torch.where(valid[..., None], part_s[idx], 0.0)
    M = m.amax(dim=1)  # (T, BM)
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    f = torch.where(s > 0, torch.exp(m - M_safe[:, None, :]), torch.zeros_like(s))
    s_tot = (s * f).sum(dim=1)
    acc = (part_acc[idx] * f[..., None]).sum(dim=1)  # (T, BM, C)
    mean = acc / torch.where(s_tot > 0, s_tot, torch.ones_like(s_tot))[..., None]
    key = None
    if part_key is not None:
        wins = (m == M[:, None, :]) & (s > 0)
        first = wins.to(torch.int8).argmax(dim=1)  # the first range holding the maximum
        key = torch.gather(part_key[idx], 1, first[:, None, :])[:, 0, :]
    return M, s_tot, mean, key
