"""The error bound of an approximate (patch index) machine, per pixel.

Let the retrieved logits of a pixel be ``l_1 >= ... >= l_m``, ``c_i`` their multiplicities (identical keys
merged into one) and ``M`` the keys of the pixel's part, counted with multiplicity. Every key not
retrieved is at least as far as the m-th, so its weight is at most ``exp(l_m)``; with
``S = sum_i c_i exp(l_i - l_1)`` the left-out mass relative to the retrieved mass is
``eps <= (M - sum_i c_i) exp(l_m - l_1) / S``, and since ``x0_hat`` is a weighted mean of centre values in
a range of width ``R``,

    |x0_hat - x0_hat_approx| <= R * eps / (1 + eps)     per pixel and channel.

FAISS ranks the keys by float32 distances, so a key left out may be nearer than the m-th retrieved one by the
rounding of two float32 distances; ``l_m`` above is therefore taken plus that rounding's bound in logits
(``query.ranking_slack``). With it the bound is a guarantee for a flat index; for an inverted-file index it holds
*conditional on retrieval* (if the probed lists held the m nearest).
"""

from __future__ import annotations

import numpy as np


def left_mass(top: np.ndarray, last: np.ndarray, used: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Per pixel, an upper bound on the weight of the keys the retrieval left out, relative to the largest
    retrieved weight: ``(M - U) exp(l_m - l_1)`` (``total = M``, ``used = U``; 0 when nothing was left out).
    Divided by ``S`` it is the ``eps`` above; as a mass it adds across shards of the keys (merge.py)."""
    left = np.maximum(np.asarray(total, dtype=np.float64) - np.asarray(used, dtype=np.float64), 0)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(left > 0, left * np.exp(np.asarray(last) - np.asarray(top)), 0.0)


def bound_from_mass(left: np.ndarray, sum_rel: np.ndarray, value_range) -> np.ndarray:
    """``R eps / (1 + eps)`` with ``eps = left / sum_rel``: the bound on ``|x0_hat - x0_hat_approx|`` when the
    retrieved keys have mass ``sum_rel`` and the left-out ones at most ``left`` (same reference weight), and
    every centre lies in a range of width ``R``. Rows with ``left = 0`` have bound 0."""
    left, sum_rel = np.asarray(left, dtype=np.float64), np.asarray(sum_rel, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        eps = np.where(left > 0, left / sum_rel, 0.0)
        return np.asarray(value_range) * np.where(np.isinf(eps) | np.isnan(eps), 1.0, eps / (1.0 + eps))


def error_bound(top: np.ndarray, last: np.ndarray, sum_rel: np.ndarray, used: np.ndarray, total: np.ndarray,
                value_range: np.ndarray) -> np.ndarray:
    """``R eps / (1 + eps)`` per pixel from the re-scoring's largest and smallest logits (``top``, ``last``),
    ``sum_rel = S``, the retrieved multiplicity ``used``, the part's key count ``total`` and its data range."""
    return bound_from_mass(left_mass(top, last, used, total), sum_rel, value_range)
