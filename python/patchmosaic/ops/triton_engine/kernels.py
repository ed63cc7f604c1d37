"""The Triton kernels of the Triton engine (imported only when the engine runs: it needs ``triton``).

Three kernels, all float32 with split precision for the products (host code: local.py, ideal.py):

- :func:`query_patches_kernel` gathers the query patches of a call's rows once, through the element table
  (zero or circular padding, optional sqrt-weights of a masked patch), split into the two TF32 halves ``hi``,
  ``lo`` (below) and stored as dense ``(rows, D_PAD)`` matrices.
- :func:`local_softmax_kernel`: one program per work item (a tile of at most ``BLOCK_M`` rows of one class and
  image group, and a range of its keys), flash-attention style: key patches gathered from the training images
  tile by tile (``BLOCK_N`` keys x ``BLOCK_D`` elements), the dot products on tensor cores in split precision,
  the shifted logits ``l' = s (2 a Q.K - a^2 |K|^2)`` (contract.hpp), an online softmax with the sums in
  float64, provenance, and a partial state per row (merged on the host in a fixed order, merge.py).
- :func:`ideal_logits_kernel`: the IS logits ``-s |x - a phi|^2`` by direct differences (no cancellation; IS is
  a small part of any run), distances accumulated in float64.

Split precision ("tf32x3", the 3xTF32 scheme): a float32 ``x`` is ``hi + lo`` with ``hi`` = ``x`` rounded to TF32
(10 mantissa bits, to nearest, ties away from zero: PTX ``cvt.rna.tf32.f32``) and ``lo`` = ``x - hi`` (exact)
cut to TF32 by dropping its low 13 bits (what a TF32 tensor core does with the bits it ignores). The product
``q.k`` is ``lo_q.hi_k + hi_q.lo_k + hi_q.hi_k``, three TF32 matrix products accumulated in float32 in that order
(the order of Triton's own ``input_precision="tf32x3"``; ``lo.lo`` is dropped), each chunk of ``BLOCK_D`` patch
elements into a fresh accumulator that is then added to the running sum, so that a tensor core's truncating
accumulation (precision.py) rounds over one chunk, not over the whole patch. Every TF32 x TF32 product is
exact in float32, so the split is written out here rather than left to the compiler: the same bits reach the
tensor cores, and under ``TRITON_INTERPRET=1`` (which computes ``tl.dot`` in numpy float32 whatever the
requested precision) the interpreter computes the same products, so the CPU test suite sees the split's
error. ``SPLIT=False`` computes plain float32 products (``input_precision="ieee"``, no tensor cores).

Skipping (``SKIP``): a key tile whose largest logit, for every row of the tile, lies more than ``EXP_CUT``
below the row's running maximum has weight exactly 0 under the engines' clamped exponential
(softmax_state.hpp): its exponentials, sums and value products are skipped, which changes no bit of the
result. ``COUNT`` makes each program write how many key tiles it skipped and how many it had.
"""

from __future__ import annotations

import triton
import triton.language as tl
import triton.language.core as tlc  # noqa: F401  (so that an interpreted launch patches triton.language.core too)

# The clamped exponential's cut for float32 (softmax_state.hpp, ExpCut<float>): weight exactly 0 below it.
# tests/test_triton.py checks that the two agree.
EXP_CUT: tl.constexpr = tl.constexpr(87.0)

# work item fields (local.py builds the table): int64 (n_items, ITEM_FIELDS)
ITEM_FIELDS: tl.constexpr = tl.constexpr(10)
# 0 row_start, 1 n_rows, 2 kpos_start, 3 n_pos, 4 img_start, 5 n_img, 6 key_start, 7 key_end, 8 elem_start,
# 9 n_elem


# The TF32 halves are written inline (bit masks on the float32 bits, as int32): ``hi = (bits + 0x1000) & -8192``
# rounds to nearest with ties away from zero, ``& -8192`` alone cuts towards zero. Circular indices are wrapped
# with ``((i % n) + n) % n`` (right for either sign convention of ``%``). Helpers are not separate jit functions:
# under the interpreter every call of one costs more than the arithmetic.


@triton.jit
def query_patches_kernel(query, row_b, row_pix, row_elem, q_hi, q_lo, elem_ch, elem_dr, elem_dc, elem_scale,
                         n_rows, C, Hq, Wq, D_PAD: tl.constexpr, CIRCULAR: tl.constexpr, SCALED: tl.constexpr,
                         SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[pid_r BLOCK_R, +BLOCK_R)`` x elements ``[pid_d BLOCK_D, +BLOCK_D)`` of the query patch matrices.
    ``row_elem`` int64 (rows, 2): each row's (element start, element count) in the element table."""
    pr = tl.program_id(0)
    pd = tl.program_id(1)
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    rv = r < n_rows
    e = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.load(row_b + r, mask=rv, other=0).to(tl.int64)
    p = tl.load(row_pix + r, mask=rv, other=0)
    e0 = tl.load(row_elem + 2 * r, mask=rv, other=0)
    ne = tl.load(row_elem + 2 * r + 1, mask=rv, other=0)
    ev = rv[:, None] & (e[None, :] < ne[:, None])
    ei = e0[:, None] + e[None, :]
    ch = tl.load(elem_ch + ei, mask=ev, other=0)
    ii = (p // Wq)[:, None] + tl.load(elem_dr + ei, mask=ev, other=0)
    jj = (p % Wq)[:, None] + tl.load(elem_dc + ei, mask=ev, other=0)
    if CIRCULAR:
        ii = ((ii % Hq) + Hq) % Hq
        jj = ((jj % Wq) + Wq) % Wq
    else:
        ev = ev & (ii >= 0) & (ii < Hq) & (jj >= 0) & (jj < Wq)
    v = tl.load(query + ((b[:, None] * C + ch) * Hq + ii) * Wq + jj, mask=ev, other=0.0)
    if SCALED:
        v = v * tl.load(elem_scale + ei, mask=ev, other=0.0)
    out = r[:, None].to(tl.int64) * D_PAD + e[None, :]
    ok = rv[:, None] & (e[None, :] < D_PAD)
    if SPLIT:
        hi = ((v.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
        tl.store(q_hi + out, hi, mask=ok)
        tl.store(q_lo + out, ((v - hi).to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True), mask=ok)
    else:
        tl.store(q_hi + out, v, mask=ok)


@triton.jit
def local_softmax_kernel(train, q_hi, q_lo, row_b, coef_a, coef_s, items, cls_kpos, grp_img,
                         elem_ch, elem_dr, elem_dc, elem_scale,
                         part_m, part_s, part_acc, part_key, skipped,
                         C, H, W,
                         D_PAD: tl.constexpr, C_PAD: tl.constexpr, CIRCULAR: tl.constexpr, SCALED: tl.constexpr,
                         SPLIT: tl.constexpr, SKIP: tl.constexpr, COUNT: tl.constexpr, PROVENANCE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One work item: its rows' partial softmax states over its key range (module docstring)."""
    pid = tl.program_id(0)
    it = items + pid * ITEM_FIELDS
    row_start = tl.load(it)
    n_rows = tl.load(it + 1)
    kpos0 = tl.load(it + 2)
    n_pos = tl.load(it + 3)
    img0 = tl.load(it + 4)
    key_start = tl.load(it + 6)
    key_end = tl.load(it + 7)
    e0 = tl.load(it + 8)
    ne = tl.load(it + 9)

    rm = tl.arange(0, BLOCK_M)
    rv = rm < n_rows
    rows = (row_start + rm).to(tl.int64)
    b = tl.load(row_b + rows, mask=rv, other=0)
    a = tl.load(coef_a + b, mask=rv, other=0.0)
    s = tl.load(coef_s + b, mask=rv, other=0.0)
    two_a = 2.0 * a
    aa = a * a
    dd = tl.arange(0, BLOCK_D)
    cc = tl.arange(0, C_PAD)
    HW = H * W

    if D_PAD == BLOCK_D:  # the whole patch in one chunk: the query tile stays in registers
        q_off = rows[:, None] * D_PAD + dd[None, :]
        qh_res = tl.load(q_hi + q_off, mask=rv[:, None], other=0.0)
        if SPLIT:
            ql_res = tl.load(q_lo + q_off, mask=rv[:, None], other=0.0)
        else:
            ql_res = qh_res

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float64)
    acc = tl.zeros([BLOCK_M, C_PAD], tl.float64)
    best = tl.full([BLOCK_M], -1, tl.int64)
    n_skip = 0
    n_tiles = 0
    for kt in range(key_start, key_end, BLOCK_N):
        n_tiles += 1
        j = kt + tl.arange(0, BLOCK_N)
        jv = j < key_end
        img_local = j // n_pos
        n = tl.load(grp_img + img0 + img_local, mask=jv, other=0).to(tl.int64)
        pos = tl.load(cls_kpos + kpos0 + (j - img_local * n_pos), mask=jv, other=0)
        ki = pos // W
        kj = pos % W
        dot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        kn = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D_PAD, BLOCK_D):
            e = d0 + dd
            evm = e < ne
            ch = tl.load(elem_ch + e0 + e, mask=evm, other=0)
            ii = ki[None, :] + tl.load(elem_dr + e0 + e, mask=evm, other=0)[:, None]
            jj = kj[None, :] + tl.load(elem_dc + e0 + e, mask=evm, other=0)[:, None]
            ok = evm[:, None] & jv[None, :]
            if CIRCULAR:
                ii = ((ii % H) + H) % H
                jj = ((jj % W) + W) % W
            else:
                ok = ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
            kv = tl.load(train + ((n[None, :] * C + ch[:, None]) * H + ii) * W + jj, mask=ok, other=0.0)
            if SCALED:
                kv = kv * tl.load(elem_scale + e0 + e, mask=evm, other=0.0)[:, None]
            kn += tl.sum(kv * kv, axis=0)
            if D_PAD == BLOCK_D:
                qh = qh_res
                ql = ql_res
            else:
                q_off = rows[:, None] * D_PAD + e[None, :]
                qh = tl.load(q_hi + q_off, mask=rv[:, None], other=0.0)
                if SPLIT:
                    ql = tl.load(q_lo + q_off, mask=rv[:, None], other=0.0)
                else:
                    ql = qh
            if SPLIT:
                kh = ((kv.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
                kl = ((kv - kh).to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                part = tl.dot(ql, kh, input_precision="tf32")
                part = tl.dot(qh, kl, part, input_precision="tf32")
                dot += tl.dot(qh, kh, part, input_precision="tf32")
            else:
                dot = tl.dot(qh, kv, dot, input_precision="ieee")
        logit = s[:, None] * (two_a[:, None] * dot - aa[:, None] * kn[None, :])
        logit = tl.where(jv[None, :], logit, float("-inf"))
        tmax = tl.max(logit, axis=1)
        go = True
        if SKIP:
            go = tl.max(tl.where(rv, tmax - m_i, float("-inf")), axis=0) >= -EXP_CUT
        if go:
            m_new = tl.maximum(m_i, tmax)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp((m_i - m_safe).to(tl.float64))
            z = logit - m_safe[:, None]
            p = tl.where(z < -EXP_CUT, 0.0, tl.exp(z))
            s_i = s_i * alpha + tl.sum(p, axis=1).to(tl.float64)
            centre = (n * C)[:, None] * HW + cc[None, :] * HW + (ki * W + kj)[:, None]
            v = tl.load(train + centre, mask=jv[:, None] & (cc[None, :] < C), other=0.0)
            if C_PAD == 1:
                pv = tl.sum(p * tl.reshape(v, [BLOCK_N])[None, :], axis=1)[:, None]
            else:
                pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv.to(tl.float64)
            if PROVENANCE:
                am = tl.argmax(logit, axis=1)
                gid = n * HW + pos
                win = tl.sum(tl.where(tl.arange(0, BLOCK_N)[None, :] == am[:, None], gid[None, :], 0), axis=1)
                best = tl.where(tmax > m_i, win, best)
            m_i = m_new
        else:
            n_skip += 1

    slot = pid.to(tl.int64) * BLOCK_M + rm
    tl.store(part_m + slot, m_i)
    tl.store(part_s + slot, s_i)
    tl.store(part_acc + slot[:, None] * C_PAD + cc[None, :], acc)
    if PROVENANCE:
        tl.store(part_key + slot, best)
    if COUNT:
        tl.store(skipped + 2 * pid, n_skip)
        tl.store(skipped + 2 * pid + 1, n_tiles)


@triton.jit
def ideal_logits_kernel(train, query, row_b, coef_a, coef_s, items, grp_img, logits, D, n_cols,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """IS: ``logits[r, j] = -s_b |x_b - a_b phi_n|^2`` (float64) for the rows ``r`` (query images ``b = row_b[r]``) and
    keys ``j`` (training images ``n = grp_img[img_start + j]``) of a work item (row_start, n_rows, img_start,
    n_img); program (item, key tile). Squared distances by direct differences, accumulated in float64."""
    pid = tl.program_id(0)
    pk = tl.program_id(1)
    it = items + pid * 4
    row_start = tl.load(it)
    n_rows = tl.load(it + 1)
    img0 = tl.load(it + 2)
    n_img = tl.load(it + 3)
    if pk * BLOCK_N < n_img:
        rm = tl.arange(0, BLOCK_M)
        rv = rm < n_rows
        rows = (row_start + rm).to(tl.int64)
        b = tl.load(row_b + rows, mask=rv, other=0).to(tl.int64)
        a = tl.load(coef_a + b, mask=rv, other=0.0)
        s = tl.load(coef_s + b, mask=rv, other=0.0)
        j = pk * BLOCK_N + tl.arange(0, BLOCK_N)
        jv = j < n_img
        n = tl.load(grp_img + img0 + j, mask=jv, other=0).to(tl.int64)
        dist = tl.zeros([BLOCK_M, BLOCK_N], tl.float64)
        for d0 in range(0, D, BLOCK_D):
            e = d0 + tl.arange(0, BLOCK_D)
            ev = e < D
            x = tl.load(query + b[:, None] * D + e[None, :], mask=rv[:, None] & ev[None, :], other=0.0)
            phi = tl.load(train + n[:, None] * D + e[None, :], mask=jv[:, None] & ev[None, :], other=0.0)
            diff = x[:, None, :] - a[:, None, None] * phi[None, :, :]
            diff = tl.where(ev[None, None, :], diff, 0.0)
            dist += tl.sum(diff * diff, axis=2).to(tl.float64)
        out = -(s[:, None].to(tl.float64) * dist)
        tl.store(logits + rows[:, None] * n_cols + j[None, :], out, mask=rv[:, None] & jv[None, :])
