"""The partial softmax state: the one type in which every engine, the patch index and the distributed merge hand
over a softmax over some of the keys, and its associative merge (pure torch; no processes needed).

The compiled engines fold keys into the same state (cpp/include/patchmosaic/softmax_state.hpp) and return it as
``(out, stats, arg_key)`` (:meth:`SoftmaxState.of_local`); the patch index returns it for the keys it retrieved,
with the bound on the rest (index/query.py, ``ApproxResult.state``); a rank of a sharded machine computes it over
its shard of the keys and the ranks merge theirs (distributed/keys.py).

A machine's softmax over a set of keys, split into shards of the keys, leaves per query row and shard a
*partial state*: the largest shifted logit ``m`` (the ops' ``stats[..., 0]``), the sum of weights relative to
it ``s = sum_q exp(l_q - m)`` (``stats[..., 1]``), the normalised weighted mean of the keys' centres ``out``
and the winning key ``key`` (the global index of a key with logit ``m``). Two states merge exactly::

    M   = max(m1, m2)
    w_i = s_i exp(m_i - M)                 (0 for an empty state: s = 0, m = -inf)
    s   = w1 + w2,  out = (w1 out1 + w2 out2) / s,  key = key2 if m2 > m1 else key1

The merge is associative; folding the states in a fixed order (rank order) makes the result independent of
the order in which they were produced, and a tie keeps the earlier shard's key (the lower global index, as the
engines keep the first key among equal computed logits; equal patches whose distances were summed in different
orders may differ by rounding, and then either wins). The weights are formed in float64; only ``out`` carries the rounding of
the dtype it was computed in. The winning key's weight share of the merged row is ``1 / s``.

A shard computed from a patch index (only its retrieved keys) also carries ``left``, an upper bound on the
weight of the keys it left out, relative to ``exp(m)`` like ``s`` (0 where the shard is exact). It merges as
``s`` does, ``left = left1 exp(m1 - M) + left2 exp(m2 - M)``: the bounds on the shards' left-out masses add up,
and the merged row's error is at most ``R left / (s + left)`` (index/bound.py, ``R`` the range of the centres).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class SoftmaxState:
    """Partial softmax state of some rows over one shard of the keys.

    Args:
        m: float64 ``(*rows)``: the largest shifted logit of each row (``-inf`` for a row with no key).
        s: float64 ``(*rows)``: the sum of the weights relative to ``m`` (0 for a row with no key).
        out: ``(*rows, D)`` (any float dtype): the weighted mean of the keys' centres (ignored where s = 0).
        key: int64 ``(*rows)``: the global index of the winning key (-1 for none), or None without provenance.
        left: float64 ``(*rows)``: a bound on the weight of the keys the shard left out (a patch index's
            shard), relative to ``exp(m)``; 0 where it is exact; None when no shard tracks it.
    """

    m: torch.Tensor
    s: torch.Tensor
    out: torch.Tensor
    key: object = None
    left: object = None

    @classmethod
    def empty(cls, rows: Sequence[int], D: int, dtype=torch.float32, device=None, provenance: bool = False,
              bounded: bool = False):
        """The state of rows that saw no key (the merge's identity).

        Args:
            rows: the shape of the rows.
            D: values per row (channels).
            dtype: dtype of ``out`` (default float32).
            device: device of the tensors (default CPU).
            provenance: give a ``key`` of -1 (else None).
            bounded: give a ``left`` of 0 (else None).
        """
        rows = tuple(int(r) for r in rows)
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.full(rows, -float("inf"), **f64), torch.zeros(rows, **f64),
                   torch.zeros(rows + (int(D),), dtype=dtype, device=device),
                   torch.full(rows, -1, dtype=torch.int64, device=device) if provenance else None,
                   torch.zeros(rows, **f64) if bounded else None)

    @classmethod
    def of_local(cls, out: torch.Tensor, stats: torch.Tensor, key=None) -> "SoftmaxState":
        """The state of a local machine's op outputs (``ops.local_softmax``): ``out`` ``(B, C, Hq, Wq)``, ``stats``
        ``(B, Hq, Wq, 2)`` (the maximum shifted logit and the sum), ``key`` ``(B, Hq, Wq)`` or None; rows are the
        pixels ``(B, Hq, Wq)``, values their ``C`` channels."""
        return cls(stats[..., 0], stats[..., 1], out.permute(0, 2, 3, 1), key)

    def share(self) -> torch.Tensor:
        """The winning key's softmax weight, ``1 / s`` (0 for a row without keys), in ``out``'s dtype."""
        return torch.where(self.s > 0, 1.0 / self.s, torch.zeros_like(self.s)).to(self.out.dtype)


def merge2(x: SoftmaxState, y: SoftmaxState) -> SoftmaxState:
    """Merge two partial states of the same rows (``x`` the earlier shard: it keeps a tie)."""
    M = torch.maximum(x.m, y.m)
    finite = torch.isfinite(M)
    Mf = torch.where(finite, M, torch.zeros_like(M))
    wx = torch.where(x.s > 0, x.s * torch.exp(x.m - Mf), torch.zeros_like(x.s))
    wy = torch.where(y.s > 0, y.s * torch.exp(y.m - Mf), torch.zeros_like(y.s))
    s = wx + wy
    safe = torch.where(s > 0, s, torch.ones_like(s))
    zero = torch.zeros((), dtype=torch.float64, device=s.device)  # (an empty state's out, whatever it holds: unread)
    ox = torch.where((x.s > 0)[..., None], x.out.double(), zero)
    oy = torch.where((y.s > 0)[..., None], y.out.double(), zero)
    out = (wx[..., None] * ox + wy[..., None] * oy) / safe[..., None]
    out = torch.where((s > 0)[..., None], out, torch.zeros_like(out)).to(x.out.dtype)
    key = None
    if x.key is not None and y.key is not None:
        key = torch.where((y.m > x.m) & (y.s > 0), y.key, x.key)
    left = None
    if x.left is not None or y.left is not None:
        left = torch.zeros_like(s)
        for st in (x, y):
            if st.left is not None:
                left = left + torch.where(st.s > 0, st.left * torch.exp(st.m - Mf), torch.zeros_like(st.s))
    return SoftmaxState(M, s, out, key, left)


def merge(states: Sequence[SoftmaxState]) -> SoftmaxState:
    """Fold ``states`` (of the same rows) left to right with :func:`merge2`: a fixed order, so every process
    that folds the same list gets the same bits.

    Args:
        states: a non-empty sequence of :class:`SoftmaxState`, in shard (rank) order.
    """
    if not states:
        raise ValueError("nothing to merge")
    acc = states[0]
    for st in states[1:]:
        acc = merge2(acc, st)
    return acc


def pack(st: SoftmaxState) -> torch.Tensor:
    """One float64 ``(*rows, 2 + D + [1] + [1])`` tensor holding a state (the key as a float64: exact below
    2^53; then ``left`` when present), the buffer the ranks exchange."""
    parts = [st.m[..., None], st.s[..., None], st.out.double()]
    if st.key is not None:
        parts.append(st.key.double()[..., None])
    if st.left is not None:
        parts.append(st.left.double()[..., None])
    return torch.cat(parts, -1)


def unpack(buf: torch.Tensor, D: int, dtype, provenance: bool, bounded: bool = False) -> SoftmaxState:
    """The inverse of :func:`pack` (``out`` back in ``dtype``); ``bounded``: the state carries ``left``."""
    key = buf[..., 2 + D].round().to(torch.int64) if provenance else None
    left = buf[..., 2 + D + int(provenance)].contiguous() if bounded else None
    return SoftmaxState(buf[..., 0].contiguous(), buf[..., 1].contiguous(), buf[..., 2:2 + D].to(dtype), key, left)
