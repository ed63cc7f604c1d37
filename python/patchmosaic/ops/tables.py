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

from dataclasses import dataclass
from typing import List, Tuple

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

    def class_maps(self, query: torch.Tensor, train: torch.Tensor):
        """The inverse of :meth:`from_classes` for queries shaped like ``query`` and training images like
        ``train``: ``(query_class, key_class, query_pad, key_pad)``. Classes with the same key positions become one
        class; classes whose key positions overlap otherwise have no class maps (a ValueError; no rule builds them).
        """
        qc = torch.full((int(query.shape[2]) * int(query.shape[3]),), -1, dtype=torch.int64)
        kc = np.full(int(train.shape[2]) * int(train.shape[3]), -1, dtype=np.int64)
        ids = {}
        for q, k in self.classes():
            key = k.tobytes()
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

