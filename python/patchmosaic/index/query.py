"""Approximate local machines through a patch index: retrieve, re-score exactly, bound the error.

Per query pixel, the index retrieves the ``m`` nearest keys of the pixel's part (distances
``|P - a q|^2 = a^2 |P / a - q|^2``, so one index serves every ``t``); the compiled core's
``candidate_softmax`` op re-scores them exactly from the original float patches and takes the softmax over
them; :func:`patchmosaic.index.bound.error_bound` says how far that can be from the exact machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import ops
from ..ops.checks import check_cuda_inputs
from ..ops.state import SoftmaxState
from ..validation import check_t, to_labels, to_tensor
from .bound import bound_from_mass, left_mass
from .retrieval_check import check_retrieval
from .vectors import masked_columns, pad_to, patch_vectors


@dataclass
class ApproxResult:
    """What a patch-index query returns.

    ``x0``: the approximate denoiser output (shape of the query); ``bound``: per pixel ``(B, Hq, Wq)``, an
    upper bound on ``|x0_exact - x0|`` (every channel); ``arg_key``: the winning candidate per pixel
    (``n * H * W + p``, provenance); ``seconds``: the query's time; ``state``: the partial softmax state of the
    retrieved keys (ops/state.py: per pixel the top logit, the weight sum relative to it, ``x0`` channels last, the
    winning key, and ``left``: the bound on the left-out keys' weight), the form in which a key shard of a
    distributed machine merges it with the others.

    The bound is a guarantee only where retrieval is exhaustive (``kind="flat"``). For an inverted-file index
    (``"ivf"``, ``"ivfpq"``) it holds *conditional on retrieval*: if the probed lists missed keys nearer than
    the m-th retrieved one, the true error can exceed it by any amount. Then ``bound_conditional`` is True and
    the query checks retrieval on a sample of pixels against the exact machine (index/retrieval_check.py):
    ``checked_pixels`` were computed exactly, ``failed_pixels`` of them had an error above their bound (by up
    to ``worst_excess``). ``bound_valid``: True for a flat index or a passed check, False when the check
    failed (a ``RetrievalWarning`` is issued too), None when a conditional bound was not checked.
    """

    x0: torch.Tensor
    bound: torch.Tensor
    arg_key: torch.Tensor
    seconds: float = 0.0
    bound_conditional: bool = False
    checked_pixels: int = 0
    failed_pixels: int = 0
    worst_excess: float = 0.0
    bound_valid: Optional[bool] = True
    state: Optional[SoftmaxState] = None


U32 = 2.0 ** -24  # float32's unit roundoff


def ranking_slack(q: np.ndarray, key_norm: float, scale: np.ndarray, per_image: int) -> np.ndarray:
    """Per query row, how much larger than the m-th retrieved key's logit a left-out key's logit can be because
    FAISS computes and ranks the distances ``|q - y|^2`` in float32 (``q`` the row's query vector over ``a``).

    Each float32 distance of a ``d``-vector, in any summation order and directly or as ``|q|^2 + |y|^2 - 2 q.y``,
    is within ``gamma (|q| + |y|)^2`` of the exact one, ``gamma = n u / (1 - n u)`` with ``n = d + 2`` and ``u``
    float32's unit roundoff. A key left out has a float32 distance at least the m-th's, so its exact distance is
    at least the m-th's exact distance less twice that; times ``a^2 / (2 b^2)`` (``scale``, per image, the rows of
    one image ``per_image`` in a row) it is a slack in logits. At high noise it is negligible; at very low noise,
    or for queries far larger than the data, it can make the bound vacuous, as it should."""
    n = q.shape[1] + 2
    gamma = n * U32 / (1 - n * U32)
    qn = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
    return 2 * gamma * (qn + key_norm) ** 2 * np.repeat(np.asarray(scale, np.float64), per_image)


def approx_denoise(index, x, t, labels=None, m: int = 64, check_pixels: int = 64) -> ApproxResult:
    """The softmax over the ``m`` nearest keys per pixel of ``index`` (a :class:`PatchIndex`), re-scored
    exactly, with the per-pixel error bound. ``x`` ``(B, C, Hq, Wq)`` float32 on the CPU. Where the bound is
    conditional on retrieval (an inverted-file part), ``check_pixels`` random pixels are computed exactly
    to check it (0: no check). A CUDA ``x``, ``t`` or ``labels`` on a torch without CUDA is refused first."""
    check_cuda_inputs(x=x, t=t, labels=labels)
    t0 = time.perf_counter()
    mach = index.machine
    xt = to_tensor(x, "x")
    if xt.dtype != torch.float32:
        raise TypeError(f"the patch index works in float32, got {xt.dtype}")
    B, C, Hq, Wq = xt.shape
    if (C, Hq, Wq) != (mach.C,) + index.canvas:
        raise ValueError(f"this index is for queries of shape (B, {mach.C}, {index.canvas[0]}, {index.canvas[1]}), "
                         f"got {tuple(xt.shape)}")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m must be a positive integer number of candidates, got {m!r}")
    if isinstance(check_pixels, bool) or not isinstance(check_pixels, (int, np.integer)) or check_pixels < 0:
        raise ValueError(f"check_pixels must be a non-negative integer, got {check_pixels!r}")
    tt = check_t(t, B)
    mach.check_labels(labels, B)
    if labels is None and any(p.label is not None for p in index.parts):
        raise ValueError("this patch index was built over a class-conditional machine (its keys are split by class): "
                         "pass labels, one per query image (the exact machine runs over every image without them)")
    lab = None if labels is None else to_labels(labels, B)
    a, b2 = mach.schedule.coefficients(tt)
    inv_2b2 = 0.5 / b2
    xq = xt.cpu().contiguous()
    HWq = Hq * Wq
    m = min(int(m), max(len(p.keys) for p in index.parts))
    pix_all, cand_all, cnt_all, M_all, R_all, slack_all = [], [], [], [], [], []
    allpix = np.arange(HWq)
    cols = {}  # query patches / a of each label group, once: (nb, Hq Wq, d)
    for part in index.parts:
        bs = np.arange(B) if part.label is None else np.nonzero(lab == part.label)[0]
        if len(bs) == 0:
            continue
        if part.label not in cols:
            v = patch_vectors(xq[torch.as_tensor(bs)], allpix, index.k, index.keyset.query_pad)
            v = masked_columns(v, index.mask_columns, index.mask_scale)
            v = v.reshape(len(bs), HWq, index.d) / a[bs].astype(np.float32)[:, None, None]
            cols[part.label] = v
        q = cols[part.label][:, part.qpix].reshape(-1, index.d)
        mm = min(m, len(part.keys))
        q = pad_to(np.ascontiguousarray(q, dtype=np.float32), part.index.d)
        _, ids = part.index.search(q, mm)
        slack_all.append(ranking_slack(q, index.key_norm_bound(part), a[bs] ** 2 * inv_2b2[bs], len(part.qpix)))
        short = np.nonzero((ids < 0).any(1))[0]
        if len(short) and hasattr(part.index, "nprobe"):
            # the probed lists held fewer than mm keys (e.g. many identical patches all filed in one
            # list): search those rows again over every list
            probe = part.index.nprobe
            part.index.nprobe = part.index.nlist
            try:
                ids[short] = part.index.search(q[short], mm)[1]
            finally:
                part.index.nprobe = probe
        cand = np.where(ids >= 0, part.keys[np.clip(ids, 0, None)], -1)
        cnt = np.ones(ids.shape) if part.count is None else part.count[np.clip(ids, 0, None)]
        pix_all.append((bs[:, None] * HWq + part.qpix[None, :]).ravel())
        cand_all.append(np.pad(cand, ((0, 0), (0, m - mm)), constant_values=-1))
        cnt_all.append(np.pad(np.where(ids >= 0, cnt, 0.0), ((0, 0), (0, m - mm))))
        M_all.append(np.full(cand.shape[0], part.n_total, np.int64))
        R_all.append(np.full(cand.shape[0], part.value_range))
    pix = np.concatenate(pix_all).astype(np.int64)
    cand = np.ascontiguousarray(np.concatenate(cand_all), dtype=np.int64)
    cnt = np.ascontiguousarray(np.concatenate(cnt_all), dtype=np.float64)
    train = mach.train_as(torch.float32, torch.device("cpu"))
    out_t, top_t, last_t, srel_t, arg_t, _ = ops.candidate_softmax(
        train, xq, torch.from_numpy(np.ascontiguousarray(a, np.float64)),
        torch.from_numpy(np.ascontiguousarray(inv_2b2, np.float64)), torch.from_numpy(pix), torch.from_numpy(cand),
        torch.from_numpy(cnt), index.k, index.keyset.query_pad, index.keyset.key_pad, True, mach.n_threads,
        None if index.patch_mask is None else torch.from_numpy(index.patch_mask))
    out, top, last, srel, arg = out_t.numpy(), top_t.numpy(), last_t.numpy(), srel_t.numpy(), arg_t.numpy()
    # FAISS ranks in float32: a key left out may be nearer than the m-th retrieved by its rounding, so the
    # left-out keys' logits are bounded by the m-th's plus the slack of that rounding (ranking_slack)
    left = left_mass(top, last + np.concatenate(slack_all), cnt.sum(axis=1), np.concatenate(M_all))
    bnd = bound_from_mass(left, srel, np.concatenate(R_all))

    def per_pixel(values, fill, dtype=np.float64):
        full = np.full(B * HWq, fill, dtype)
        full[pix] = values
        return torch.from_numpy(full.reshape(B, Hq, Wq))

    res = torch.from_numpy(out)
    if isinstance(x, torch.Tensor):
        res = res.to(x.device)
    key = per_pixel(arg, -1, np.int64)
    state = SoftmaxState(per_pixel(top, -np.inf), per_pixel(srel, 0.0), res.permute(0, 2, 3, 1), key,
                         per_pixel(left, 0.0))
    out = ApproxResult(res, per_pixel(bnd, 0.0), key, state=state)
    if any(index.part_kind(p) != "flat" for p in index.parts):
        check_retrieval(index, xq, t, labels, out, check_pixels)
    out.seconds = time.perf_counter() - t0
    return out
