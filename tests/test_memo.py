"""Values the ops keep between calls on the same data (ops/memo.py): the training images' largest magnitude (the
logit overflow check) and the checked element table of a same-position call. A kept value must never be stale: an
in-place change of the tensor, through torch, is seen at the next call; a dead tensor's entries go."""

import gc

import numpy as np
import pytest
import torch

from patchmosaic import ops
from patchmosaic.ops import aligned, checks
from patchmosaic.ops.memo import Memo

from test_aligned import _case, B, C, H, N, W


def _args(train, x, a, inv, qlab, index, tables):
    return (train, x, torch.as_tensor(a), torch.as_tensor(inv), None, torch.as_tensor(qlab), *index.tensors(),
            *tables, False, "cpu", 0, 0)


def test_a_call_on_the_same_data_reuses_the_checks_and_sees_in_place_changes():
    train, x, a, inv, labels, qlab, index, table = _case(2, weighted=True)
    tr = torch.from_numpy(train.reshape(N, C, H, W).copy())
    q = torch.from_numpy(x.reshape(B, C, H, W))
    tables = table.tensors()
    checks.MAGNITUDES.clear()
    aligned.TABLES.clear()
    first = ops.aligned_softmax(*_args(tr, q, a, inv, qlab, index, tables))[0]
    assert len(checks.MAGNITUDES) == 1 and len(aligned.TABLES) == 1
    again = ops.aligned_softmax(*_args(tr, q, a, inv, qlab, index, tables))[0]
    assert torch.equal(first, again) and len(checks.MAGNITUDES) == 1 and len(aligned.TABLES) == 1
    # the training images made huge in place: the overflow check must see it, not a kept magnitude
    tr.mul_(1e150)
    with pytest.raises(ValueError, match="too large for float64"):
        ops.aligned_softmax(*_args(tr, q, a, inv, qlab, index, tables))
    tr.div_(1e150)
    # a table element moved out of range in place: refused, not read from a kept check
    tables[1][0] = C * H * W + 5
    with pytest.raises(ValueError, match="outside 0"):
        ops.aligned_softmax(*_args(tr, q, a, inv, qlab, index, tables))


def test_entries_go_with_their_tensors():
    memo = Memo()
    x = torch.arange(10.0)
    calls = []
    assert memo.get((x,), lambda: calls.append(1) or 9.0) == 9.0
    assert memo.get((x,), lambda: calls.append(1) or 9.0) == 9.0 and len(calls) == 1
    assert memo.get((x,), lambda: 3.0, extra=("other",)) == 3.0 and len(memo) == 2
    del x
    gc.collect()
    assert len(memo) == 0


def test_tensors_without_a_version_counter_are_computed_every_time():
    memo = Memo()
    with torch.inference_mode():
        x = torch.ones(3)
    calls = []
    for _ in range(2):
        memo.get((x,), lambda: calls.append(1))
    assert len(calls) == 2 and len(memo) == 0
    y = np.ones(3)
    assert memo.get((torch.from_numpy(y),), lambda: 1) == 1  # a fresh tensor each time: kept, then gone with it
    gc.collect()
    assert len(memo) == 0


def test_one_callback_per_tensor_and_a_replaced_data_is_seen():
    """A value per miss registered a callback on its tensor (weakref.finalize) that lived as long as the tensor:
    20,000 calls on a tensor changed in place between them left 64 values and 20,000 callbacks. A tensor whose
    ``.data`` was replaced kept its id and version, and its old value was returned. Now one callback per tensor,
    values evicted leave its set, and the key holds the tensor's memory address (a change in place through
    ``.data``, which torch does not count, stays unseen: documented)."""
    import weakref

    m = Memo()
    x = torch.zeros(3)
    before = len(weakref.finalize._registry)
    for _ in range(2000):
        x.add_(1.0)
        m.get((x,), lambda: float(x.max()))
    assert len(m) == 64 and len(weakref.finalize._registry) - before == 1
    assert m.get((x,), lambda: float(x.max())) == 2000.0
    x.data = torch.full((3,), 7.0)
    assert m.get((x,), lambda: float(x.max())) == 7.0
    del x
    gc.collect()
    assert len(m) == 0 and len(weakref.finalize._registry) == before


def test_a_value_of_two_tensors_leaves_both_sets_when_one_dies():
    """A value keyed by a long-lived and a short-lived tensor: the short one's death dropped the value but left its
    key in the long one's set (595 stale keys after 20,000 calls)."""
    m = Memo()
    long_lived = torch.zeros(3)
    for i in range(20):
        short = torch.full((2,), float(i))
        m.get((long_lived, short), lambda: float(short.sum()))
        del short
        gc.collect()
    assert len(m) == 0 and not m._by_id.get(id(long_lived))
