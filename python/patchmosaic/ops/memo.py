"""Values the ops derive from their constant inputs (the training images' largest magnitude, a checked element
table), kept while those tensors live unchanged, so that a call on the same data does not recompute them.

A value is keyed by the identity of its tensors and their version counters (every in-place change through torch
raises it): while a tensor lives, no other tensor has its id; when it dies its entries go (a weak reference's
callback). A tensor whose version counter cannot be read (an inference-mode tensor, a wrapped one) is not kept:
its value is computed at every call. A change made behind torch's back (through a numpy array sharing the memory)
is not seen; the compiled core checks its tables again itself (validate.hpp), so a stale check cannot make it read
out of bounds.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

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
        key.append((id(t), version, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset()))
    return tuple(key)


class Memo:
    """A table of values computed from tensors: ``get(tensors, compute)`` returns ``compute()``, from the table
    when the same live tensors, unchanged, asked for it before."""

    def __init__(self):
        self._values: Dict[Tuple, object] = {}

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
            self._values.pop(next(iter(self._values)))
        self._values[key] = value
        for t in tensors:
            if t is not None:
                weakref.finalize(t, self._values.pop, key, None)
        return value

    def clear(self) -> None:
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)
