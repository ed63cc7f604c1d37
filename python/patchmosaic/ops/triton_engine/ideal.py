"""IS on the Triton engine (float32): the logits by a Triton kernel (direct differences, float64 distances), the
softmax and the weighted mean of the training images in float64 with torch, in chunks of images. IS is a small
part of any run (one key per training image); this keeps it exact rather than fast."""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 4096  # training images per float64 product


def ideal_forward(train, query, a, inv_2b2, groups, provenance: bool = False, n_threads: int = 0,
                  interpreted: bool = False):
    """``(out, stats (B, 2), arg_key (B,), arg_share (B,))`` of IS (engines.ideal_forward's contract).

    ``stats[:, 0]`` is the largest logit ``-s |x - a phi|^2`` (every engine's IS convention)."""
    from . import kernels
    from .local import _dev, _launch_context, triton_cdiv

    B = query.shape[0]
    N = train.shape[0]
    dev = query.device
    D = int(query[0].numel())
    flat_q = query.reshape(B, D).contiguous()
    flat_t = train.reshape(N, D).contiguous()
    gob = np.asarray(groups.group_of_b)
    gptr, gimg = np.asarray(groups.grp_img_ptr), np.asarray(groups.grp_img, np.int32)
    order = np.argsort(gob, kind="stable").astype(np.int32)  # rows: query images grouped by their image group
    bm, bn, bd = 16, 32, 32
    items, n_cols = [], 1
    r = 0
    for g in np.unique(gob):
        nb = int(np.sum(gob == g))
        n_img = int(gptr[g + 1] - gptr[g])
        n_cols = max(n_cols, n_img)
        for t0 in range(0, nb, bm):
            items.append((r + t0, min(bm, nb - t0), gptr[g], n_img))
        r += nb
    items = np.asarray(items, np.int64).reshape(-1, 4)
    logits = torch.full((B, n_cols), float("-inf"), dtype=torch.float64, device=dev)
    with _launch_context(dev):
        kernels.ideal_logits_kernel[(len(items), triton_cdiv(n_cols, bn))](
            flat_t, flat_q, _dev(order, dev), a.to(torch.float32).contiguous(), inv_2b2.double().contiguous(),
            _dev(items, dev), _dev(gimg, dev), logits, D, n_cols, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    out = torch.empty_like(query).reshape(B, D)
    stats = torch.zeros((B, 2), dtype=torch.float64, device=dev)
    key = torch.empty(B, dtype=torch.int64, device=dev) if provenance else query.new_empty((0,), dtype=torch.int64)
    share = torch.empty(B, dtype=query.dtype, device=dev) if provenance else query.new_empty((0,))
    r = 0
    for g in np.unique(gob):
        bs = order[r : r + int(np.sum(gob == g))]
        n_img = int(gptr[g + 1] - gptr[g])
        L = logits[r : r + len(bs), :n_img]
        m, arg = L.max(dim=1)
        w = torch.exp(L - m[:, None])
        s = w.sum(dim=1)
        imgs = torch.from_numpy(gimg[gptr[g] : gptr[g + 1]].astype(np.int64)).to(dev)
        acc = torch.zeros((len(bs), D), dtype=torch.float64, device=dev)
        for i0 in range(0, n_img, CHUNK):
            acc += w[:, i0 : i0 + CHUNK] @ flat_t[imgs[i0 : i0 + CHUNK]].double()
        b = torch.from_numpy(bs.astype(np.int64)).to(dev)
        out[b] = (acc / s[:, None]).to(query.dtype)
        stats[b] = torch.stack([m, s], dim=1)
        if provenance:
            key[b] = imgs[arg]
            share[b] = (1.0 / s).to(query.dtype)
        r += len(bs)
    return out.reshape(query.shape), stats, key, share
