"""Values the ops derive from their constant inputs (the training images' largest magnitude, a checked element
table), kept while those tensors live unchanged, so that a call on the same data does not recompute them.

A value is keyed by the identity of its tensors, their memory and their version counters (every in-place change
through torch's operations on the tensor raises it): while a tensor lives, no other tensor has its id; when it dies
its entries go (one weak reference's callback per tensor). A tensor whose version counter cannot be read (an
inference-mode tensor, a wrapped one) is not kept: its value is computed at every call. A change made behind the
counter's back is not seen: through a numpy array sharing the memory, or in place through ``t.data`` (``t.data =
other`` is seen: the memory changes); the compiled core checks its tables again itself (validate.hpp), so a stale
check cannot make it read out of bounds.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import torch

LIMIT = 64  # entries kept (the oldest goes first)


def _key(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[Tuple]:
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
            continue
        if type(t) is not torch.Tensor or t.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return None
        try:
            version = t._version
        except RuntimeError:
            return None
        key.append((id(t), version, t.data_ptr(), t.device, t.dtype, tuple(t.shape), tuple(t.stride()),
                    t.storage_offset()))
    return tuple(key)


class Memo:
    """A table of values computed from tensors: ``get(tensors, compute)`` returns ``compute()``, from the table
    when the same live tensors, unchanged, asked for it before."""

    def __init__(self):
        self._values: Dict[Tuple, object] = {}
        self._by_id: Dict[int, Set[Tuple]] = {}  # the keys of each live tensor (by id), dropped when it dies

    def get(self, tensors: Sequence[Optional[torch.Tensor]], compute: Callable[[], object], extra: Tuple = ()):
        """``compute()``, or its value kept for these ``tensors`` (and the hashable ``extra``, whatever else the
        value depends on)."""
        if torch.compiler.is_compiling():
            return compute()
        key = _key(tensors)
        if key is None:
            return compute()
        key = key + (extra,)
        if key in self._values:
            return self._values[key]
        value = compute()
        if len(self._values) >= LIMIT:
            old = next(iter(self._values))
            self._values.pop(old)
            self._unlink(old)
        self._values[key] = value
        for t in tensors:
            if t is None:
                continue
            keys = self._by_id.get(id(t))
            if keys is None:  # one callback per tensor, however many values it keys
                keys = self._by_id[id(t)] = set()
                weakref.finalize(t, self._forget, id(t))
            keys.add(key)
        return value

    def _unlink(self, key: Tuple) -> None:
        """Take a dropped value's key out of the sets of its tensors (the parts before ``extra``: id first)."""
        for part in key[:-1]:
            if part is not None and part[0] in self._by_id:
                self._by_id[part[0]].discard(key)

    def _forget(self, tensor_id: int) -> None:
        for key in self._by_id.pop(tensor_id, ()):
            self._values.pop(key, None)
            self._unlink(key)  # (the value's other tensors' sets too)

    def clear(self) -> None:
        self._values.clear()
        for keys in self._by_id.values():
            keys.clear()

    def __len__(self) -> int:
        return len(self._values)
