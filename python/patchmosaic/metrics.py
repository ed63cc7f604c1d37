"""Per-seed comparison metrics of spec section 5 and their summaries.

- ``pearson_r(u, v)``: Pearson correlation over all pixels and channels of each image pair (each image's
  global mean subtracted, normalised, dotted): what the paper's tables call "r^2".
- ``r2(u, v)``: coefficient of determination of ``v`` as a prediction of ``u``: ``1 - |u-v|^2 / |u - mean u|^2``.
- ``mse(u, v)``: mean squared difference.
All take ``(M, ...)`` arrays or tensors and return float64 numpy arrays of shape ``(M,)``.
"""

from __future__ import annotations

import numpy as np
import torch


def _flat(u) -> np.ndarray:
    u = u.detach().cpu().numpy() if torch.is_tensor(u) else np.asarray(u)
    return u.reshape(u.shape[0], -1).astype(np.float64)


def _pairs(u, v):
    """``u`` and ``v`` as float64 ``(M, n)`` rows, after checking they are the same shape ``(M, ...)`` with M >= 1 (a
    ValueError otherwise: numpy would broadcast ``(1, n)`` against ``(3, n)`` into three silent answers)."""
    su, sv = tuple(getattr(u, "shape", np.shape(u))), tuple(getattr(v, "shape", np.shape(v)))
    if su != sv:
        raise ValueError(f"the metrics compare images pair by pair: u and v must have the same shape, got {su} and "
                         f"{sv}")
    if len(su) < 2 or su[0] < 1 or int(np.prod(su[1:])) < 1:
        raise ValueError(f"the metrics take (M, ...) batches of M >= 1 non-empty images, got shape {su}")
    return _flat(u), _flat(v)


def pearson_r(u, v) -> np.ndarray:
    """Per-pair Pearson correlation over all entries: ``(M, ...)``, ``(M, ...)`` -> ``(M,)``."""
    u, v = _pairs(u, v)
    u = u - u.mean(1, keepdims=True)
    v = v - v.mean(1, keepdims=True)
    den = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
    return np.sum(u * v, 1) / np.where(den > 0, den, np.nan)


def r2(u, v) -> np.ndarray:
    """Per-pair coefficient of determination of ``v`` predicting ``u``: ``(M, ...)``, ``(M, ...)`` -> ``(M,)``."""
    u, v = _pairs(u, v)
    den = np.sum((u - u.mean(1, keepdims=True)) ** 2, 1)
    return 1.0 - np.sum((u - v) ** 2, 1) / np.where(den > 0, den, np.nan)


def mse(u, v) -> np.ndarray:
    """Per-pair mean squared difference: ``(M, ...)``, ``(M, ...)`` -> ``(M,)``."""
    u, v = _pairs(u, v)
    return np.mean((u - v) ** 2, 1)


METRICS = {"r": pearson_r, "R2": r2, "mse": mse}


def summary(values) -> dict:
    """Median and interquartile range (25th, 75th percentile) of per-seed values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("summary of no values: pass at least one per-seed value")
    if not np.isfinite(v).any():  # (np.nanpercentile of all-NaN values warns and returns NaN)
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "n": 0}
    q25, med, q75 = np.nanpercentile(v, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "n": int(np.sum(np.isfinite(v)))}
