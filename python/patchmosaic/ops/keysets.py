"""Key sets of the local machines: which training positions each query pixel attends to (spec section 2).

Every local machine is one streaming softmax over a different key set. A :class:`KeySet` groups the
query pixels into *classes* that share one set of key positions, and says how query and key
patches are padded:

==============  ===================================  ==========================================
machine         classes of query pixels              key positions of a class
==============  ===================================  ==========================================
LS              each pixel alone                     the same pixel of every training image
ELS periodic    one class with every pixel           every fully-inside position (or every
                                                     position, wrapped)
ELS zeros       pixels with one padding signature    training positions with that signature
==============  ===================================  ==========================================

The padding signature (boundary-aware ELS, the paper's eq. 41) is separable: the signature of
``(i, j)`` is the row signature of ``i`` times the column signature of ``j``, so the classes are the
products of row classes and column classes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

ZEROS, CIRCULAR = 0, 1  # padding codes shared with the compiled core (contract.hpp: Padding)

# The key-set rules of the local machines, by name (the ops take the name; the key set is built here).
RULES = ("ls", "els_zeros", "els_circular", "els_wrapped")


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
        return _csr(groups, self.query_pad, self.key_pad)

    @property
    def n_rows_per_image(self) -> int:
        """Query pixels that have a row (all of them, unless the key set was restricted)."""
        return int(self.cls_qpix_ptr[-1])

    def n_pairs_per_image(self) -> int:
        """Query-pixel x key-position pairs for one query image and one training image."""
        nq = np.diff(self.cls_qpix_ptr)
        nk = np.diff(self.cls_kpos_ptr)
        return int(np.sum(nq * nk))


def _csr(groups: List[Tuple[np.ndarray, np.ndarray]], query_pad: int, key_pad: int) -> KeySet:
    qp = np.zeros(len(groups) + 1, dtype=np.int64)
    kp = np.zeros(len(groups) + 1, dtype=np.int64)
    qp[1:] = np.cumsum([len(q) for q, _ in groups])
    kp[1:] = np.cumsum([len(k) for _, k in groups])
    qs = np.concatenate([q for q, _ in groups]).astype(np.int32) if groups else np.zeros(0, np.int32)
    ks = np.concatenate([k for _, k in groups]).astype(np.int32) if groups else np.zeros(0, np.int32)
    return KeySet(query_pad, key_pad, qp, qs, kp, ks)


def axis_signature(i: int, n: int, r: int) -> Tuple[int, int]:
    """Padded rows (or columns) before and after a patch of radius ``r`` centred at ``i`` of ``n``."""
    return (max(0, r - i), max(0, i + r - (n - 1)))


def padding_signature(i: int, j: int, Hq: int, Wq: int, r: int) -> Tuple[int, int, int, int]:
    """The spec's ``sig(i, j)``: padded rows above, below, columns left, right."""
    top, bottom = axis_signature(i, Hq, r)
    left, right = axis_signature(j, Wq, r)
    return (top, bottom, left, right)


def _axis_classes(nq: int, n: int, r: int, axis: str) -> List[Tuple[Tuple[int, int], np.ndarray, np.ndarray]]:
    """Group query indices ``0..nq-1`` by signature, each with the training indices ``0..n-1`` sharing it."""
    train: Dict[Tuple[int, int], List[int]] = {}
    for i in range(n):
        train.setdefault(axis_signature(i, n, r), []).append(i)
    query: Dict[Tuple[int, int], List[int]] = {}
    for i in range(nq):
        query.setdefault(axis_signature(i, nq, r), []).append(i)
    out = []
    for sig, qs in query.items():
        if sig not in train:
            raise ValueError(
                f"no training patch has the padding signature of query {axis} {qs[0]} "
                f"({sig[0]} padded before, {sig[1]} after, patch size k={2 * r + 1}, query size {nq}, "
                f"training size {n}); use a smaller k or a query canvas whose borders the training images can match"
            )
        out.append((sig, np.asarray(qs), np.asarray(train[sig])))
    return out


def local_keyset(Hq: int, Wq: int, H: int, W: int) -> KeySet:
    """LS: every pixel is its own class and attends to the same pixel of every training image."""
    if (Hq, Wq) != (H, W):
        raise ValueError(f"the LS machine needs queries of the training size {H}x{W}, got {Hq}x{Wq}")
    pix = np.arange(H * W)
    return _csr([(pix[p : p + 1], pix[p : p + 1]) for p in range(H * W)], ZEROS, ZEROS)


def periodic_keyset(Hq: int, Wq: int, H: int, W: int, k: int, wrapped: bool = False) -> KeySet:
    """ELS with circular boundary: one class; keys at every fully-inside position (or every position)."""
    r = k // 2
    if wrapped:
        kpos = np.arange(H * W)
    else:
        if k > H or k > W:
            raise ValueError(
                f"patch size k={k} exceeds the training images ({H}x{W}): no fully-inside patch exists; "
                "use a smaller k or wrapped=True"
            )
        rows = np.arange(r, H - r)
        cols = np.arange(r, W - r)
        kpos = (rows[:, None] * W + cols[None, :]).ravel()
    return _csr([(np.arange(Hq * Wq), kpos)], CIRCULAR, CIRCULAR if wrapped else ZEROS)


def boundary_keyset(Hq: int, Wq: int, H: int, W: int, k: int) -> KeySet:
    """Boundary-aware ELS: one class per padding signature (a product of a row and a column class)."""
    r = k // 2
    row_cls = _axis_classes(Hq, H, r, "row")
    col_cls = _axis_classes(Wq, W, r, "column")
    groups = []
    for _, qr, tr in row_cls:
        for _, qc, tc in col_cls:
            groups.append(((qr[:, None] * Wq + qc[None, :]).ravel(), (tr[:, None] * W + tc[None, :]).ravel()))
    return _csr(groups, ZEROS, ZEROS)


@functools.lru_cache(maxsize=256)
def keyset(rule: str, Hq: int, Wq: int, H: int, W: int, k: int) -> KeySet:
    """The key set of ``rule`` (one of :data:`RULES`) for ``Hq x Wq`` queries, ``H x W`` training images
    and patch size ``k`` (cached). A ValueError names what makes it impossible (e.g. a padding signature
    no training patch has)."""
    if rule == "ls":
        return local_keyset(Hq, Wq, H, W)
    if rule == "els_zeros":
        return boundary_keyset(Hq, Wq, H, W, k)
    if rule in ("els_circular", "els_wrapped"):
        return periodic_keyset(Hq, Wq, H, W, k, wrapped=rule == "els_wrapped")
    raise ValueError(f"unknown key-set rule {rule!r}; known: {RULES}")


@dataclass(frozen=True)
class MultiKeySet:
    """The key sets of one rule at several patch sizes ``ks`` (strictly increasing), for a pass that computes
    every size at once (the compiled engines' ``local_forward_multi``, CPU and CUDA).

    Bit ``j`` of ``kmask[e]`` (uint32, one per entry of ``keyset.cls_kpos``) is set when position
    ``keyset.cls_kpos[e]`` is one of its class's keys at size ``ks[j]``. A class of ``keyset`` computes, for its
    query pixels, the sizes its positions serve (the union of their masks); every query pixel is in exactly one
    class that computes a given size. Two layouts:

    * shared classes (LS, periodic ELS): the query pixels that share a class of the rule at every size, with
      the union of their key positions over the sizes; each class computes every size.
    * split (boundary-aware ELS, :func:`boundary_multi_keyset`): the interior, where key sets are nested, as a
      few classes that compute a prefix of the sizes each, and the border as the rule's own classes at each
      size, computing that size alone.

    Within a class, positions come in the order of the largest size they serve (descending), then position, so
    that a block of consecutive keys needs dot products up to about the same size.
    """

    ks: Tuple[int, ...]
    keyset: KeySet
    kmask: np.ndarray  # uint32 (len(keyset.cls_kpos),)

    def size_keyset(self, j: int) -> KeySet:
        """The key set at size ``ks[j]`` alone, recovered from the masks (for checks): the classes that compute
        that size."""
        groups = []
        for c, (q, k) in enumerate(self.keyset.classes()):
            m = self.kmask[self.keyset.cls_kpos_ptr[c] : self.keyset.cls_kpos_ptr[c + 1]]
            serves = (m >> np.uint32(j)) & np.uint32(1) == 1
            if serves.any():
                groups.append((q, k[serves]))
        return _csr(groups, self.keyset.query_pad, self.keyset.key_pad)


MAX_MULTI_K = 32  # sizes of one multi-size pass (bits of a key position's mask; validate.hpp kMaxMultiK)


@functools.lru_cache(maxsize=64)
def multi_keyset(rule: str, Hq: int, Wq: int, H: int, W: int, ks: Tuple[int, ...]) -> MultiKeySet:
    """The key sets of ``rule`` at every size of ``ks`` (a tuple of strictly increasing odd sizes, at most
    :data:`MAX_MULTI_K`) as one :class:`MultiKeySet` (cached). A size whose key set is impossible raises the
    ValueError of :func:`keyset`."""
    ks = tuple(int(k) for k in ks)
    if not ks or len(ks) > MAX_MULTI_K:
        raise ValueError(f"a multi-size pass takes 1 to {MAX_MULTI_K} patch sizes, got {len(ks)}")
    if any(k < 1 or k % 2 == 0 for k in ks) or any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"patch sizes must be odd, positive and strictly increasing, got {list(ks)}")
    per = [keyset(rule, Hq, Wq, H, W, k) for k in ks]
    if rule == "els_zeros":
        return boundary_multi_keyset(Hq, Wq, H, W, ks, per)
    # the class of every query pixel at every size; pixels with the same classes at every size share a class
    cls = np.empty((Hq * Wq, len(ks)), np.int64)
    for j, s in enumerate(per):
        cls[s.cls_qpix, j] = np.repeat(np.arange(s.n_classes), np.diff(s.cls_qpix_ptr))
    _, first, inverse = np.unique(cls, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first, kind="stable")  # classes in the order of their first pixel
    by_class = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[by_class], np.arange(len(first) + 1))
    groups, masks = [], []
    for u in order:
        qpix = by_class[bounds[u] : bounds[u + 1]]
        p = int(first[u])
        pos, bits = [], []
        for j, s in enumerate(per):
            c = int(cls[p, j])
            kp = s.cls_kpos[s.cls_kpos_ptr[c] : s.cls_kpos_ptr[c + 1]]
            pos.append(kp)
            bits.append(np.full(len(kp), 1 << j, np.uint32))
        pos_all, bits_all = np.concatenate(pos), np.concatenate(bits)
        upos, inv = np.unique(pos_all, return_inverse=True)
        mask = np.zeros(len(upos), np.uint32)
        np.bitwise_or.at(mask, inv.reshape(-1), bits_all)
        top = np.frexp(mask.astype(np.float64))[1]  # 1 + the largest size index each position serves
        sort = np.lexsort((upos, -top))
        groups.append((qpix, upos[sort]))
        masks.append(mask[sort])
    ks_set = _csr(groups, per[0].query_pad, per[0].key_pad)
    kmask = np.concatenate(masks).astype(np.uint32) if masks else np.zeros(0, np.uint32)
    return MultiKeySet(ks, ks_set, np.ascontiguousarray(kmask))


def _depth(n0: int, n1: int) -> np.ndarray:
    """Flat ``(n0 * n1,)``: how many pixels each pixel of an ``n0 x n1`` image lies from its nearest border (0
    on the border); a pixel's patch of radius ``r`` lies fully inside iff its depth is at least ``r``."""
    i, j = np.divmod(np.arange(n0 * n1), n1)
    return np.minimum(np.minimum(i, n0 - 1 - i), np.minimum(j, n1 - 1 - j))


def boundary_multi_keyset(Hq: int, Wq: int, H: int, W: int, ks: Tuple[int, ...], per: List[KeySet]) -> MultiKeySet:
    """Boundary-aware ELS at every size of ``ks`` (``per[j]``: its key set at ``ks[j]``), split in two.

    Interior: a query pixel whose patch of size ``ks[j]`` lies fully inside the canvas (padding signature 0)
    attends to the training positions whose patch does, and a pixel (position) fully inside at ``ks[j]`` is so at
    every smaller size: the key sets are nested. So the pixels fully inside at ``ks[0] .. ks[J]`` and no larger
    size form one class ``J`` (a ring of the canvas), whose keys are the positions fully inside at ``ks[0]``, each
    serving the sizes up to ``min(J, the largest at which it is fully inside)``. These few classes hold most of
    the work, and the one pass shares each pair's dot products across its sizes.

    Border: at each size, the rule's other classes (signature not 0: a few pixels each, keys in a band of the
    training images), computing that size alone, as a single-size call would.
    """
    rs = np.asarray([k // 2 for k in ks])
    inner_q = np.searchsorted(rs, _depth(Hq, Wq), side="right") - 1  # largest j fully inside at (-1: none)
    inner_k = np.searchsorted(rs, _depth(H, W), side="right") - 1
    keys = np.nonzero(inner_k >= 0)[0]
    groups, masks = [], []
    for J in range(len(ks)):
        qpix = np.nonzero(inner_q == J)[0]
        if len(qpix) == 0:
            continue
        top = np.minimum(inner_k[keys], J)
        sort = np.lexsort((keys, -top))
        groups.append((qpix, keys[sort]))
        masks.append(((np.uint64(1) << (top[sort] + 1).astype(np.uint64)) - np.uint64(1)).astype(np.uint32))
    for j, s in enumerate(per):
        for qpix, kpos in s.classes():
            if inner_q[qpix[0]] >= j:  # the interior class of size j: pixels of the rings J >= j above
                continue
            groups.append((qpix, kpos))
            masks.append(np.full(len(kpos), 1 << j, np.uint32))
    kmask = np.concatenate(masks) if masks else np.zeros(0, np.uint32)
    return MultiKeySet(ks, _csr(groups, per[0].query_pad, per[0].key_pad), np.ascontiguousarray(kmask, np.uint32))
