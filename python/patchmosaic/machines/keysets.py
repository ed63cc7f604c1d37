"""Key-set rules of the local machines: which training positions each query pixel attends to (spec section 2).

A rule turns a canvas, the training size and a patch size into a key-set table (ops/tables.py: classes of query
pixels that share one set of key positions, and the padding of query and key patches); the ops take the table,
never the rule. Every local machine is one streaming softmax over a different key set:

==============  ===================================  ==========================================
rule            classes of query pixels              key positions of a class
==============  ===================================  ==========================================
same position   each pixel alone                     the same pixel of every training image (LS)
all positions   one class with every pixel           every fully-inside position (or every
                                                     position, wrapped) (periodic ELS)
same signature  pixels with one padding signature    training positions with that signature
                                                     (boundary-aware ELS)
==============  ===================================  ==========================================

The padding signature (boundary-aware ELS, the paper's eq. 41) is separable: the signature of
``(i, j)`` is the row signature of ``i`` times the column signature of ``j``, so the classes are the
products of row classes and column classes.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import numpy as np
import torch

from ..ops.tables import CIRCULAR, MAX_MULTI_K, ZEROS, KeySet, MultiKeySet, csr_keyset

# The key-set rules, by name: LS, boundary-aware ELS, periodic ELS with interior or with wrapped keys.
RULES = ("ls", "els_zeros", "els_circular", "els_wrapped")


def axis_signature(i: int, n: int, r: int) -> Tuple[int, int]:
    """Padded rows (or columns) before and after a patch of radius ``r`` centred at ``i`` of ``n``."""
    return (max(0, r - i), max(0, i + r - (n - 1)))


def padding_signature(i: int, j: int, Hq: int, Wq: int, r: int) -> Tuple[int, int, int, int]:
    """The spec's ``sig(i, j)``: padded rows above, below, columns left, right."""
    top, bottom = axis_signature(i, Hq, r)
    left, right = axis_signature(j, Wq, r)
    return (top, bottom, left, right)


def _axis_class(n: int, r: int, xp=torch):
    """``(n,)``: the padding signature of every index of an axis of length ``n`` as one id, ``before * (r + 1) +
    after`` (the same id for the same signature on any length). ``xp``: torch (tensors) or numpy (arrays)."""
    i = xp.arange(n)
    before, after = r - i, i + r - (n - 1)
    return before * (before > 0) * (r + 1) + after * (after > 0)


def _signature_class(n0: int, n1: int, r: int, xp=torch):
    """Flat ``(n0 * n1,)``: the padding signature of every pixel of an ``n0 x n1`` image as one id."""
    return (_axis_class(n0, r, xp)[:, None] * (r + 1) ** 2 + _axis_class(n1, r, xp)[None, :]).reshape(-1)


def class_maps(rule: str, Hq: int, Wq: int, H: int, W: int, k: int, xp=torch):
    """The key set of ``rule`` (one of :data:`RULES`) as the ops take it: ``(query_class, key_class, query_pad,
    key_pad)``, the class of every query pixel (flat ``(Hq * Wq,)`` int64) and of every training position (flat
    ``(H * W,)``; -1: no key), and the padding codes (ops/tables.py, ``KeySet.from_classes``). Torch operations
    only, so that a machine under ``torch.compile`` computes them inside its graph; ``xp=numpy``: the same as
    numpy arrays (for the cached table, :func:`keyset`, which must not see the tensors of a ``torch.func``
    transform).

    * ``"ls"``: each pixel its own class, the same position its key (zero padding; queries of the training size).
    * ``"els_circular"``: one class; keys at every position whose patch lies fully inside (circular query padding).
    * ``"els_wrapped"``: one class; keys at every position, their patches wrapping around (circular padding).
    * ``"els_zeros"``: the class of a pixel is its padding signature (boundary-aware ELS, zero padding).
    """
    r = k // 2
    if rule == "ls":
        if (Hq, Wq) != (H, W):
            raise ValueError(f"the LS machine needs queries of the training size {H}x{W}, got {Hq}x{Wq}")
        pix = xp.arange(H * W)
        return pix, pix, ZEROS, ZEROS
    if rule == "els_zeros":
        return _signature_class(Hq, Wq, r, xp), _signature_class(H, W, r, xp), ZEROS, ZEROS
    if rule == "els_wrapped":
        return xp.zeros(Hq * Wq, dtype=xp.int64), xp.zeros(H * W, dtype=xp.int64), CIRCULAR, CIRCULAR
    if rule == "els_circular":
        inside = (_signature_class(H, W, r, xp) == 0) * 1
        return xp.zeros(Hq * Wq, dtype=xp.int64), inside - 1, CIRCULAR, ZEROS
    raise ValueError(f"unknown key-set rule {rule!r}; known: {RULES}")


def check_rule(rule: str, Hq: int, Wq: int, H: int, W: int, k: int) -> None:
    """A ValueError that says in the rule's terms why its key set is impossible for this canvas and patch size
    (ops/tables.py can only name the pixel): a patch larger than the training images for periodic ELS with
    interior keys, a padding signature of the canvas that no training position has for boundary-aware ELS."""
    r = k // 2
    if rule == "els_circular" and (k > H or k > W):
        raise ValueError(f"patch size k={k} exceeds the training images ({H}x{W}): no fully-inside patch exists; "
                         "use a smaller k or wrapped=True")
    if rule == "els_zeros":
        for nq, n, axis in ((Hq, H, "row"), (Wq, W, "column")):
            train = {axis_signature(i, n, r) for i in range(n)}
            for i in range(nq):
                sig = axis_signature(i, nq, r)
                if sig not in train:
                    raise ValueError(
                        f"no training patch has the padding signature of query {axis} {i} ({sig[0]} padded before, "
                        f"{sig[1]} after, patch size k={k}, query size {nq}, training size {n}); use a smaller k or "
                        "a query canvas whose borders the training images can match")


@functools.lru_cache(maxsize=256)
def keyset(rule: str, Hq: int, Wq: int, H: int, W: int, k: int) -> KeySet:
    """The key set of ``rule`` (one of :data:`RULES`) for ``Hq x Wq`` queries, ``H x W`` training images
    and patch size ``k``, as a CSR table (cached). A ValueError names what makes it impossible (e.g. a padding
    signature no training patch has)."""
    check_rule(rule, Hq, Wq, H, W, k)
    qc, kc, qpad, kpad = class_maps(rule, Hq, Wq, H, W, k, np)
    return KeySet.from_classes(np.asarray(qc, np.int64), np.asarray(kc, np.int64), qpad, kpad)


@functools.lru_cache(maxsize=64)
def multi_keyset(rule: str, Hq: int, Wq: int, H: int, W: int, ks: Tuple[int, ...]) -> MultiKeySet:
    """The key sets of ``rule`` at every size of ``ks`` (a tuple of strictly increasing odd sizes, at most
    :data:`MAX_MULTI_K`) as one :class:`MultiKeySet` (cached). A size whose key set is impossible raises the
    ValueError of :func:`keyset`. Two layouts:

    * shared classes (LS, periodic ELS): the query pixels that share a class of the rule at every size, with
      the union of their key positions over the sizes; each class computes every size.
    * split (boundary-aware ELS, :func:`boundary_multi_keyset`): the interior, where key sets are nested, as a
      few classes that compute a prefix of the sizes each, and the border as the rule's own classes at each
      size, computing that size alone.
    """
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
    ks_set = csr_keyset(groups, per[0].query_pad, per[0].key_pad)
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
    return MultiKeySet(ks, csr_keyset(groups, per[0].query_pad, per[0].key_pad), np.ascontiguousarray(kmask, np.uint32))
