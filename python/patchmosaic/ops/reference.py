"""The plain PyTorch implementation, written straight from spec section 2.

It is the oracle of the test suite in float64, and runs on any torch device (so it is also the baseline
on a GPU). It streams over chunks of keys with an online softmax, so its memory stays bounded by
``BUDGET`` elements per temporary, but it makes no other effort to be fast. Its online softmax is kept
apart from the compiled engines' (softmax_state.hpp) on purpose: an oracle that shared their code could
not catch a mistake in it. Its backward pass is the derivative of the spec's formula written out plainly
(every key's logit, weight and contribution materialised chunk by chunk; the patch gather's adjoint by
``index_add``); the test suite checks it, and the engines', against finite differences.

Same interface as the compiled engines (engines.py), and their convention of ``stats``: the local machines' hold
the maximum of the shifted logit ``l + |Q|^2 / (2 b^2)`` (contract.hpp) and the sum of ``exp(logit - max)``, IS's
the largest logit ``l`` itself and that sum, in every engine (the partial states of different engines merge).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .tables import CIRCULAR, KeySet
from .labels import Groups

BUDGET = 1 << 22  # elements per temporary (logits chunk, patch chunk)
ROWS = 2048  # query rows per chunk


def patch_index(shape, img_idx: torch.Tensor, centres: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """Flat indices ``(len(centres), C*k*k)`` into the source of :func:`patches` (the images, zero-padded by
    ``k // 2`` on every side for zero padding) of the patches of ``img_idx[i]`` centred at ``centres[i]``."""
    _, C, Hs, Ws = shape
    r = k // 2
    dev = centres.device
    off = torch.arange(-r, r + 1, device=dev)
    rows = (centres // Ws)[:, None] + off
    cols = (centres % Ws)[:, None] + off
    if pad == CIRCULAR:
        rows, cols, Hp, Wp = rows % Hs, cols % Ws, Hs, Ws
    else:
        rows, cols, Hp, Wp = rows + r, cols + r, Hs + 2 * r, Ws + 2 * r
    ch = torch.arange(C, device=dev)
    idx = ((img_idx[:, None, None, None] * C + ch[None, :, None, None]) * Hp + rows[:, None, :, None]) * Wp \
        + cols[:, None, None, :]
    return idx.reshape(len(centres), C * k * k)


def _source(images: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    r = k // 2
    return images if pad == CIRCULAR else F.pad(images, (r, r, r, r))


def patches(images: torch.Tensor, img_idx: torch.Tensor, centres: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """Patches ``(len(centres), C*k*k)`` of ``images[img_idx[i]]`` centred at flat position ``centres[i]``.

    ``pad``: zeros or circular (tables.ZEROS / tables.CIRCULAR). Element order: (c, di, dj).
    """
    return _source(images, k, pad).reshape(-1)[patch_index(images.shape, img_idx, centres, k, pad)]


def unpatch(grad: torch.Tensor, shape, img_idx: torch.Tensor, centres: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """The adjoint of :func:`patches`: ``grad`` ``(len(centres), C*k*k)`` added back onto images of ``shape``."""
    N, C, Hs, Ws = shape
    r = k // 2
    Hp, Wp = (Hs, Ws) if pad == CIRCULAR else (Hs + 2 * r, Ws + 2 * r)
    src = torch.zeros(N * C * Hp * Wp, dtype=grad.dtype, device=grad.device)
    src.index_add_(0, patch_index(shape, img_idx, centres, k, pad).reshape(-1), grad.reshape(-1))
    src = src.reshape(N, C, Hp, Wp)
    return src if pad == CIRCULAR else src[:, :, r : r + Hs, r : r + Ws]


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


def _rows(v: torch.Tensor, bs: np.ndarray, npix: int, like: torch.Tensor) -> torch.Tensor:
    """Per-image values ``v[b]`` repeated for the ``npix`` rows of each listed image."""
    return v[torch.as_tensor(np.repeat(bs, npix), device=v.device)].to(like.dtype)


class _RowBlock:
    """One block of query rows of one image group and key class (see :func:`_row_blocks`)."""

    __slots__ = ("rb", "rp", "wc", "Q", "Qw", "qn", "rows", "keys")


def _row_blocks(train, query, k, keyset: KeySet, groups: Groups, weights, *per_image):
    """Every block of at most ``ROWS`` query rows, per image group and key class: its images ``rb`` and pixels
    ``rp``, the class's element weights ``wc``, the query patches ``Q`` (``Qw`` weighted, ``qn = <Q, Qw>``), the
    per-image values of ``per_image`` as ``(rows, 1)`` columns, and ``keys``: the class's key blocks, each
    ``(n, pos, K, Kw, V)`` (image, key position, patch, weighted patch, centre), within ``BUDGET`` elements."""
    N, C, H, W = train.shape
    dev = query.device
    d = C * k * k
    for g in range(len(groups.grp_img_ptr) - 1):
        bs = np.nonzero(groups.group_of_b == g)[0]
        if len(bs) == 0:
            continue
        imgs = torch.as_tensor(groups.images(g).astype(np.int64), device=dev)
        for cls, (qpix, kpos) in enumerate(keyset.classes()):
            wc = weights[cls] if isinstance(weights, list) else weights
            npix, npos = len(qpix), len(kpos)
            kpos_t = torch.as_tensor(kpos.astype(np.int64), device=dev)
            b_idx = torch.as_tensor(np.repeat(bs, npix), device=dev)
            centres = torch.as_tensor(qpix.astype(np.int64), device=dev).repeat(len(bs))
            columns = [_rows(v, bs, npix, query) for v in per_image]
            for r0 in range(0, len(b_idx), ROWS):
                r1 = min(len(b_idx), r0 + ROWS)
                blk = _RowBlock()
                blk.rb, blk.rp, blk.wc = b_idx[r0:r1], centres[r0:r1], wc
                blk.Q = patches(query, blk.rb, blk.rp, k, keyset.query_pad)
                blk.Qw = blk.Q if wc is None else blk.Q * wc
                blk.qn = (blk.Q * blk.Qw).sum(1)
                blk.rows = [c[r0:r1, None] for c in columns]
                blk.keys = _key_blocks(train, k, keyset.key_pad, imgs, kpos_t, wc, max(1, BUDGET // max(d, r1 - r0)))
                yield blk


def _key_blocks(train, k, pad, imgs, kpos_t, wc, chunk):
    C, W = train.shape[1], train.shape[3]
    npos = len(kpos_t)
    nkeys = len(imgs) * npos
    ch = torch.arange(C, device=imgs.device)[None, :]
    for k0 in range(0, nkeys, chunk):
        kk = torch.arange(k0, min(nkeys, k0 + chunk), device=imgs.device)
        n, pos = imgs[kk // npos], kpos_t[kk % npos]
        K = patches(train, n, pos, k, pad)
        V = train[n[:, None], ch, (pos // W)[:, None], (pos % W)[:, None]]
        yield n, pos, K, (K if wc is None else K * wc), V


def local_forward(train, query, k, keyset: KeySet, a, inv_2b2, groups: Groups, provenance=False, n_threads=0,
                  weights=None):
    """(out, stats, arg_key, arg_share) of a local machine. ``weights``: a masked neighbourhood as the weight of
    every patch element ``(C k^2,)`` (masks.element_weights; the distance is ``sum_e w_e (Q_e - a K_e)^2``), a
    list of them (one per class of ``keyset``), or None for the square patch."""
    _, C, H, W = train.shape
    B, _, Hq, Wq = query.shape
    dev = query.device
    partial = keyset.n_rows_per_image < Hq * Wq
    out = torch.zeros_like(query) if partial else torch.empty_like(query)
    stats = torch.zeros((B, Hq, Wq, 2), dtype=torch.float64, device=dev)
    arg_key = torch.full((B, Hq, Wq), -1, dtype=torch.int64, device=dev)
    arg_share = torch.zeros((B, Hq, Wq), dtype=query.dtype, device=dev)
    for blk in _row_blocks(train, query, k, keyset, groups, weights, a, inv_2b2):
        ar, sr = blk.rows
        state = OnlineSoftmax(len(blk.rb), C, query)
        for n, pos, K, Kw, V in blk.keys:
            dist2 = blk.qn[:, None] - 2 * ar * (blk.Qw @ K.T) + ar * ar * (K * Kw).sum(1)[None, :]
            state.update(-dist2 * sr, V, n * (H * W) + pos)
        x0, best, share = state.result()
        rows_b, rows_p = blk.rb, blk.rp
        out[rows_b, :, rows_p // Wq, rows_p % Wq] = x0
        arg_key[rows_b, rows_p // Wq, rows_p % Wq] = best
        arg_share[rows_b, rows_p // Wq, rows_p % Wq] = share
        st = torch.stack([(state.m + sr[:, 0] * blk.qn).double(), state.s.double()], 1)
        stats[rows_b, rows_p // Wq, rows_p % Wq] = st.detach()
    if not provenance:
        arg_key, arg_share = query.new_empty((0,), dtype=torch.int64), query.new_empty((0,))
    return out, stats, arg_key, arg_share


def ideal_forward(train, query, a, inv_2b2, groups: Groups, provenance=False, n_threads=0):
    N = train.shape[0]
    B = query.shape[0]
    dev = query.device
    flat_train = train.reshape(N, -1)
    D = flat_train.shape[1]
    out = torch.empty_like(query).reshape(B, D)
    stats = torch.zeros((B, 2), dtype=torch.float64, device=dev)
    arg_key = torch.empty(B, dtype=torch.int64, device=dev)
    arg_share = torch.empty(B, dtype=query.dtype, device=dev)
    chunk = max(1, BUDGET // D)
    for b in range(B):
        imgs = torch.as_tensor(groups.images(int(groups.group_of_b[b])).astype(np.int64), device=dev)
        x = query[b].reshape(1, D)
        ab, sb = a[b].to(query.dtype), inv_2b2[b].to(query.dtype)
        state = OnlineSoftmax(1, D, query)
        for i0 in range(0, len(imgs), chunk):
            n = imgs[i0 : i0 + chunk]
            phi = flat_train[n]
            dist2 = ((x - ab * phi) ** 2).sum(1)  # direct differences: no cancellation
            state.update((-dist2 * sb)[None, :], phi, n)
        x0, best, share = state.result()
        out[b], arg_key[b], arg_share[b] = x0[0], best[0], share[0]
        stats[b] = torch.stack([state.m[0].double(), state.s[0].double()]).detach()  # (the largest logit itself)
    out = out.reshape(query.shape)
    if not provenance:
        arg_key, arg_share = query.new_empty((0,), dtype=torch.int64), query.new_empty((0,))
    return out, stats, arg_key, arg_share


def _weights(logits: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.exp(logits - m[:, None]) / s[:, None]


def local_backward(grad_out, out, stats, train, query, k, keyset: KeySet, a, inv_2b2, groups: Groups, n_threads=0,
                   weights=None):
    """(grad_query, grad_a, grad_inv_2b2): per row, with weights w, centres V, delta = <g, V - out>,
    d/dQ = 2 s sum w delta (a K - Q), d/da = 2 s sum w delta <Q - a K, K>, d/ds = -sum w delta |Q - a K|^2.
    ``weights``: a masked neighbourhood's element weights u (as for :func:`local_forward`): every product then
    carries them (d/dQ = 2 s sum w delta u (a K - Q), <., .>_u, |.|^2_u)."""
    B, Wq = query.shape[0], query.shape[3]
    dev, dt = query.device, query.dtype
    grad_query = torch.zeros_like(query)
    grad_a = torch.zeros(B, dtype=torch.float64, device=dev)
    grad_s = torch.zeros(B, dtype=torch.float64, device=dev)
    for blk in _row_blocks(train, query, k, keyset, groups, weights, a, inv_2b2):
        ar, sr = blk.rows
        rb, rp, Q, Qw, qn = blk.rb, blk.rp, blk.Q, blk.Qw, blk.qn
        gr = grad_out[rb, :, rp // Wq, rp % Wq]  # (rows, C)
        Dr = (gr * out[rb, :, rp // Wq, rp % Wq]).sum(1, keepdim=True)
        st = stats[rb, rp // Wq, rp % Wq]
        m = st[:, 0].to(dt) - sr[:, 0] * qn  # the maximum of the true logits
        S = st[:, 1].to(dt)
        G = torch.zeros_like(Q)
        ga = torch.zeros(len(rb), dtype=dt, device=dev)
        gs = torch.zeros(len(rb), dtype=dt, device=dev)
        for _, _, K, Kw, V in blk.keys:
            QK = Qw @ K.T
            kn = (K * Kw).sum(1)[None, :]
            dist2 = qn[:, None] - 2 * ar * QK + ar * ar * kn
            p = _weights(-dist2 * sr, m, S) * (gr @ V.T - Dr)
            G += ar * (p @ Kw) - Qw * p.sum(1, keepdim=True)
            ga += (2 * sr[:, 0]) * (p * (QK - ar * kn)).sum(1)
            gs -= (p * dist2).sum(1)
        grad_query += unpatch(2 * sr * G, query.shape, rb, rp, k, keyset.query_pad)
        grad_a.index_add_(0, rb, ga.double())
        grad_s.index_add_(0, rb, gs.double())
    return grad_query, grad_a, grad_s


def ideal_backward(grad_out, out, stats, train, query, a, inv_2b2, groups: Groups, n_threads=0):
    """(grad_query, grad_a, grad_inv_2b2) of the IS machine (the local formula with whole images)."""
    N = train.shape[0]
    B = query.shape[0]
    dt = query.dtype
    flat_train = train.reshape(N, -1)
    D = flat_train.shape[1]
    grad_query = torch.zeros(B, D, dtype=dt, device=query.device)
    grad_a = torch.zeros(B, dtype=torch.float64, device=query.device)
    grad_s = torch.zeros(B, dtype=torch.float64, device=query.device)
    chunk = max(1, BUDGET // D)
    for b in range(B):
        imgs = torch.as_tensor(groups.images(int(groups.group_of_b[b])).astype(np.int64), device=query.device)
        x, g, o = query[b].reshape(1, D), grad_out[b].reshape(1, D), out[b].reshape(1, D)
        ab, sb = a[b].to(dt), inv_2b2[b].to(dt)
        m = stats[b, 0].to(dt)
        S = stats[b, 1].to(dt)
        Db = (g * o).sum()
        for i0 in range(0, len(imgs), chunk):
            phi = flat_train[imgs[i0 : i0 + chunk]]
            dist2 = ((x - ab * phi) ** 2).sum(1)
            p = torch.exp(-dist2 * sb - m) / S * ((phi @ g[0]) - Db)
            grad_query[b] += 2 * sb * (ab * (p @ phi) - x[0] * p.sum())
            grad_a[b] += (2 * sb * (p * ((phi @ x[0]) - ab * (phi * phi).sum(1))).sum()).double()
            grad_s[b] -= (p * dist2).sum().double()
    return grad_query.reshape(query.shape), grad_a, grad_s


# --------------------------------------------------------------------------------------- forward mode
# The Jacobian-vector products of the forward passes, in plain torch on any device (every engine's forward-mode
# derivative: the compiled engines have no JVP kernel). A row's output is a softmax average, so with the
# tangent dl_q of each key's logit its tangent is sum_q w_q (V_q - out) dl_q. Each row's weights are recomputed
# with an online softmax of its own (the pass reads neither the forward's statistics nor its output), over the
# same chunks of keys as the backward pass; the tangent of a logit, l = -s |Q - a K|^2_u, is
# dl = -ds |Q - a K|^2_u - 2 s <Q - a K, dQ - da K>_u, of which the parts the same for every key of the row
# (-ds |Q|^2_u - 2 s <Q, dQ>_u) are left out: they add nothing to the average's tangent, and only rounding.

class _OnlineTangent:
    """Running max, sum of weights, weighted values, and the same with every weight times its logit's tangent,
    of a set of rows: the average ``A / S`` and its tangent ``(PV - A P / S) / S``."""

    def __init__(self, rows: int, channels: int, like: torch.Tensor):
        self.m = torch.full((rows,), -float("inf"), dtype=like.dtype, device=like.device)
        self.s = torch.zeros(rows, dtype=like.dtype, device=like.device)
        self.p = torch.zeros(rows, dtype=like.dtype, device=like.device)
        self.acc = torch.zeros(rows, channels, dtype=like.dtype, device=like.device)
        self.pacc = torch.zeros(rows, channels, dtype=like.dtype, device=like.device)

    def update(self, logits: torch.Tensor, tangents: torch.Tensor, values: torch.Tensor) -> None:
        """Fold in ``logits`` and their ``tangents`` ``(rows, keys)`` of keys with ``values`` ``(keys, channels)``."""
        new_m = torch.maximum(self.m, logits.max(dim=1).values)
        scale = torch.exp(self.m - new_m)
        w = torch.exp(logits - new_m[:, None])
        wd = w * tangents
        self.s = self.s * scale + w.sum(1)
        self.p = self.p * scale + wd.sum(1)
        self.acc = self.acc * scale[:, None] + w @ values
        self.pacc = self.pacc * scale[:, None] + wd @ values
        self.m = new_m

    def tangent(self) -> torch.Tensor:
        out = self.acc / self.s[:, None]
        return self.pacc / self.s[:, None] - (self.p / self.s)[:, None] * out


def _tangent_or_zero(t, like: torch.Tensor, dtype=None) -> torch.Tensor:
    if t is None:
        return torch.zeros_like(like, dtype=dtype or like.dtype)
    return t.to(device=like.device, dtype=dtype or like.dtype)


def local_jvp(train, query, k, keyset: KeySet, a, inv_2b2, groups: Groups, tangent_query, tangent_a, tangent_s,
              weights=None):
    """The tangent of :func:`local_forward`'s ``out`` for the tangents of the query ``(B, C, Hq, Wq)``, of ``a``
    and of ``inv_2b2`` ``(B,)`` (None: zero). ``weights``: as for :func:`local_forward`. Pixels without a row
    (class -1) have tangent 0, as their output is 0."""
    C, Wq = train.shape[1], query.shape[3]
    dq = _tangent_or_zero(tangent_query, query)
    da, ds = _tangent_or_zero(tangent_a, a, a.dtype), _tangent_or_zero(tangent_s, inv_2b2, inv_2b2.dtype)
    dout = torch.zeros_like(query)
    for blk in _row_blocks(train, query, k, keyset, groups, weights, a, inv_2b2, da, ds):
        ar, sr, dar, dsr = blk.rows
        rb, rp, Qw, qn, wc = blk.rb, blk.rp, blk.Qw, blk.qn, blk.wc
        dQ = patches(dq, rb, rp, k, keyset.query_pad)
        dQw = dQ if wc is None else dQ * wc
        state = _OnlineTangent(len(rb), C, query)
        for _, _, K, Kw, V in blk.keys:
            QK = Qw @ K.T
            kn = (K * Kw).sum(1)[None, :]
            rel = ar * ar * kn - 2 * ar * QK  # |Q - a K|^2_u - |Q|^2_u
            drel = 2 * dar * (ar * kn - QK) - 2 * ar * (dQw @ K.T)
            state.update(-sr * (qn[:, None] + rel), -dsr * rel - sr * drel, V)
        dout[rb, :, rp // Wq, rp % Wq] = state.tangent()
    return dout


def ideal_jvp(train, query, a, inv_2b2, groups: Groups, tangent_query, tangent_a, tangent_s):
    """The tangent of :func:`ideal_forward`'s ``out`` (the local formula with whole images; tangents as for
    :func:`local_jvp`)."""
    N = train.shape[0]
    B = query.shape[0]
    dt = query.dtype
    flat_train = train.reshape(N, -1)
    D = flat_train.shape[1]
    dq = _tangent_or_zero(tangent_query, query).reshape(B, D)
    da, ds = _tangent_or_zero(tangent_a, a, a.dtype), _tangent_or_zero(tangent_s, inv_2b2, inv_2b2.dtype)
    dout = torch.empty((B, D), dtype=dt, device=query.device)
    chunk = max(1, BUDGET // D)
    for b in range(B):
        imgs = torch.as_tensor(groups.images(int(groups.group_of_b[b])).astype(np.int64), device=query.device)
        x = query[b].reshape(1, D)
        ab, sb, dab, dsb = a[b].to(dt), inv_2b2[b].to(dt), da[b].to(dt), ds[b].to(dt)
        state = _OnlineTangent(1, D, query)
        for i0 in range(0, len(imgs), chunk):
            phi = flat_train[imgs[i0 : i0 + chunk]]
            delta = x - ab * phi
            dist2 = (delta * delta).sum(1)  # direct differences, as the forward pass
            # the tangent of |x - a phi|^2 less the part common to every image, 2 <x, dx>
            ddist2 = 2 * dab * (ab * (phi * phi).sum(1) - phi @ x[0]) - 2 * ab * (phi @ dq[b])
            state.update((-sb * dist2)[None, :], (-dsb * dist2 - sb * ddist2)[None, :], phi)
        dout[b] = state.tangent()[0]
    return dout.reshape(query.shape)
