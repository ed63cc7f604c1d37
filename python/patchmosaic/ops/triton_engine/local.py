"""The local machines (LS, ELS, boundary-aware ELS) on the Triton engine: plan, launch, merge (float32).

Same interface as the compiled engines' ``local_forward`` (engines.py): torch tensors in, ``(out, stats,
arg_key, arg_share)`` out, with ``stats`` in the contract's convention (contract.hpp: the largest shifted logit
``l' = l + s |Q|^2`` and the sum of ``exp(l' - m)``) so that the compiled engines' backward passes read them.
"""

from __future__ import annotations

import numpy as np
import torch

from . import plan as planning
from . import tuning
from .merge import fold

CIRCULAR = planning.CIRCULAR


def _dev(arr: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, copy=True, order="C")).to(device)


def _launch_context(device):
    return torch.cuda.device(device) if device.type == "cuda" else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _query_patches(query, p, elem, dev_elem, d_pad: int, circular: bool, split: bool, interpreted: bool = True):
    """The query patch matrices ``(R, d_pad)`` (hi, lo; ``lo`` is ``hi`` without the split)."""
    from . import kernels

    R = p.n_rows
    dev = query.device
    q_hi = torch.empty((max(R, 1), d_pad), dtype=torch.float32, device=dev)
    q_lo = torch.empty_like(q_hi) if split else q_hi
    block_r, block_d = (64, min(d_pad, 1024)) if interpreted else (32, min(d_pad, 64))
    grid = (triton_cdiv(R, block_r), triton_cdiv(d_pad, block_d))
    ech, edr, edc, esc = dev_elem
    kernels.query_patches_kernel[grid](query, _dev(p.row_b, dev), _dev(p.row_pix, dev), _dev(p.row_elem, dev), q_hi,
                                       q_lo, ech, edr, edc, esc, R, query.shape[1], query.shape[2], query.shape[3],
                                       D_PAD=d_pad, CIRCULAR=circular, SCALED=elem.scale is not None, SPLIT=split,
                                       BLOCK_R=block_r, BLOCK_D=block_d)
    return q_hi, q_lo


def triton_cdiv(a: int, b: int) -> int:
    return max(1, -(-int(a) // int(b)))


def partial_states(train, query, k: int, keyset, a, inv_2b2, groups, provenance: bool, elements, interpreted: bool):
    """Run the kernels of one call: ``(plan, m, s, mean, key)`` per row tile (merge.fold), or None when the call
    has no rows."""
    from . import kernels

    B, C, Hq, Wq = query.shape
    dev = query.device
    n_classes = len(keyset.cls_qpix_ptr) - 1
    elem = planning.elements(int(k), int(C), n_classes, elements)
    qptr = np.asarray(keyset.cls_qpix_ptr)
    largest = int(np.max(np.diff(qptr))) * int(np.bincount(np.asarray(groups.group_of_b)).max()) if n_classes else 0
    bm = tuning.block_m(largest, interpreted)
    bn = tuning.settings.block_n if interpreted else 128
    # keys per item: plan once without a split to count the work, then split it
    kpi = tuning.settings.keys_per_item
    if kpi is None and not interpreted and dev.type == "cuda":
        whole = planning.plan(keyset, groups, B, elem, bm, 1 << 62, 1)
        total = int(np.sum(whole.items[:, 7] - whole.items[:, 6]))
        kpi = tuning.keys_per_item(total, len(whole.tile_row), dev, interpreted)
    elif kpi is None:
        kpi = 1 << 62
    p = planning.plan(keyset, groups, B, elem, bm, kpi, bn if interpreted else 256)
    if p.n_rows == 0:
        return None
    d_pad = tuning.d_pad(elem.max_count, interpreted)
    split = bool(tuning.settings.split)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    dev_elem = (_dev(elem.ch, dev), _dev(elem.dr, dev), _dev(elem.dc, dev),
                dummy_f if elem.scale is None else _dev(elem.scale, dev))
    C_pad = tuning.next_pow2(C)
    n_items = len(p.items)
    with _launch_context(dev):
        q_hi, q_lo = _query_patches(query, p, elem, dev_elem, d_pad, keyset.query_pad == CIRCULAR, split,
                                    interpreted)
        part_m = torch.empty((n_items, bm), dtype=torch.float32, device=dev)
        part_s = torch.empty((n_items, bm), dtype=torch.float64, device=dev)
        part_acc = torch.empty((n_items, bm, C_pad), dtype=torch.float64, device=dev)
        part_key = torch.empty((n_items, bm), dtype=torch.int64, device=dev) if provenance else \
            torch.zeros(1, dtype=torch.int64, device=dev)
        count = bool(tuning.settings.count)
        skipped = torch.zeros((n_items, 2) if count else 1, dtype=torch.int32, device=dev)
        meta = dict(D_PAD=d_pad, C_PAD=C_pad, CIRCULAR=keyset.key_pad == CIRCULAR, SCALED=elem.scale is not None,
                    SPLIT=split, SKIP=bool(tuning.settings.skip), COUNT=count, PROVENANCE=bool(provenance),
                    BLOCK_M=bm)
        kernel, fixed = tuning.local_kernel(interpreted)
        if interpreted:
            meta.update(BLOCK_N=bn, BLOCK_D=min(d_pad, tuning.settings.block_d or d_pad))
        elif fixed is not None:
            fbn, fbd, warps, stages = fixed
            meta.update(BLOCK_N=fbn, BLOCK_D=fbd or min(d_pad, 64), num_warps=warps, num_stages=stages)
        N, _, H, W = train.shape
        kernel[(n_items,)](
            train, q_hi, q_lo, _dev(p.row_b, dev), a.to(torch.float32).contiguous(),
            inv_2b2.to(torch.float32).contiguous(), _dev(p.items, dev), _dev(np.asarray(keyset.cls_kpos, np.int32), dev),
            _dev(np.asarray(groups.grp_img, np.int32), dev), *dev_elem, part_m, part_s, part_acc, part_key, skipped,
            C, H, W, **meta)
        if count:
            tot = skipped.sum(dim=0)
            tuning.last_counts.update(items=n_items, key_tiles=int(tot[1]), skipped=int(tot[0]))
        index = _dev(planning.split_index(p), dev)
        m, s, mean, key = fold(index, part_m, part_s, part_acc[..., :C], part_key if provenance else None)
    return p, m, s, mean, key


def rows_of_tiles(p, bm: int, device):
    """``(tile, lane, row)`` index tensors of every real row: row ``tile_row[t] + lane``."""
    lanes = np.arange(bm)
    ok = lanes[None, :] < p.tile_rows[:, None]
    t, lane = np.nonzero(ok)
    rows = p.tile_row[t] + lane
    return _dev(t, device), _dev(lane, device), _dev(rows, device)


def local_forward(train, query, k: int, keyset, a, inv_2b2, groups, provenance: bool = False, n_threads: int = 0,
                  elements=None, interpreted: bool = False):
    """``(out, stats, arg_key, arg_share)`` of a local machine on float32 tensors (engines.local_forward's
    contract: pixels without a row get 0, key -1, share 0). ``n_threads`` is ignored."""
    B, C, Hq, Wq = query.shape
    dev = query.device
    n_rows_per_image = int(np.asarray(keyset.cls_qpix_ptr)[-1])
    partial = n_rows_per_image < Hq * Wq
    out = torch.zeros_like(query) if partial else torch.empty_like(query)
    stats = torch.zeros((B, Hq, Wq, 2), dtype=torch.float64, device=dev)
    if provenance:
        key = torch.full((B, Hq, Wq), -1, dtype=torch.int64, device=dev)
        share = torch.zeros((B, Hq, Wq), dtype=query.dtype, device=dev)
    else:
        key, share = query.new_empty((0,), dtype=torch.int64), query.new_empty((0,))
    res = partial_states(train, query, k, keyset, a, inv_2b2, groups, provenance, elements, interpreted)
    if res is None:
        return out, stats, key, share
    p, m, s, mean, win = res
    t, lane, rows = rows_of_tiles(p, m.shape[1], dev)
    rb = _dev(p.row_b, dev).long()[rows]
    rp = _dev(p.row_pix, dev).long()[rows]
    out.view(B, C, Hq * Wq)[rb, :, rp] = mean[t, lane].to(query.dtype)
    stats.view(B, Hq * Wq, 2)[rb, rp] = torch.stack([m[t, lane], s[t, lane]], dim=1)
    if provenance:
        key.view(B, Hq * Wq)[rb, rp] = win[t, lane]
        share.view(B, Hq * Wq)[rb, rp] = (1.0 / s[t, lane]).to(query.dtype)
    return out, stats, key, share


def local_forward_multi(train, query, multi, a, inv_2b2, groups, n_threads: int = 0, interpreted: bool = False):
    """``out`` ``(K, B, C, Hq, Wq)``: the local machine at every size of ``multi.ks`` (keysets.MultiKeySet: its
    fields ``ks``, ``keyset`` and ``kmask`` only), one pass of the single-size kernel per size over the classes
    that compute it (a class computes size ``j`` for its pixels when one of its key positions has bit ``j``; its
    keys at that size are those positions). Pixels that no class computes at a size are 0."""
    B, C, Hq, Wq = query.shape
    out = torch.zeros((len(multi.ks), B, C, Hq, Wq), dtype=query.dtype, device=query.device)
    ks = multi.keyset
    qptr, kptr = np.asarray(ks.cls_qpix_ptr), np.asarray(ks.cls_kpos_ptr)
    qpix, kpos, kmask = np.asarray(ks.cls_qpix), np.asarray(ks.cls_kpos), np.asarray(multi.kmask)
    for j, k in enumerate(multi.ks):
        serves = ((kmask >> np.uint32(j)) & np.uint32(1)).astype(bool)
        q_parts, k_parts = [], []
        for c in range(len(qptr) - 1):
            sel = serves[kptr[c] : kptr[c + 1]]
            if sel.any():
                q_parts.append(qpix[qptr[c] : qptr[c + 1]])
                k_parts.append(kpos[kptr[c] : kptr[c + 1]][sel])
        if not q_parts:
            continue
        sized = Classes.of(ks.query_pad, ks.key_pad, q_parts, k_parts)
        out[j] = local_forward(train, query, int(k), sized, a, inv_2b2, groups, False, n_threads, None, interpreted)[0]
    return out


class Classes:
    """A key set's fields (keysets.KeySet's), built here from per-class lists."""

    def __init__(self, query_pad, key_pad, cls_qpix_ptr, cls_qpix, cls_kpos_ptr, cls_kpos):
        self.query_pad, self.key_pad = int(query_pad), int(key_pad)
        self.cls_qpix_ptr, self.cls_qpix = cls_qpix_ptr, cls_qpix
        self.cls_kpos_ptr, self.cls_kpos = cls_kpos_ptr, cls_kpos

    @classmethod
    def of(cls, query_pad, key_pad, q_parts, k_parts):
        qp = np.concatenate([[0], np.cumsum([len(q) for q in q_parts])]).astype(np.int64)
        kp = np.concatenate([[0], np.cumsum([len(k) for k in k_parts])]).astype(np.int64)
        return cls(query_pad, key_pad, qp, np.concatenate(q_parts).astype(np.int32), kp,
                   np.concatenate(k_parts).astype(np.int32))
