"""Training images by label, and the image group of each query image (class conditioning).

A machine built with labels keeps a :class:`LabelIndex`: the distinct labels in ascending order and the
training images of each (CSR arrays). An op call turns the query labels into ``group_of_b`` (the index of
each query's label) over the same CSR arrays, so the compiled engines see one image group per label.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..validation import constant


@dataclass(frozen=True)
class Groups:
    """Training images per query image, as the engines read them (host arrays)."""

    grp_img_ptr: np.ndarray  # int64 (n_groups + 1,)
    grp_img: np.ndarray  # int32 training image indices
    group_of_b: np.ndarray  # int32 (B,)

    def images(self, g: int) -> np.ndarray:
        return self.grp_img[self.grp_img_ptr[g] : self.grp_img_ptr[g + 1]]


@dataclass(frozen=True)
class LabelIndex:
    """The distinct training labels (ascending) and the images of each: images ``images[ptr[i]:ptr[i+1]]``
    have label ``values[i]``. ``tensors`` holds the same as CPU tensors (the ops' arguments)."""

    values: np.ndarray  # int64 (L,)
    ptr: np.ndarray  # int64 (L + 1,)
    images: np.ndarray  # int32 (N,)

    @classmethod
    def from_labels(cls, labels: Optional[np.ndarray]) -> "LabelIndex":
        if labels is None:
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32))
        labels = np.asarray(labels, np.int64)
        order = np.argsort(labels, kind="stable")
        values, counts = np.unique(labels, return_counts=True)
        ptr = np.zeros(len(values) + 1, np.int64)
        ptr[1:] = np.cumsum(counts)
        return cls(values, ptr, order.astype(np.int32))

    def by_label(self) -> dict:
        """``{label: training image indices}`` in ascending label order."""
        return {int(v): self.images[self.ptr[i] : self.ptr[i + 1]] for i, v in enumerate(self.values)}

    def tensors(self):
        return (torch.from_numpy(self.values), torch.from_numpy(self.ptr), torch.from_numpy(self.images))


@functools.lru_cache(maxsize=16)
def _all_images(N: int):
    ptr = np.array([0, N], np.int64)
    img = np.arange(N, dtype=np.int32)
    ptr.flags.writeable = img.flags.writeable = False
    return ptr, img


def groups(labels: Optional[torch.Tensor], values: torch.Tensor, ptr: torch.Tensor, images: torch.Tensor, N: int,
           B: int) -> Groups:
    """The image groups of a call: every training image when ``labels`` is None, else the images of each
    query's label. A ValueError names a label no training image has."""
    if labels is None:
        p, img = _all_images(int(N))
        return Groups(p, img, np.zeros(B, np.int32))
    lab = constant(labels).astype(np.int64).reshape(-1)
    vals, p, img = constant(values), constant(ptr), constant(images)
    # the label index as the engines read it (an op's caller may pass its own): offsets rising from 0 to the
    # number of images, images in 0..N-1, labels ascending (every engine refuses the same tables alike)
    if vals.ndim != 1 or p.ndim != 1 or img.ndim != 1 or len(p) != len(vals) + 1 or (len(p) and p[0] != 0) \
            or bool(np.any(np.diff(p) < 0)) or p[-1] != len(img) or bool(np.any(np.diff(vals) <= 0)):
        raise ValueError("label index: label_values must be ascending and label_ptr rise from 0 to the length of "
                         f"label_images, one more entry than labels (got {len(vals)} labels, label_ptr "
                         f"{p.tolist() if len(p) <= 12 else p.shape}, {len(img)} images)")
    if len(img) and (int(img.min()) < 0 or int(img.max()) >= int(N)):
        raise ValueError(f"label index: label_images holds an index outside 0..{int(N) - 1}")
    idx = np.searchsorted(vals, lab)
    idx_c = np.minimum(idx, max(len(vals) - 1, 0))
    ok = (idx < len(vals)) & (vals[idx_c] == lab) if len(vals) else np.zeros(len(lab), bool)
    if not ok.all():
        bad = int(lab[~ok][0])
        raise ValueError(f"label {bad} has no training images (known labels: {vals.tolist()})")
    empty = p[idx + 1] == p[idx]
    if bool(empty.any()):
        raise ValueError(f"label {int(lab[empty][0])} has no training images (its group in label_ptr is empty)")
    return Groups(np.ascontiguousarray(p, np.int64), np.ascontiguousarray(img, np.int32), idx.astype(np.int32))
