"""Work items of the Triton engine, built on the host from a call's key set, image groups and patch elements.

Only the fields of the key set (``query_pad``, ``key_pad``, ``cls_qpix_ptr``, ``cls_qpix``, ``cls_kpos_ptr``,
``cls_kpos``), of the groups (``grp_img_ptr``, ``grp_img``, ``group_of_b``) and of a masked patch's element table
(``codes``, ``scale``, ``cls_ptr``; ops/masks.py) are read, so any object with those fields will do.

Rows: for every image group ``g`` with query images and every class ``c``, the rows ``(b, p)`` for ``b`` in the
group's query images (outer) and ``p`` in the class's query pixels (inner), one segment after another. Keys of a
segment: ``j = image * n_pos + position`` over the group's images and the class's key positions (the order of
every engine, so that a tie in provenance goes to the same key). Items: each segment's rows in tiles of
``block_m``, each tile's keys in ranges of ``keys_per_item`` (the split of the keys, merged in order); the items of
one tile are consecutive, and tiles of one segment share a key range next to each other (``(segment, range,
tile)`` order), so that programs running together read the same key images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

ZEROS, CIRCULAR = 0, 1  # padding codes (keysets.py, contract.hpp: Padding)


@dataclass
class Elements:
    """The patch elements of a call, decoded: per element its channel, row and column offset (int32) and scale
    (float32, None when all are 1); per class its part of the table (``start``, ``count``; int64)."""

    ch: np.ndarray
    dr: np.ndarray
    dc: np.ndarray
    scale: Optional[np.ndarray]
    start: np.ndarray
    count: np.ndarray

    @property
    def max_count(self) -> int:
        return int(self.count.max()) if len(self.count) else 0


def elements(k: int, C: int, n_classes: int, table=None) -> Elements:
    """The element table of a call: the square ``C x k x k`` patch (``table`` None) or a masked patch's
    (masks.PatchElements: element codes ``ch << 24 | row << 12 | col`` in the ``k x k`` frame, optional sqrt-weight
    scales, optional per-class offsets ``cls_ptr``)."""
    r = k // 2
    if table is None:
        e = np.arange(C * k * k, dtype=np.int64)
        ch, row, col = e // (k * k), (e // k) % k, e % k
        scale = None
        start = np.zeros(n_classes, np.int64)
        count = np.full(n_classes, C * k * k, np.int64)
    else:
        codes = np.asarray(table.codes, np.int64)
        ch, row, col = codes >> 24, (codes >> 12) & 0xFFF, codes & 0xFFF
        scale = None if table.scale is None else np.asarray(table.scale, np.float32)
        if table.cls_ptr is None:
            start = np.zeros(n_classes, np.int64)
            count = np.full(n_classes, len(codes), np.int64)
        else:
            ptr = np.asarray(table.cls_ptr, np.int64)
            start, count = ptr[:-1].copy(), np.diff(ptr)
    return Elements(ch.astype(np.int32), (row - r).astype(np.int32), (col - r).astype(np.int32), scale, start, count)


@dataclass
class Plan:
    """The rows and work items of one call (host arrays)."""

    row_b: np.ndarray  # int32 (R,)
    row_pix: np.ndarray  # int32 (R,)
    row_elem: np.ndarray  # int64 (R, 2): element start, count
    items: np.ndarray  # int64 (n_items, 10): see kernels.ITEM_FIELDS
    item_tile: np.ndarray  # int64 (n_items,): the row tile of each item
    tile_row: np.ndarray  # int64 (n_tiles,): first row of each tile
    tile_rows: np.ndarray  # int64 (n_tiles,): rows of each tile
    key_tiles: int  # key tiles of block_n over all items

    @property
    def n_rows(self) -> int:
        return len(self.row_b)


def plan(keyset, groups, B: int, elem: Elements, block_m: int, keys_per_item: int, block_n: int = 1) -> Plan:
    """The work of a call: rows, row tiles of ``block_m``, and their key ranges of at most ``keys_per_item`` keys
    (rounded up to a multiple of ``block_n`` so that key tiles do not straddle items)."""
    kpi = max(block_n, -(-int(keys_per_item) // block_n) * block_n)
    qptr, qpix = np.asarray(keyset.cls_qpix_ptr), np.asarray(keyset.cls_qpix)
    kptr = np.asarray(keyset.cls_kpos_ptr)
    gptr, gob = np.asarray(groups.grp_img_ptr), np.asarray(groups.group_of_b)
    rb_parts, rp_parts, re_parts, items, item_tile, tile_row, tile_rows = [], [], [], [], [], [], []
    r0 = n_tiles = key_tiles = 0
    for g in range(len(gptr) - 1):
        bs = np.nonzero(gob == g)[0]
        n_img = int(gptr[g + 1] - gptr[g])
        if len(bs) == 0 or n_img == 0:
            continue
        for c in range(len(qptr) - 1):
            qp = qpix[qptr[c] : qptr[c + 1]]
            n_pos = int(kptr[c + 1] - kptr[c])
            if len(qp) == 0 or n_pos == 0:
                continue
            nrow = len(bs) * len(qp)
            rb_parts.append(np.repeat(bs.astype(np.int32), len(qp)))
            rp_parts.append(np.tile(qp.astype(np.int32), len(bs)))
            re_parts.append(np.broadcast_to(np.array([elem.start[c], elem.count[c]], np.int64), (nrow, 2)))
            nkeys = n_img * n_pos
            k0 = np.arange(0, nkeys, kpi, dtype=np.int64)
            k1 = np.minimum(k0 + kpi, nkeys)
            t0 = np.arange(0, nrow, block_m, dtype=np.int64)
            tr = np.minimum(block_m, nrow - t0)
            seg = np.empty((len(k0), len(t0), 10), np.int64)  # (range, tile) order
            seg[..., 0] = r0 + t0[None, :]
            seg[..., 1] = tr[None, :]
            seg[..., 2], seg[..., 3], seg[..., 4], seg[..., 5] = kptr[c], n_pos, gptr[g], n_img
            seg[..., 6] = k0[:, None]
            seg[..., 7] = k1[:, None]
            seg[..., 8], seg[..., 9] = elem.start[c], elem.count[c]
            items.append(seg.reshape(-1, 10))
            item_tile.append(np.tile(n_tiles + np.arange(len(t0)), len(k0)))
            tile_row.append(r0 + t0)
            tile_rows.append(tr)
            key_tiles += len(t0) * int(np.sum(-(-(k1 - k0) // block_n)))
            n_tiles += len(t0)
            r0 += nrow

    def cat(parts, dt, shape=(0,)):
        return np.ascontiguousarray(np.concatenate(parts).astype(dt)) if parts else np.zeros(shape, dt)

    return Plan(cat(rb_parts, np.int32), cat(rp_parts, np.int32), cat(re_parts, np.int64, (0, 2)),
                cat(items, np.int64, (0, 10)), cat(item_tile, np.int64), cat(tile_row, np.int64),
                cat(tile_rows, np.int64), int(key_tiles))


def split_index(p: Plan) -> np.ndarray:
    """``(n_tiles, S)`` int64: the items of each row tile in key order (``S`` the most of any tile), -1 past a
    tile's own (items are laid out (range, tile) per segment, so a stable sort by tile keeps the key order)."""
    n_tiles = len(p.tile_row)
    counts = np.bincount(p.item_tile, minlength=n_tiles) if n_tiles else np.zeros(0, np.int64)
    out = np.full((n_tiles, max(int(counts.max()) if n_tiles else 0, 1)), -1, np.int64)
    if n_tiles == 0:
        return out
    order = np.argsort(p.item_tile, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out[p.item_tile[order], np.arange(len(order)) - np.repeat(starts, counts)] = order
    return out
