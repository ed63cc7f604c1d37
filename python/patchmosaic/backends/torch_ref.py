"""The plain PyTorch implementation, written straight from spec section 2.

It is the oracle of the test suite in float64, and runs on any torch device (so it is also the
baseline on a GPU). It streams over chunks of keys with an online softmax, so its memory stays
bounded by ``_BUDGET`` elements per temporary, but it makes no other effort to be fast.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..keysets import CIRCULAR

_BUDGET = 1 << 22  # elements per temporary (logits chunk, patch chunk)
_ROWS = 2048  # query rows per chunk


def patches(images: torch.Tensor, img_idx: torch.Tensor, centres: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """Patches ``(len(centres), C*k*k)`` of ``images[img_idx[i]]`` centred at flat position ``centres[i]``.

    ``pad``: zeros or circular (keysets.ZEROS / keysets.CIRCULAR). Element order: (c, di, dj).
    """
    _, C, Hs, Ws = images.shape
    r = k // 2
    off = torch.arange(-r, r + 1, device=images.device)
    rows = (centres // Ws)[:, None] + off
    cols = (centres % Ws)[:, None] + off
    if pad == CIRCULAR:
        src, rows, cols = images, rows % Hs, cols % Ws
    else:
        src, rows, cols = F.pad(images, (r, r, r, r)), rows + r, cols + r
    ch = torch.arange(C, device=images.device)
    p = src[img_idx[:, None, None, None], ch[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return p.reshape(len(centres), C * k * k)


class OnlineSoftmax:
    """Running max, sum of weights, weighted values and arg-max key of a set of rows."""

    def __init__(self, rows: int, channels: int, like: torch.Tensor):
        self.m = torch.full((rows,), -float("inf"), dtype=like.dtype, device=like.device)
        self.s = torch.zeros(rows, dtype=like.dtype, device=like.device)
        self.acc = torch.zeros(rows, channels, dtype=like.dtype, device=like.device)
        self.best = torch.full((rows,), -1, dtype=torch.int64, device=like.device)

    def update(self, logits: torch.Tensor, values: torch.Tensor, key_ids: torch.Tensor) -> None:
        """Fold in ``logits`` ``(rows, keys)`` of keys with ``values`` ``(keys, channels)``."""
        bm, barg = logits.max(dim=1)
        new_m = torch.maximum(self.m, bm)
        scale = torch.exp(self.m - new_m)  # exp(-inf) = 0 on the first chunk
        w = torch.exp(logits - new_m[:, None])
        self.s = self.s * scale + w.sum(dim=1)
        self.acc = self.acc * scale[:, None] + w @ values
        self.best = torch.where(bm > self.m, key_ids[barg], self.best)
        self.m = new_m

    def result(self):
        return self.acc / self.s[:, None], self.best, 1.0 / self.s


def _row_coefficients(a, inv_2b2, bs, npix, like):
    a_r = torch.as_tensor(np.repeat(a[bs], npix), dtype=like.dtype, device=like.device)
    s_r = torch.as_tensor(np.repeat(inv_2b2[bs], npix), dtype=like.dtype, device=like.device)
    return a_r, s_r


def local(train, query, k, keyset, a, inv_2b2, groups, provenance=False, n_threads=0):
    N, C, H, W = train.shape
    B, _, Hq, Wq = query.shape
    dev = query.device
    d = C * k * k
    out = torch.empty_like(query)
    arg_key = torch.empty((B, Hq, Wq), dtype=torch.int64, device=dev)
    arg_share = torch.empty((B, Hq, Wq), dtype=query.dtype, device=dev)
    for g in range(len(groups.grp_img_ptr) - 1):
        bs = np.nonzero(groups.group_of_b == g)[0]
        if len(bs) == 0:
            continue
        imgs = torch.as_tensor(groups.images(g).astype(np.int64), device=dev)
        for qpix, kpos in keyset.classes():
            npix, npos = len(qpix), len(kpos)
            qpix_t = torch.as_tensor(qpix.astype(np.int64), device=dev)
            kpos_t = torch.as_tensor(kpos.astype(np.int64), device=dev)
            b_idx = torch.as_tensor(np.repeat(bs, npix), device=dev)
            centres = qpix_t.repeat(len(bs))
            a_r, s_r = _row_coefficients(a, inv_2b2, bs, npix, query)
            nkeys = len(imgs) * npos
            for r0 in range(0, len(b_idx), _ROWS):
                r1 = min(len(b_idx), r0 + _ROWS)
                Q = patches(query, b_idx[r0:r1], centres[r0:r1], k, keyset.query_pad)
                qn = (Q * Q).sum(1)
                ar, sr = a_r[r0:r1, None], s_r[r0:r1, None]
                state = OnlineSoftmax(r1 - r0, C, query)
                kc = max(1, _BUDGET // max(d, r1 - r0))
                for k0 in range(0, nkeys, kc):
                    kk = torch.arange(k0, min(nkeys, k0 + kc), device=dev)
                    n, pos = imgs[kk // npos], kpos_t[kk % npos]
                    K = patches(train, n, pos, k, keyset.key_pad)
                    dist2 = qn[:, None] - 2 * ar * (Q @ K.T) + ar * ar * (K * K).sum(1)[None, :]
                    V = train[n[:, None], torch.arange(C, device=dev)[None, :], (pos // W)[:, None], (pos % W)[:, None]]
                    state.update(-dist2 * sr, V, n * (H * W) + pos)
                x0, best, share = state.result()
                rows_b, rows_p = b_idx[r0:r1], centres[r0:r1]
                out[rows_b, :, rows_p // Wq, rows_p % Wq] = x0
                arg_key[rows_b, rows_p // Wq, rows_p % Wq] = best
                arg_share[rows_b, rows_p // Wq, rows_p % Wq] = share
    return out, (arg_key if provenance else None), (arg_share if provenance else None)


def ideal(train, query, a, inv_2b2, groups, provenance=False, n_threads=0):
    N = train.shape[0]
    B = query.shape[0]
    dev = query.device
    flat_train = train.reshape(N, -1)
    D = flat_train.shape[1]
    out = torch.empty_like(query).reshape(B, D)
    arg_key = torch.empty(B, dtype=torch.int64, device=dev)
    arg_share = torch.empty(B, dtype=query.dtype, device=dev)
    chunk = max(1, _BUDGET // D)
    for b in range(B):
        imgs = torch.as_tensor(groups.images(int(groups.group_of_b[b])).astype(np.int64), device=dev)
        x = query[b].reshape(1, D)
        state = OnlineSoftmax(1, D, query)
        for i0 in range(0, len(imgs), chunk):
            n = imgs[i0 : i0 + chunk]
            phi = flat_train[n]
            dist2 = ((x - float(a[b]) * phi) ** 2).sum(1)  # direct differences: no cancellation
            state.update((-dist2 * float(inv_2b2[b]))[None, :], phi, n)
        x0, best, share = state.result()
        out[b], arg_key[b], arg_share[b] = x0[0], best[0], share[0]
    out = out.reshape(query.shape)
    return out, (arg_key if provenance else None), (arg_share if provenance else None)
