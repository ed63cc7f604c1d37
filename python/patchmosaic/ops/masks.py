"""Masked neighbourhoods of the local machines: a boolean or weighted ``k x k`` mask in place of the square patch.

A mask ``w`` (``k`` odd, ``w >= 0``, centre ``> 0``) changes the squared distance of spec section 2 to

    || P_p(x_t) - a q ||^2_w = sum_{c, di, dj} w[di, dj] (P_p(x_t)[c, di, dj] - a q[c, di, dj])^2

(the same weight for every channel); a boolean mask is the weights 0 and 1. Only the elements with ``w > 0`` are
gathered: the compiled engines take them as a table of element codes (contract.hpp, ``elem``: channel << 24 |
row offset << 12 | column offset, the order of the square patch) with their scales ``sqrt(w)`` (``elem_scale``,
left out when every weight is 1), and multiply query and key elements by the scale, so that the engines' dot
products give the weighted distance. The key set stays that of the ``k x k`` frame (for boundary-aware ELS, the
padding signature at size ``k``), so a full mask of ones is the square machine exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .tables import KeySet, csr_keyset


@dataclass(frozen=True)
class PatchElements:
    """The element table of a masked patch (contract.hpp): ``codes`` int32 ``(n,)``, ``scale`` float64 ``(n,)``
    (``sqrt`` of the weights) or None when every weight is 1; ``cls_ptr`` int64 ``(n_classes + 1,)``: each
    class's part of the table (a mask per class), or None (one table for every class)."""

    codes: np.ndarray
    scale: Optional[np.ndarray]
    cls_ptr: Optional[np.ndarray] = None


def check_patch_mask(mask, name: str = "patch_mask") -> torch.Tensor:
    """The weights of a neighbourhood mask as a float64 ``(k, k)`` CPU tensor (one mask shared by every pixel) or
    ``(Hq, Wq, k, k)`` (one per query pixel), or a ValueError / TypeError naming what is wrong with it.

    Args:
        mask: a ``(k, k)`` or ``(Hq, Wq, k, k)`` array or tensor (numpy, torch or nested lists), boolean (True:
            the element is in the neighbourhood) or real (non-negative finite weights; 0: left out); ``k`` odd,
            and every mask's centre element in its neighbourhood (True or a positive weight).
        name: the argument's name in the messages.

    Under ``torch.compile`` only the type and shape are checked here (no value is read while tracing); the ops
    that take a mask check its values when they run.
    """
    if isinstance(mask, np.ndarray) and torch.compiler.is_compiling():  # (torch.compile traces it as a tensor)
        t = torch.from_numpy(mask)
    elif torch.is_tensor(mask):
        t = mask.detach().cpu()
    else:
        arr = np.asarray(mask)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a boolean or real array of shape (k, k), got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex() or not (t.dtype == torch.bool or t.is_floating_point() or t.dtype in
                              (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a boolean or real array of shape (k, k), got dtype {t.dtype}")
    if t.dim() not in (2, 4) or t.shape[-2] != t.shape[-1] or min(t.shape) < 1:
        raise ValueError(f"{name} must be a square (k, k) array (or (Hq, Wq, k, k): one per query pixel), got "
                         f"shape {tuple(t.shape)}")
    k = int(t.shape[-1])
    if k % 2 == 0:
        raise ValueError(f"{name} must have an odd size k (its centre is the pixel denoised), got {k}x{k}")
    w = t.to(torch.float64)
    if torch.compiler.is_compiling():  # the values are the op's to check, when the graph runs (library.py)
        return w.contiguous()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} holds NaN or infinite weights")
    if bool((w < 0).any()):
        raise ValueError(f"{name} holds negative weights (weights must be >= 0; 0 leaves an element out)")
    off = ~(w[..., k // 2, k // 2] > 0)
    if bool(off.any()):
        where = "" if w.dim() == 2 else f" (the mask of query pixel {tuple(int(v) for v in off.nonzero()[0])})"
        raise ValueError(f"{name} must include its centre element ({k // 2}, {k // 2}): the pixel being "
                         f"denoised{where}")
    return w.contiguous()


def split_by_mask(keyset: KeySet, weights: torch.Tensor) -> Tuple[KeySet, np.ndarray, torch.Tensor]:
    """A mask per query pixel (``weights`` ``(Hq, Wq, k, k)``) on a key set -> ``(keyset, mask_of_class,
    distinct)``: the key set's classes split so that the pixels of a class share one mask (pixels of a class with
    equal masks stay together), the index of each class's mask, and the distinct masks ``(n, k, k)``."""
    k = weights.shape[-1]
    flat = weights.reshape(-1, k * k).numpy()
    distinct, inverse = np.unique(flat, axis=0, return_inverse=True)
    mask_id = inverse.reshape(-1)
    groups, ids = [], []
    for qpix, kpos in keyset.classes():
        m = mask_id[qpix]
        if bool(np.all(m == m[0])):  # the usual case (and every LS class: one pixel)
            groups.append((qpix, kpos))
            ids.append(int(m[0]))
            continue
        order = np.argsort(m, kind="stable")
        cuts = np.nonzero(np.diff(m[order]))[0] + 1
        for part in np.split(order, cuts):
            groups.append((qpix[np.sort(part)], kpos))
            ids.append(int(m[part[0]]))
    return (csr_keyset(groups, keyset.query_pad, keyset.key_pad), np.asarray(ids, np.int64),
            torch.from_numpy(distinct.reshape(-1, k, k)))


def class_elements(mask_of_class: np.ndarray, distinct: torch.Tensor, C: int) -> PatchElements:
    """The element table of a mask per class (``distinct[mask_of_class[c]]`` for class ``c``): the classes'
    tables one after the other, with their offsets."""
    tables = [patch_elements(w, C, square=True) for w in distinct]
    parts = [tables[i] for i in mask_of_class]
    ptr = np.zeros(len(parts) + 1, np.int64)
    ptr[1:] = np.cumsum([len(p.codes) for p in parts])
    codes = np.ascontiguousarray(np.concatenate([p.codes for p in parts]), dtype=np.int32)
    scale = None
    if any(t.scale is not None for t in tables):
        scale = np.concatenate([np.ones(len(p.codes)) if p.scale is None else p.scale for p in parts])
        scale = np.ascontiguousarray(scale, dtype=np.float64)
    return PatchElements(codes, scale, ptr)


def patch_elements(weights: torch.Tensor, C: int, square: bool = False) -> Optional[PatchElements]:
    """The element table of the mask ``weights`` (a checked float64 ``(k, k)`` tensor) for ``C`` channels, or
    None when the mask is the full square of ones (the engines' square patch, no table). ``square=True`` returns
    the table even then (for tests of the masked path)."""
    w = weights.detach().cpu().numpy()
    k = w.shape[0]
    rows, cols = np.nonzero(w > 0)  # row-major: the square patch's order
    if not square and len(rows) == k * k and bool(np.all(w == 1.0)):
        return None
    ch = np.repeat(np.arange(C, dtype=np.int64), len(rows))
    codes = (ch << 24) | (np.tile(rows, C).astype(np.int64) << 12) | np.tile(cols, C).astype(np.int64)
    vals = np.tile(w[rows, cols], C)
    scale = None if bool(np.all(vals == 1.0)) else np.ascontiguousarray(np.sqrt(vals), dtype=np.float64)
    return PatchElements(np.ascontiguousarray(codes, dtype=np.int32), scale)


def element_weights(weights: torch.Tensor, C: int, like: torch.Tensor) -> torch.Tensor:
    """The weight of every element of a ``C x k x k`` patch (order of the square patch) as a ``(C k^2,)`` tensor
    of ``like``'s dtype and device: the torch reference's form of the mask."""
    return weights.reshape(1, -1).expand(C, -1).reshape(-1).to(device=like.device, dtype=like.dtype)


def crop_patch_mask(weights: torch.Tensor, k: int) -> torch.Tensor:
    """The central ``k x k`` part of a larger mask (or of each mask of a mask per pixel). For zero padding, a
    patch past the images' size only adds padded zeros to both query and key: the machines compute such a ``k``
    as the largest useful one."""
    K = weights.shape[-1]
    if k >= K:
        return weights
    o = (K - k) // 2
    return weights[..., o : o + k, o : o + k].contiguous()


def gaussian_mask(k: int, width: float) -> torch.Tensor:
    """A soft ``k x k`` neighbourhood (odd ``k``): the weight ``exp(-d^2 / (2 width^2))`` of each element, ``d`` its
    distance in pixels from the centre (whose weight is 1); float64. A ``patch_mask`` for LS and ELS (the soft query
    precision of the filtered posterior mean collections); cropping it to a smaller ``k`` gives the same Gaussian."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
        raise ValueError(f"gaussian_mask: k must be an odd positive int, got {k!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float, np.floating, np.integer)) or not 0 < width < np.inf:
        raise ValueError(f"gaussian_mask: width must be a finite number > 0, got {width!r}")
    u = torch.arange(k, dtype=torch.float64) - k // 2
    return torch.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2.0 * float(width) ** 2))
