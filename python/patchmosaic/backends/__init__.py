"""Engines behind the machines. Each provides two functions with one calling convention:

``local(train, query, k, keyset, a, inv_2b2, groups, provenance) -> (out, arg_key, arg_share)``
    the streaming patch softmax for LS / ELS / boundary-aware ELS;
``ideal(train, query, a, inv_2b2, groups, provenance) -> (out, arg_key, arg_share)``
    the ideal score machine.

``train`` ``(N, C, H, W)`` and ``query`` ``(B, C, Hq, Wq)`` are torch tensors of one float dtype;
``a`` and ``inv_2b2`` float64 numpy ``(B,)``; ``groups`` a :class:`Groups`. ``arg_key`` (int64) holds
``n * H * W + i * W + j`` of the highest-weight key per output pixel (``n`` for IS) and
``arg_share`` that key's share of the total weight; both are ``None`` unless ``provenance``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Groups:
    """Training images per query image (class conditioning), as CSR arrays."""

    grp_img_ptr: np.ndarray  # int64 (n_groups + 1,)
    grp_img: np.ndarray  # int32 training image indices
    group_of_b: np.ndarray  # int32 (B,)

    def images(self, g: int) -> np.ndarray:
        return self.grp_img[self.grp_img_ptr[g] : self.grp_img_ptr[g + 1]]


BACKENDS = ("auto", "cpu", "torch", "cuda")


def get_backend(name: str):
    """The module implementing backend ``name`` (``cpu``, ``torch`` or ``cuda``)."""
    if name == "cpu":
        from . import cpu

        return cpu
    if name == "torch":
        from . import torch_ref

        return torch_ref
    if name == "cuda":
        from . import cuda

        return cuda
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
