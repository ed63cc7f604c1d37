"""CIFAR-10 "python version" batches (``cifar-10-batches-py``), read without executing code.

The batches are pickles; they are opened with an unpickler that refuses every global except the few a plain array
needs, and gives those as stand-ins of its own (no numpy reconstruction runs on the file's data: a tampered state
crashed the process there), checked and made into arrays afterwards, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Tuple

import numpy as np

# The numeric types a batch's arrays and scalars may have (CIFAR-10: uint8 pixels; labels as Python ints).
_NUMERIC = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}


class _Dtype:
    """A dtype as the pickle describes it (numpy.dtype(name, align, copy), then its state): nothing of numpy's runs
    until :func:`_realise` checks it (numpy's own reconstruction crashed the process on a tampered state)."""

    def __init__(self, name=None, align=False, copy=False):
        self.name, self.order = name, "|"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def realise(self) -> np.dtype:
        if not isinstance(self.name, str) or self.name not in _NUMERIC:
            raise ValueError(f"a data type {self.name!r} (only plain numbers are allowed)")
        return np.dtype(self.name).newbyteorder(self.order if self.order in "<>" else "=")


class _Array:
    """An array as the pickle describes it (_reconstruct, then the state (version, shape, dtype, fortran, bytes))."""

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def realise(self) -> np.ndarray:
        st = self.state
        if not (isinstance(st, tuple) and len(st) == 5):
            raise ValueError("an array without a plain state")
        _, shape, dtype, fortran, raw = st
        if not (isinstance(shape, tuple) and all(isinstance(v, int) and 0 <= v < 2**40 for v in shape)):
            raise ValueError(f"an array of shape {shape!r}")
        if not isinstance(dtype, _Dtype) or not isinstance(raw, (bytes, bytearray)):
            raise ValueError("an array that is not plain numbers stored as bytes")
        dt = dtype.realise()
        if len(raw) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise ValueError(f"an array of shape {shape} and type {dt} with {len(raw)} bytes")
        return np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C")


def _scalar(dtype, raw=None):
    if not isinstance(dtype, _Dtype) or not isinstance(raw, (bytes, bytearray)):
        raise ValueError("a scalar that is not a plain number")
    dt = dtype.realise()
    if len(raw) != dt.itemsize:
        raise ValueError(f"a scalar of type {dt} with {len(raw)} bytes")
    return np.frombuffer(bytes(raw), dtype=dt)[0]


def _frombuffer(raw, dtype, shape, order="C"):  # (pickle protocol 5's form of an array)
    a = _Array()
    a.state = (1, shape, dtype, order == "F", bytes(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else raw)
    return a


def _encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("an encoded string other than latin-1 text")
    return text.encode("latin1")


_STAND_INS = {("numpy", "dtype"): _Dtype, ("numpy", "ndarray"): _Array, ("_codecs", "encode"): _encode}
for _m in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _STAND_INS[(_m, "_reconstruct")] = _Array
    _STAND_INS[(_m, "scalar")] = _scalar
for _m in ("numpy.core.numeric", "numpy._core.numeric"):
    _STAND_INS[(_m, "_frombuffer")] = _frombuffer


class _ArraysOnly(pickle.Unpickler):
    """Refuses every global but the few a plain array needs, and gives those as stand-ins of this module's own."""

    def find_class(self, module, name):
        if (module, name) not in _STAND_INS:
            raise ValueError(f"refusing to load {module}.{name} from a data file (only plain arrays are allowed)")
        return _STAND_INS[(module, name)]


def _realise(v):
    """The loaded object with its stand-ins checked and made into numpy arrays and scalars."""
    if isinstance(v, (_Array, _Dtype)):
        return v.realise()
    if isinstance(v, dict):
        return {k: _realise(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_realise(x) for x in v)
    return v


def check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """Labels as int64: one integer per image, each in 0 .. 2^31 - 1 (a ValueError naming ``where`` otherwise)."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise ValueError(f"{where}: labels must be a 1-D array of integers, got {y.dtype} of shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{where}: {n} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= 2**31):
        raise ValueError(f"{where}: labels must lie in 0 .. 2^31 - 1, got {int(y.min())} .. {int(y.max())}")
    return y.astype(np.int64)


def read_batch(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """One batch: uint8 images ``(N, 32, 32, 3)`` and int64 labels."""
    with open(path, "rb") as f:
        try:
            d = _realise(_ArraysOnly(io.BytesIO(f.read()), encoding="bytes").load())
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                RecursionError) as e:
            raise ValueError(f"{path} is not a CIFAR-10 python batch: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no dictionary inside)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (keys {sorted(d)})")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 pixel data, got {data.dtype}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    labels = check_labels(np.asarray(d["labels"]), len(data), path)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def load_cifar10(folder: str, split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """All training batches (``data_batch_1..5``, in order) or ``test_batch`` of a ``cifar-10-batches-py`` folder.
    A folder with some of the training batches loads those, with a warning naming the missing ones."""
    if os.path.isdir(os.path.join(folder, "cifar-10-batches-py")):
        folder = os.path.join(folder, "cifar-10-batches-py")
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    paths = [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]
    if not paths:
        raise ValueError(f"{folder} holds no CIFAR-10 python batches ({', '.join(names)})")
    if len(paths) < len(names):
        import warnings

        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        warnings.warn(f"{folder}: CIFAR-10 training batches {', '.join(missing)} are missing; loading the "
                      f"{len(paths)} present",
                      UserWarning, stacklevel=3)
    parts = [read_batch(p) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
