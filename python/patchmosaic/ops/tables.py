"""The key-set tables the ops take: which training positions each query pixel attends to, as data.

The op layer knows no machine and no key-set rule: a machine builds its table (machines/keysets.py holds the
rules of LS, periodic and boundary-aware ELS) and hands it to an op. A :class:`KeySet` groups the query pixels
into *classes* that share one set of key positions (flat CSR arrays) and says how query and key patches are
padded; a :class:`MultiKeySet` is one table serving several patch sizes at once (a mask of sizes per key
position). The custom ops take a key set as two *class maps* (:meth:`KeySet.from_classes`): the class of every
query pixel and of every training position -- tensors a machine computes with torch operations, so that under
``torch.compile`` they are part of the graph -- and build the CSR table from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

ZEROS, CIRCULAR = 0, 1  # padding codes shared with the compiled core (contract.hpp: Padding)
PADDINGS = (ZEROS, CIRCULAR)


@dataclass(frozen=True)
class KeySet:
    """Classes of query pixels and their key positions, as flat CSR arrays.

    ``cls_qpix[cls_qpix_ptr[c]:cls_qpix_ptr[c+1]]`` are the query pixels ``i * Wq + j`` of class ``c``;
    ``cls_kpos[cls_kpos_ptr[c]:cls_kpos_ptr[c+1]]`` the training positions ``i * W + j`` of its keys.
    """

    query_pad: int
    key_pad: int
    cls_qpix_ptr: np.ndarray  # int64 (n_classes + 1,)
    cls_qpix: np.ndarray  # int32
    cls_kpos_ptr: np.ndarray  # int64 (n_classes + 1,)
    cls_kpos: np.ndarray  # int32

    @property
    def n_classes(self) -> int:
        return len(self.cls_qpix_ptr) - 1

    def classes(self):
        """Yield ``(query_pixels, key_positions)`` per class (numpy int arrays)."""
        for c in range(self.n_classes):
            yield (
                self.cls_qpix[self.cls_qpix_ptr[c] : self.cls_qpix_ptr[c + 1]],
                self.cls_kpos[self.cls_kpos_ptr[c] : self.cls_kpos_ptr[c + 1]],
            )

    def restricted(self, pixels: np.ndarray) -> "KeySet":
        """The same key set for only the query pixels where the flat boolean mask ``pixels`` is true
        (classes left without a query pixel are dropped)."""
        pixels = np.asarray(pixels, dtype=bool).ravel()
        groups = [(q[pixels[q]], k) for q, k in self.classes() if pixels[q].any()]
        return csr_keyset(groups, self.query_pad, self.key_pad)

    @property
    def n_rows_per_image(self) -> int:
        """Query pixels that have a row (all of them, unless the key set was restricted)."""
        return int(self.cls_qpix_ptr[-1])

    def n_pairs_per_image(self) -> int:
        """Query-pixel x key-position pairs for one query image and one training image."""
        nq = np.diff(self.cls_qpix_ptr)
        nk = np.diff(self.cls_kpos_ptr)
        return int(np.sum(nq * nk))

    def kind(self) -> str:
        """The shape of the table, in the names of the rules that make such tables (what a measured table of
        engine timings is keyed by, ops/triton_engine/auto.py): ``"ls"`` (one query pixel and one key position per
        class), ``"els_wrapped"`` / ``"els_circular"`` (one class, circular queries; wrapped keys or not),
        ``"els_zeros"`` (anything else: classes of pixels sharing key positions, zero padding)."""
        nq, nk = np.diff(self.cls_qpix_ptr), np.diff(self.cls_kpos_ptr)
        if self.n_classes and bool(np.all(nq == 1)) and bool(np.all(nk == 1)):
            return "ls"
        if self.n_classes == 1 and self.query_pad == CIRCULAR:
            return "els_wrapped" if self.key_pad == CIRCULAR else "els_circular"
        return "els_zeros"

    def class_maps(self, query: torch.Tensor, train: torch.Tensor):
        """The inverse of :meth:`from_classes` for queries shaped like ``query`` and training images like
        ``train``: ``(query_class, key_class, query_pad, key_pad)``. Classes with the same key positions become one
        class; classes whose key positions overlap otherwise have no class maps (a ValueError; no rule builds them).
        """
        qc = torch.full((int(query.shape[2]) * int(query.shape[3]),), -1, dtype=torch.int64)
        kc = np.full(int(train.shape[2]) * int(train.shape[3]), -1, dtype=np.int64)
        ids = {}
        for q, k in self.classes():
            key = np.sort(k).tobytes()  # (a set: a multi-size table orders a class's positions by their sizes)
            if key not in ids and bool((kc[k] >= 0).any()):
                raise ValueError("a key set whose classes share some but not all key positions has no class maps")
            c = ids.setdefault(key, len(ids))
            kc[k] = c
            qc[torch.from_numpy(q.astype(np.int64))] = c
        return qc, torch.from_numpy(kc), self.query_pad, self.key_pad

    @classmethod
    def from_classes(cls, query_class, key_class, query_pad: int, key_pad: int) -> "KeySet":
        """The key set of two class maps (the form the ops take): ``query_class[p]`` the class of query pixel ``p``
        (flat, ``Hq * Wq``; -1: not computed, its output is 0), ``key_class[q]`` the class of training position
        ``q`` (flat, ``H * W``; -1: no key). A query pixel attends to the positions of its own class in every
        training image. Classes come in ascending order of their ids, pixels and positions in ascending order.

        Raises:
            ValueError naming the first query pixel whose class no training position has, or a bad padding code.
        """
        if query_pad not in PADDINGS or key_pad not in PADDINGS:
            raise ValueError(f"padding codes are {ZEROS} (zeros) or {CIRCULAR} (circular), got query_pad={query_pad}, "
                             f"key_pad={key_pad}")
        qc = np.asarray(query_class, np.int64).ravel()
        kc = np.asarray(key_class, np.int64).ravel()
        q_ids, q_first = np.unique(qc, return_index=True)
        q_first = q_first[q_ids >= 0]
        q_ids = q_ids[q_ids >= 0]
        k_ids = np.unique(kc[kc >= 0])
        missing = ~np.isin(q_ids, k_ids)
        if missing.any():
            p = int(q_first[np.argmax(missing)])
            raise ValueError(f"no training position has the key class {int(q_ids[missing][0])} of query pixel {p} "
                             "(flat index): the key set of this canvas and patch size is empty there")
        q_order = np.argsort(qc, kind="stable")
        qpix = q_order[np.searchsorted(qc[q_order], 0):]  # the pixels of classes >= 0, class by class
        k_order = np.argsort(kc, kind="stable")
        k_sorted = kc[k_order]
        used = np.isin(k_sorted, q_ids)  # positions of a class some pixel has, class by class
        kpos, k_used = k_order[used], k_sorted[used]
        qptr = np.zeros(len(q_ids) + 1, np.int64)
        kptr = np.zeros(len(q_ids) + 1, np.int64)
        qptr[1:] = np.searchsorted(qc[qpix], q_ids, side="right")
        kptr[1:] = np.searchsorted(k_used, q_ids, side="right")
        return cls(int(query_pad), int(key_pad), qptr, qpix.astype(np.int32), kptr, kpos.astype(np.int32))


def csr_keyset(groups: List[Tuple[np.ndarray, np.ndarray]], query_pad: int, key_pad: int) -> KeySet:
    """A :class:`KeySet` of ``groups``: ``(query_pixels, key_positions)`` per class."""
    qp = np.zeros(len(groups) + 1, dtype=np.int64)
    kp = np.zeros(len(groups) + 1, dtype=np.int64)
    qp[1:] = np.cumsum([len(q) for q, _ in groups])
    kp[1:] = np.cumsum([len(k) for _, k in groups])
    qs = np.concatenate([q for q, _ in groups]).astype(np.int32) if groups else np.zeros(0, np.int32)
    ks = np.concatenate([k for _, k in groups]).astype(np.int32) if groups else np.zeros(0, np.int32)
    return KeySet(query_pad, key_pad, qp, qs, kp, ks)


MAX_MULTI_K = 32  # sizes of one multi-size pass (bits of a key position's mask; validate.hpp kMaxMultiK)


@dataclass(frozen=True)
class MultiKeySet:
    """The key sets of one machine at several patch sizes ``ks`` (strictly increasing), for a pass that computes
    every size at once (the compiled engines' ``local_forward_multi``, CPU and CUDA).

    Bit ``j`` of ``kmask[e]`` (uint32, one per entry of ``keyset.cls_kpos``) is set when position
    ``keyset.cls_kpos[e]`` is one of its class's keys at size ``ks[j]``. A class of ``keyset`` computes, for its
    query pixels, the sizes its positions serve (the union of their masks); every query pixel is in exactly one
    class that computes a given size. Within a class, positions come in the order of the largest size they serve
    (descending), then position, so that a block of consecutive keys needs dot products up to about the same size.
    """

    ks: Tuple[int, ...]
    keyset: KeySet
    kmask: np.ndarray  # uint32 (len(keyset.cls_kpos),)

    def size_keyset(self, j: int) -> KeySet:
        """The key set at size ``ks[j]`` alone, recovered from the masks: the classes that compute that size."""
        groups = []
        for c, (q, k) in enumerate(self.keyset.classes()):
            m = self.kmask[self.keyset.cls_kpos_ptr[c] : self.keyset.cls_kpos_ptr[c + 1]]
            serves = (m >> np.uint32(j)) & np.uint32(1) == 1
            if serves.any():
                groups.append((q, k[serves]))
        return csr_keyset(groups, self.keyset.query_pad, self.keyset.key_pad)


@dataclass(frozen=True)
class ElementTable:
    """The rows of a same-position machine (contract.hpp, AlignedCall), as flat CSR arrays over the elements
    ``e = c * H * W + i * W + j`` of an image.

    Row ``r`` is a softmax over the training images at the query's own positions: its neighbourhood is
    ``hood_elem[hood_ptr[r]:hood_ptr[r+1]]`` (ascending, distinct) with weights ``hood_weight`` (> 0; None: all
    1), its logit for image ``n`` is ``-sum_e w_e (x[e] - a phi_n[e])^2 / (2 b^2)``, and its response is the
    elements ``resp_elem[resp_ptr[r]:resp_ptr[r+1]]`` whose values it averages. LS is a row per pixel, its
    neighbourhood the ``C k^2`` elements of its square patch inside the image, its response the pixel's ``C``
    channels; PCA-locality a row per element, its neighbourhood a thresholded Wiener mask, its response the element.
    """

    hood_ptr: np.ndarray  # int64 (n_rows + 1,)
    hood_elem: np.ndarray  # int32 (n_hood,)
    hood_weight: Optional[np.ndarray]  # float64 (n_hood,) or None
    resp_ptr: np.ndarray  # int64 (n_rows + 1,)
    resp_elem: np.ndarray  # int32 (n_resp,)
    # values derived from these arrays at their first use and kept with them: the CPU engine's plans
    # (engines.hood_plan, per module and dtype), the largest weight sum
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return len(self.hood_ptr) - 1

    def __deepcopy__(self, memo) -> "ElementTable":
        """A copy of the arrays, without what was derived from them (an engine's plan is not copied)."""
        return ElementTable(*(None if v is None else v.copy() for v in
                              (self.hood_ptr, self.hood_elem, self.hood_weight, self.resp_ptr, self.resp_elem)))

    def tensors(self) -> List[Optional[torch.Tensor]]:
        """``[hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem]`` as the op takes them (int64, float64 CPU
        tensors; ``hood_weight`` None when every weight is 1)."""
        w = None if self.hood_weight is None else torch.from_numpy(self.hood_weight)
        return [torch.from_numpy(self.hood_ptr), torch.from_numpy(self.hood_elem.astype(np.int64)), w,
                torch.from_numpy(self.resp_ptr), torch.from_numpy(self.resp_elem.astype(np.int64))]

    @classmethod
    def from_tensors(cls, hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, D: int) -> "ElementTable":
        """The table of an op's arguments, checked against ``D`` elements per image: a ValueError names what is
        wrong (the compiled core checks it again, validate.hpp)."""
        arrays = []
        for name, t in (("hood_ptr", hood_ptr), ("hood_elem", hood_elem), ("resp_ptr", resp_ptr),
                        ("resp_elem", resp_elem)):
            if not torch.is_tensor(t) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"element table: {name} must be a 1-d integer tensor")
            v = t.detach().cpu().numpy()
            if name.endswith("_ptr"):  # offsets: int64, as the compiled core reads them
                arrays.append(v.astype(np.int64, copy=False))
            else:  # elements: no copy of a large int32 table
                arrays.append(v if v.dtype in (np.int32, np.int64) else v.astype(np.int64))
        hp, he, rp, re = arrays
        if len(rp) != len(hp):
            raise ValueError("element table: hood_ptr and resp_ptr must have the same rows (one entry per row plus one)")
        for name, ptr, vals, least in (("hood", hp, he, 0), ("resp", rp, re, 1)):
            if len(ptr) < 1 or ptr[0] != 0 or ptr[-1] != len(vals) or bool(np.any(np.diff(ptr) < least)):
                raise ValueError(f"element table: {name}_ptr must rise from 0 to the number of entries"
                                 + (", by at least one per row (every row has a response)" if least else ""))
            if len(vals) and (int(vals.min()) < 0 or int(vals.max()) >= D):
                raise ValueError(f"element table: {name}_elem holds an element outside 0..{D - 1}")
        rising = he[1:] > he[:-1]
        bounds = hp[1:-1]
        rising[bounds[(bounds > 0) & (bounds < len(he))] - 1] = True  # a row's first element follows another row's
        if not bool(rising.all()):
            raise ValueError("element table: each row's neighbourhood elements must be ascending and distinct")
        w = None
        if hood_weight is not None:
            w = hood_weight.detach().cpu().numpy().astype(np.float64)
            if w.shape != he.shape or not bool(np.all(np.isfinite(w) & (w > 0))):
                raise ValueError("element table: hood_weight needs one finite weight > 0 per neighbourhood element")
        return cls(np.ascontiguousarray(hp), np.ascontiguousarray(he, np.int32), w, np.ascontiguousarray(rp),
                   np.ascontiguousarray(re, np.int32))

    def largest_weight_sum(self) -> float:
        """The largest sum of a row's neighbourhood weights (the factor of ``(max|x| + max|train|)^2`` in the
        largest possible distance; ops/checks.py, ``scale``)."""
        if "largest_weight_sum" not in self.derived:
            if self.hood_weight is None:
                value = float(np.diff(self.hood_ptr).max(initial=0))
            else:
                total = np.concatenate([[0.0], np.cumsum(self.hood_weight)])
                value = float((total[self.hood_ptr[1:]] - total[self.hood_ptr[:-1]]).max(initial=0.0))
            self.derived["largest_weight_sum"] = value
        return self.derived["largest_weight_sum"]

    def runs_per_row(self) -> float:
        """The average number of runs (maximal sequences of consecutive elements of one weight) per row: the
        CPU engine's work per row and training image."""
        he = self.hood_elem.astype(np.int64)
        brk = np.ones(len(he), bool)
        brk[1:] = np.diff(he) != 1
        if self.hood_weight is not None:
            brk[1:] |= np.diff(self.hood_weight) != 0
        brk[self.hood_ptr[:-1][np.diff(self.hood_ptr) > 0]] = True
        return float(brk.sum()) / max(1, self.n_rows)
