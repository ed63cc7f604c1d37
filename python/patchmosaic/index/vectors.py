"""Patch vectors of the patch index: key and query patches as float32 rows, hashes of rows (to merge
identical keys), and the fingerprint of a training set (the index's identity)."""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch

from ..ops import CIRCULAR


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("the patch index needs FAISS: pip install faiss-cpu") from None
    return faiss


def patch_vectors(images, positions: np.ndarray, k: int, pad: int) -> np.ndarray:
    """Patches of ``images`` ``(n, C, H, W)`` centred at flat ``positions`` -> ``(n * len(positions), C k k)``
    float32, image-major: :func:`key_vectors` of every (image, position) pair."""
    n, _, H, W = images.shape
    ids = (np.arange(n, dtype=np.int64)[:, None] * (H * W) + np.asarray(positions, dtype=np.int64)[None, :]).ravel()
    return key_vectors(images, ids, H, W, k, pad)


def key_vectors(images, ids: np.ndarray, H: int, W: int, k: int, pad: int) -> np.ndarray:
    """Patches of ``images`` ``(N, C, H, W)`` for global key ids ``n * H * W + p`` -> ``(len(ids), C k k)``
    float32, elements in (channel, row, column) order; ``pad``: zeros or circular.

    Plain numpy (no thread pool): FAISS brings its own OpenMP runtime, and two runtimes spinning
    against each other made torch's unfold here 50x slower."""
    ids = np.asarray(ids, dtype=np.int64)
    n, p = np.divmod(ids, H * W)
    uimg, local = np.unique(n, return_inverse=True)
    x = images[torch.as_tensor(uimg)] if torch.is_tensor(images) else np.asarray(images)[uimg]
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else x
    x = x.astype(np.float32, copy=False)
    r = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="wrap" if pad == CIRCULAR else "constant")
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))  # (u, C, H, W, k, k)
    sel = win[local.ravel(), :, p // W, p % W]  # (L, C, k, k)
    return np.ascontiguousarray(sel.reshape(len(ids), -1))


def patch_sq_norms(x: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """``|P_p(x_b)|^2`` for every query image and pixel: the squared norm of the square ``k x k`` patch over all
    channels, ``pad`` zeros or circular, in float64 ``(B, Hq, Wq)``. It is the term the engines leave out of
    their (shifted) logits, ``l' = l + |P|^2 / (2 b^2)``; the re-scoring's logits are the true ``l``."""
    x2 = x.detach().to(torch.float64).square().sum(1)  # (B, Hq, Wq)
    r = int(k) // 2
    for dim in (1, 2):  # a separable box sum: rows, then columns
        if pad == CIRCULAR:
            x2 = sum(torch.roll(x2, d, dims=dim) for d in range(-r, r + 1))
        else:
            n = x2.shape[dim]
            padded = torch.nn.functional.pad(x2, (0, 0, r, r) if dim == 1 else (r, r))
            x2 = sum(padded.narrow(dim, d, n) for d in range(2 * r + 1))
    return x2


def masked_columns(v: np.ndarray, columns: Optional[np.ndarray], scale: Optional[np.ndarray]) -> np.ndarray:
    """Rows of square patch vectors ``v`` as masked patch vectors (ops/masks.py): the mask's ``columns`` (None:
    all), each times ``scale`` (its ``sqrt`` weight; None: 1), so that squared distances are the mask's."""
    if columns is None:
        return v
    v = v[:, columns]
    if scale is not None:
        v = v * scale[None, :]
    return np.ascontiguousarray(v, dtype=np.float32)


def row_hashes(v: np.ndarray, seed: int = 0x9E3779B9) -> np.ndarray:
    """Two independent 64-bit hashes of each row's bytes (float32 rows) -> ``(n, 2)`` uint64. Rows
    with equal bytes hash equal; distinct rows collide with probability about 2^-128."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rng = np.random.default_rng(seed)
    out = np.empty((len(u), 2), np.uint64)
    for h in range(2):
        mult = rng.integers(1, 2**63, size=u.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        with np.errstate(over="ignore"):
            x = u * mult[None, :]
            x ^= x >> np.uint64(29)
            out[:, h] = x.sum(1)
    return out


def pad_to(v: np.ndarray, d: int) -> np.ndarray:
    """Rows of ``v`` zero-padded to ``d`` columns (an IVF-PQ index's padded vector size)."""
    return v if v.shape[1] == d else np.ascontiguousarray(np.pad(v, ((0, 0), (0, d - v.shape[1]))))


def fingerprint_data(images: torch.Tensor, labels: Optional[np.ndarray]) -> str:
    h = hashlib.sha256()
    arr = images.detach().cpu().contiguous().numpy()
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(arr.tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


