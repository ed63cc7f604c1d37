"""The plain PyTorch implementation of the same-position machines (tables.ElementTable; contract.hpp,
AlignedCall), written straight from the definition as a *dense* product.

For a chunk of training images the squared residuals ``R[n, e] = (x[e] - a phi_n[e])^2`` form a matrix, and every
row's distance is ``R @ M.T`` with ``M`` the rows' neighbourhoods as a dense weight matrix (rows x elements), so
the work is one matrix product per chunk (what a BLAS or a GPU does fast when the neighbourhoods are large); an
online softmax over the chunks gives each row's weighted mean of its response elements. It is the float64 oracle
of the engines (cpu/aligned_softmax.cpp) and the dense path of a call whose neighbourhoods are large. Its online
softmax is its own, not the engines' (softmax_state.hpp), so that it can catch a mistake there.

The backward pass recomputes each chunk's distances and, with ``c`` the derivative of ``<g, out>`` by each logit
(``w_n <g, phi_n[resp] - out>``), applies the chain rule to ``l = -s (x - a phi)^2 @ M.T`` as dense products.
"""

from __future__ import annotations

import numpy as np
import torch

from .labels import Groups
from .tables import ElementTable

BUDGET = 1 << 22  # elements per temporary


def _dense(table: ElementTable, r0: int, r1: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``r0 .. r1`` of the neighbourhood matrix, ``(r1 - r0, D)`` in ``like``'s dtype and device."""
    lo, hi = int(table.hood_ptr[r0]), int(table.hood_ptr[r1])
    rows = np.repeat(np.arange(r1 - r0), np.diff(table.hood_ptr[r0 : r1 + 1]))
    M = torch.zeros((r1 - r0, D), dtype=like.dtype, device=like.device)
    w = 1.0 if table.hood_weight is None else torch.as_tensor(table.hood_weight[lo:hi], dtype=like.dtype,
                                                               device=like.device)
    M[torch.as_tensor(rows, device=like.device), torch.as_tensor(table.hood_elem[lo:hi].astype(np.int64),
                                                                 device=like.device)] = w
    return M


def _row_chunks(table: ElementTable, D: int, query: torch.Tensor):
    """Chunks of the table's rows within ``BUDGET``: ``(r0, r1, M, j0, j1, resp, row_of)``: the rows, their dense
    neighbourhood weights ``M`` ``(rows, D)``, their responses ``j0:j1`` (elements ``resp``, owning row ``row_of``)."""
    step = max(1, BUDGET // max(D, 1))
    dev = query.device
    for r0 in range(0, table.n_rows, step):
        r1 = min(table.n_rows, r0 + step)
        j0, j1 = int(table.resp_ptr[r0]), int(table.resp_ptr[r1])
        resp = torch.as_tensor(table.resp_elem[j0:j1].astype(np.int64), device=dev)
        row_of = torch.as_tensor(np.repeat(np.arange(r1 - r0), np.diff(table.resp_ptr[r0 : r1 + 1])), device=dev)
        yield r0, r1, _dense(table, r0, r1, D, query), j0, j1, resp, row_of


def _logits(x, phi, a, inv, M):
    """``(n, rows)``: the logits of the images ``phi`` ``(n, D)`` for query ``x`` ``(D,)``."""
    return -inv * (((x[None, :] - a * phi) ** 2) @ M.T)


def aligned_forward(train, query, table: ElementTable, a, inv_2b2, groups: Groups, provenance=False, n_threads=0):
    """(out ``(B, n_resp)``, stats ``(B, n_rows, 2)``, arg_key, arg_share ``(B, n_rows)``) of a same-position
    machine: the same contract as the compiled engines' (engines.aligned_forward)."""
    N = train.shape[0]
    B = query.shape[0]
    dev, dt = query.device, query.dtype
    phi_all, xs = train.reshape(N, -1), query.reshape(B, -1)
    D = phi_all.shape[1]
    n_resp = len(table.resp_elem)
    out = torch.empty((B, n_resp), dtype=dt, device=dev)
    stats = torch.empty((B, table.n_rows, 2), dtype=torch.float64, device=dev)
    key = torch.full((B, table.n_rows), -1, dtype=torch.int64, device=dev)
    share = torch.zeros((B, table.n_rows), dtype=dt, device=dev)
    for r0, r1, M, j0, j1, resp, row_of in _row_chunks(table, D, query):
        for b in range(B):
            imgs = torch.as_tensor(groups.images(int(groups.group_of_b[b])).astype(np.int64), device=dev)
            ab, sb = a[b].to(dt), inv_2b2[b].to(dt)
            m = torch.full((r1 - r0,), -float("inf"), dtype=dt, device=dev)
            s = torch.zeros(r1 - r0, dtype=dt, device=dev)
            acc = torch.zeros(j1 - j0, dtype=dt, device=dev)
            best = torch.full((r1 - r0,), -1, dtype=torch.int64, device=dev)
            step = max(1, BUDGET // max(D, r1 - r0))
            for i0 in range(0, len(imgs), step):
                n = imgs[i0 : i0 + step]
                phi = phi_all[n]
                L = _logits(xs[b], phi, ab, sb, M)  # (n, rows)
                top, arg = L.max(0)
                new_m = torch.maximum(m, top)
                scale = torch.exp(m - new_m)
                w = torch.exp(L - new_m[None, :])
                s = s * scale + w.sum(0)
                acc = acc * scale[row_of] + (w[:, row_of] * phi[:, resp]).sum(0)
                best = torch.where(top > m, n[arg], best)
                m = new_m
            out[b, j0:j1] = acc / s[row_of]
            stats[b, r0:r1, 0], stats[b, r0:r1, 1] = m.double(), s.double()
            key[b, r0:r1], share[b, r0:r1] = best, 1.0 / s
    if not provenance:
        key, share = query.new_empty((0,), dtype=torch.int64), query.new_empty((0,))
    return out, stats.detach(), key, share


def aligned_backward(grad_out, out, stats, train, query, table: ElementTable, a, inv_2b2, groups: Groups,
                     n_threads=0):
    """(grad_query, grad_a, grad_inv_2b2): the vector-Jacobian product of :func:`aligned_forward`'s out."""
    N = train.shape[0]
    B = query.shape[0]
    dev, dt = query.device, query.dtype
    phi_all = train.reshape(N, -1)
    D = phi_all.shape[1]
    grad_query = torch.zeros((B, D), dtype=dt, device=dev)
    grad_a = torch.zeros(B, dtype=a.dtype, device=dev)
    grad_s = torch.zeros(B, dtype=inv_2b2.dtype, device=dev)
    for r0, r1, M, j0, j1, resp, row_of in _row_chunks(table, D, query):
        for b in range(B):
            imgs = torch.as_tensor(groups.images(int(groups.group_of_b[b])).astype(np.int64), device=dev)
            m, s = stats[b, r0:r1, 0].to(dt), stats[b, r0:r1, 1].to(dt)
            g, o = grad_out[b, j0:j1].to(dt), out[b, j0:j1].to(dt)
            step = max(1, BUDGET // max(D, r1 - r0))
            for i0 in range(0, len(imgs), step):
                n = imgs[i0 : i0 + step]
                phi = phi_all[n]
                x, ab, sb = query.reshape(B, -1)[b], a[b].to(dt), inv_2b2[b].to(dt)
                delta = x[None, :] - ab * phi
                dist = (delta * delta) @ M.T  # (n, rows)
                w = torch.exp(-sb * dist - m[None, :]) / s[None, :]
                gv = torch.zeros_like(w).index_add_(1, row_of, g[None, :] * (phi[:, resp] - o[None, :]))
                c = w * gv  # d<g, out> / d logit
                G = c @ M  # (n, D): sum over the rows holding each element of c * weight
                grad_query[b] -= 2 * sb * (delta * G).sum(0)
                grad_a[b] += (2 * sb * (phi * delta * G).sum()).to(grad_a.dtype)
                grad_s[b] -= (c * dist).sum().to(grad_s.dtype)
    return grad_query.reshape(query.shape), grad_a, grad_s


def aligned_jvp(train, query, table: ElementTable, a, inv_2b2, groups: Groups, tangent_query, tangent_a,
                tangent_s):
    """The tangent of :func:`aligned_forward`'s ``out`` ``(B, n_resp)`` for the tangents of the query, of ``a``
    and of ``inv_2b2`` (None: zero), in plain torch on any device (the forward-mode derivative of every engine).

    A row's response is a softmax average over the images, so its tangent is ``sum_n w_n (phi_n[resp] - out)
    dl_n`` with ``dl = -ds dist - s ddist`` and ``ddist = 2 (delta (dx - da phi)) @ M.T``; the weights are
    recomputed with an online softmax of the pass's own (it reads neither the forward's statistics nor its
    output), over the same chunks as :func:`aligned_backward`."""
    N = train.shape[0]
    B = query.shape[0]
    dev, dt = query.device, query.dtype
    phi_all, xs = train.reshape(N, -1), query.reshape(B, -1)
    D = phi_all.shape[1]
    dxs = xs.new_zeros(xs.shape) if tangent_query is None else tangent_query.to(device=dev, dtype=dt).reshape(B, -1)
    da = a.new_zeros(a.shape) if tangent_a is None else tangent_a.to(device=dev, dtype=a.dtype)
    ds = inv_2b2.new_zeros(inv_2b2.shape) if tangent_s is None else tangent_s.to(device=dev, dtype=inv_2b2.dtype)
    dout = torch.empty((B, len(table.resp_elem)), dtype=dt, device=dev)
    for r0, r1, M, j0, j1, resp, row_of in _row_chunks(table, D, query):
        for b in range(B):
            imgs = torch.as_tensor(groups.images(int(groups.group_of_b[b])).astype(np.int64), device=dev)
            x, dx = xs[b], dxs[b]
            ab, sb, dab, dsb = a[b].to(dt), inv_2b2[b].to(dt), da[b].to(dt), ds[b].to(dt)
            m = torch.full((r1 - r0,), -float("inf"), dtype=dt, device=dev)
            s = torch.zeros(r1 - r0, dtype=dt, device=dev)
            p = torch.zeros(r1 - r0, dtype=dt, device=dev)
            acc = torch.zeros(j1 - j0, dtype=dt, device=dev)
            pacc = torch.zeros(j1 - j0, dtype=dt, device=dev)
            step = max(1, BUDGET // max(D, r1 - r0))
            for i0 in range(0, len(imgs), step):
                phi = phi_all[imgs[i0 : i0 + step]]
                delta = x[None, :] - ab * phi
                dist = (delta * delta) @ M.T  # (n, rows)
                ddist = (2 * delta * (dx[None, :] - dab * phi)) @ M.T
                L = -sb * dist
                new_m = torch.maximum(m, L.max(0).values)
                scale = torch.exp(m - new_m)
                w = torch.exp(L - new_m[None, :])
                wd = w * (-dsb * dist - sb * ddist)
                s = s * scale + w.sum(0)
                p = p * scale + wd.sum(0)
                acc = acc * scale[row_of] + (w[:, row_of] * phi[:, resp]).sum(0)
                pacc = pacc * scale[row_of] + (wd[:, row_of] * phi[:, resp]).sum(0)
                m = new_m
            out = acc / s[row_of]
            dout[b, j0:j1] = pacc / s[row_of] - (p / s)[row_of] * out
    return dout
