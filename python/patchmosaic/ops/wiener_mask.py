"""The PCA-locality machine's masks (machines/pca_locality.py), exactly and fast: the noise level's Wiener matrix
``L = U diag(w) U^T`` as a float32 product with a bound on its error, and the compiled search
(cpu/wiener_mask.cpp) that decides each entry ``|L[m, n]| / L[n, n] >= theta max`` by the bound where it can and
recomputes it in float64 where it cannot: the masks of the float64 matrix, at the cost of a float32 product."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from . import engines

F32_UNIT = 2.0 ** -24  # float32 unit roundoff
F32_TINY = 2.0 ** -126  # smallest normal float32
TAIL_BLOCK = 32  # trailing columns tried at a time when the float32 product leaves some out
CHUNK = 2048  # columns per float32 product when there are more (each product's error bound grows with its length)


def wiener_masks(U: torch.Tensor, U2: torch.Tensor, U32: torch.Tensor, shrink: torch.Tensor, n_threads: int = 0):
    """The arguments of the compiled mask search (cpu/wiener_mask.cpp) for the Wiener matrix ``L = U diag(w) U^T``
    (``U`` float64 ``(D, r)``, columns by decreasing variance; ``U2 = U * U``, ``U32`` = ``U`` in float32; ``w`` =
    ``shrink``): ``L`` approximated by a float32 product of the leading columns (a fraction of the float64
    product's time), and a bound on the approximation's error that lets each entry be decided exactly:

        |L32 - L| <= c sqrt(L_mm L_nn) + tail_m tail_n + eta

    -- ``c``: rounding ``V = U diag(w)^(1/2)`` to float32 (three roundings per entry, ``6u`` in a product), then
    float32 dot products of ``r'`` terms (``gamma_r' = r' u / (1 - r' u)``; beyond :data:`CHUNK` columns, products
    of ``CHUNK`` columns summed in float64: ``gamma_CHUNK``) times ``sum_k |V_mk V_nk| <= sqrt(L_mm L_nn)``;
    ``tail_m``: the norm of row ``m``'s part left out (trailing columns, dropped while that costs each row at most
    the rounding's error, and entries below ``1e-18``, whose products would be float32 denormals); ``eta``:
    underflow. Each row's diagonal is divided by 1 below 1e-6. Returns ``(L32, U, w, inv_dd, sq, s, tail,
    p, t, c, n_threads)`` (numpy arrays and numbers)."""
    D, r = U.shape
    d = U2 @ shrink  # the diagonal of L, float64
    dd = d.clone()
    dd[dd.abs() < 1e-6] = 1.0
    inv_dd = 1.0 / dd
    u = F32_UNIT
    span = min(r, CHUNK)  # the float32 dot products' length: chunks of columns, summed in float64 when r is larger
    c = 1.01 * (6.1 * u + span * u / (1 - span * u) * (1 + 3.1 * u) ** 2 + (r // CHUNK + 1) * 2.0 ** -52)
    limit = (c * c) * d
    rest = torch.zeros(D, dtype=torch.float64)  # the squared norm of each row's dropped columns
    keep = r
    while keep > 1:
        k0 = max(1, keep - TAIL_BLOCK)
        more = rest + U2[:, k0:keep] @ shrink[k0:keep]
        if not bool((more <= limit).all()):
            break
        rest, keep = more, k0
    V32 = U32[:, :keep] * shrink[:keep].sqrt().to(torch.float32)
    V32 = torch.where(V32.abs() < 1e-18, torch.zeros((), dtype=torch.float32), V32)
    with full_float32_products():
        if keep <= CHUNK:
            L32 = symmetric_product(V32)
        else:  # float32 products of CHUNK columns each, summed in float64: a bound CHUNK / r times as tight
            L32 = torch.zeros((D, D), dtype=torch.float64)
            for k0 in range(0, keep, CHUNK):
                L32 += symmetric_product(V32[:, k0 : k0 + CHUNK].contiguous())
    eta = 2.0 * keep * F32_TINY
    sq, tail = d.sqrt(), (rest + keep * 1e-36).sqrt() * 1.01
    return (L32.numpy(), U.numpy(), shrink.numpy(), inv_dd.numpy(), sq.numpy(), (sq * inv_dd).numpy(), tail.numpy(),
            (tail * inv_dd).numpy(), (eta * inv_dd).numpy(), c, int(n_threads))


def symmetric_product(V: torch.Tensor) -> torch.Tensor:
    """``V V^T``, exactly symmetric, from the products of the row blocks on and above the diagonal (``k`` blocks:
    ``(k + 1) / 2k`` of the full product's work; the blocks below are their transposes): a quarter less time on
    CIFAR-10's ``3,072 x 3,072``."""
    D = V.shape[0]
    k = 4 if D >= 2048 else 2 if D >= 512 else 1
    if k == 1:
        return V @ V.T
    edge = [D * i // k for i in range(k + 1)]
    L = torch.empty((D, D), dtype=V.dtype)
    for i in range(k):
        L[edge[i] : edge[i + 1], edge[i] :] = V[edge[i] : edge[i + 1]] @ V[edge[i] :].T
    for i in range(k):
        for j in range(i):
            L[edge[i] : edge[i + 1], edge[j] : edge[j + 1]] = L[edge[j] : edge[j + 1], edge[i] : edge[i + 1]].T
    return L


class full_float32_products:
    """Float32 matrix products in full float32 precision inside the block (a user's
    ``torch.set_float32_matmul_precision("medium")`` could otherwise let them run in bfloat16, outside the error
    bound that decides the masks)."""

    def __enter__(self):
        self._old = torch.get_float32_matmul_precision()
        if self._old != "highest":
            torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        if self._old != "highest":
            torch.set_float32_matmul_precision(self._old)
        return False


def wiener_mask_max(args) -> Tuple[float, int]:
    """``max_{m, n} |L[m, n]| / dd[n]`` (exact) of :func:`wiener_masks`' arguments -> ``(max, entries recomputed)``."""
    return engines.CPU.module.wiener_mask_max(*args)


def wiener_mask_rows(args, tau: float) -> Tuple[np.ndarray, np.ndarray, int]:
    """Each output element's neighbourhood ``{n : |L[m, n]| / dd[n] >= tau}`` (exact) as CSR: ``(ptr int64 (D + 1,),
    elem int32, entries recomputed)``."""
    return engines.CPU.module.wiener_mask_rows(*args[:-1], float(tau), args[-1])
