"""How often the index retrieves the true nearest keys: brute-force ground truth on sampled pixels."""

from __future__ import annotations

import numpy as np
import torch

from ..validation import check_t, to_labels, to_tensor
from .patch_index import Part, PatchIndex
from .vectors import pad_to, patch_vectors


def exact_topm_ids(index: PatchIndex, part: Part, queries: np.ndarray, m: int) -> np.ndarray:
    """The true ``m`` nearest keys (global ids) of ``queries`` (already divided by ``a``) in ``part``,
    by brute force over the key vectors (streamed; for measuring recall)."""
    q = np.asarray(queries, dtype=np.float64)
    best_d = np.full((len(q), 0), np.inf)
    best_i = np.zeros((len(q), 0), np.int64)
    qq = (q * q).sum(1, keepdims=True)
    off = 0
    for chunk in index.key_chunks(part, chunk=1 << 18):
        kc = chunk.astype(np.float64)
        d = qq - 2 * q @ kc.T + (kc * kc).sum(1)[None]
        alld = np.concatenate([best_d, d], 1)
        alli = np.concatenate([best_i, np.broadcast_to(np.arange(off, off + len(kc)), d.shape)], 1)
        keep = min(m, alld.shape[1])
        sel = np.argpartition(alld, keep - 1, axis=1)[:, :keep]
        best_d, best_i = np.take_along_axis(alld, sel, 1), np.take_along_axis(alli, sel, 1)
        off += len(kc)
    return part.keys[best_i]


def measure_recall(index: PatchIndex, x, t, labels=None, m: int = 64, n_pixels: int = 256, seed: int = 0) -> float:
    """Fraction of the true ``m`` nearest keys that ``index`` retrieves, over ``n_pixels`` random query
    pixels of ``x`` (brute-force ground truth)."""
    xt = to_tensor(x, "x").float().cpu()
    B = xt.shape[0]
    a, _ = index.machine.schedule.coefficients(check_t(t, B))
    lab = None if labels is None else to_labels(labels, B)
    rng = np.random.default_rng(seed)
    hits = total = 0
    for part in index.parts:
        bs = np.arange(B) if part.label is None else np.nonzero(lab == part.label)[0]
        if len(bs) == 0:
            continue
        share = max(1, int(round(n_pixels * len(part.qpix) * len(bs) / (B * index.canvas[0] * index.canvas[1]))))
        q = patch_vectors(xt[torch.as_tensor(bs)], part.qpix, index.k, index.keyset.query_pad)
        q = q / np.repeat(a[bs], len(part.qpix)).astype(np.float32)[:, None]
        rows = rng.choice(len(q), min(share, len(q)), replace=False)
        qs = np.ascontiguousarray(q[rows])
        mm = min(m, len(part.keys))
        truth = exact_topm_ids(index, part, qs, mm)
        _, ids = part.index.search(pad_to(qs, part.index.d), mm)
        got = np.where(ids >= 0, part.keys[np.clip(ids, 0, None)], -2)
        for tr, g in zip(truth, got):
            hits += len(np.intersect1d(tr, g))
            total += mm
    return hits / max(total, 1)

