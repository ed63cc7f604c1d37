"""Indexes built once per machine, patch size, canvas and settings, kept for the machine's lifetime."""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

from ..ops.masks import check_patch_mask
from .patch_index import PatchIndex

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_index(machine, k: int, canvas: Optional[Tuple[int, int]] = None, **index_kw) -> PatchIndex:
    """The :class:`PatchIndex` of ``machine`` at ``k`` for ``canvas`` queries with ``index_kw`` (``kind``,
    ``nprobe``, ...): built on first use, then the same object while the machine lives."""
    per_machine = _CACHE.setdefault(machine, {})
    key = (int(k), None if canvas is None else tuple(canvas),
           tuple(sorted((name, _setting_key(name, v)) for name, v in index_kw.items())))
    if key not in per_machine:
        per_machine[key] = PatchIndex(machine, int(k), canvas, progress=False, **index_kw)
    return per_machine[key]


def _setting_key(name: str, value):
    """A hashable stand-in for one index setting: a neighbourhood mask (numpy, torch or lists) by its values, so
    that equal masks share an index and a mask changed in place later does not find the old one."""
    if name == "patch_mask" and value is not None:
        w = check_patch_mask(value).numpy()
        return ("mask", w.shape, w.tobytes())
    return value


def approx_denoise(machine, x, t, k: int, labels=None, *, m: int = 64, **index_kw):
    """The approximate machine through its cached index (:func:`cached_index`): the softmax over the ``m``
    nearest keys per pixel, re-scored exactly, with the per-pixel error bound (an ``ApproxResult``)."""
    return cached_index(machine, k, tuple(x.shape[-2:]), **index_kw).denoise(x, t, labels, m)
