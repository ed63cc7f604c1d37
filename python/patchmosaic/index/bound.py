"""The error bound of an approximate (patch index) machine, per pixel.

Let the retrieved logits of a pixel be ``l_1 >= ... >= l_m``, ``c_i`` their multiplicities (identical keys
merged into one) and ``M`` the keys of the pixel's part, counted with multiplicity. Every key not
retrieved is at least as far as the m-th, so its weight is at most ``exp(l_m)``; with
``S = sum_i c_i exp(l_i - l_1)`` the left-out mass relative to the retrieved mass is
``eps <= (M - sum_i c_i) exp(l_m - l_1) / S``, and since ``x0_hat`` is a weighted mean of centre values in
a range of width ``R``,

    |x0_hat - x0_hat_approx| <= R * eps / (1 + eps)     per pixel and channel.

Exact for a flat index; for an inverted-file index it holds *conditional on retrieval* (if the true m
nearest were found).
"""

from __future__ import annotations

import numpy as np


def error_bound(top: np.ndarray, last: np.ndarray, sum_rel: np.ndarray, used: np.ndarray, total: np.ndarray,
                value_range: np.ndarray) -> np.ndarray:
    """``R eps / (1 + eps)`` per pixel from the re-scoring's largest and smallest logits (``top``, ``last``),
    ``sum_rel = S``, the retrieved multiplicity ``used``, the part's key count ``total`` and its data range."""
    left = np.maximum(np.asarray(total) - np.asarray(used), 0)
    with np.errstate(over="ignore", invalid="ignore"):
        eps = np.where(left > 0, left * np.exp(np.asarray(last) - np.asarray(top)) / np.asarray(sum_rel), 0.0)
        return np.asarray(value_range) * np.where(np.isinf(eps), 1.0, eps / (1.0 + eps))
