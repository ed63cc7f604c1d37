"""The compiled CPU engine (``cpp/cpu``): torch/numpy in, buffers to the core, torch out."""

from __future__ import annotations

import numpy as np
import torch

from .. import _core


def _np(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got a tensor on {t.device}")
    return np.ascontiguousarray(t.numpy())


def local(train, query, k, keyset, a, inv_2b2, groups, provenance=False, n_threads=0):
    tr, q = _np(train), _np(query)
    B, C, Hq, Wq = q.shape
    out = np.empty_like(q)
    arg_key = np.empty((B, Hq, Wq), dtype=np.int64) if provenance else None
    arg_share = np.empty((B, Hq, Wq), dtype=q.dtype) if provenance else None
    _core.patch_softmax(
        tr, q, int(k), keyset.query_pad, keyset.key_pad,
        np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(inv_2b2, dtype=np.float64),
        keyset.cls_qpix_ptr, keyset.cls_qpix, keyset.cls_kpos_ptr, keyset.cls_kpos,
        groups.grp_img_ptr, groups.grp_img, groups.group_of_b,
        out, arg_key, arg_share, int(n_threads),
    )
    return _wrap(out, arg_key, arg_share)


def ideal(train, query, a, inv_2b2, groups, provenance=False, n_threads=0):
    tr, q = _np(train), _np(query)
    N, B = tr.shape[0], q.shape[0]
    out = np.empty_like(q)
    arg_key = np.empty((B,), dtype=np.int64) if provenance else None
    arg_share = np.empty((B,), dtype=q.dtype) if provenance else None
    _core.ideal_score(
        tr.reshape(N, -1), q.reshape(B, -1),
        np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(inv_2b2, dtype=np.float64),
        groups.grp_img_ptr, groups.grp_img, groups.group_of_b,
        out.reshape(B, -1), arg_key, arg_share, int(n_threads),
    )
    return _wrap(out, arg_key, arg_share)


def _wrap(out, arg_key, arg_share):
    return (
        torch.from_numpy(out),
        None if arg_key is None else torch.from_numpy(arg_key),
        None if arg_share is None else torch.from_numpy(arg_share),
    )
