"""CIFAR-10 "python version" batches (``cifar-10-batches-py``), read without executing code.

The batches are pickles; they are opened with an unpickler that refuses every global except the few
numpy constructors a plain array needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Tuple

import numpy as np

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise ValueError(f"refusing to load {module}.{name} from a data file (only plain arrays are allowed)")
        return super().find_class(module, name)


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
            d = _ArraysOnly(io.BytesIO(f.read()), encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError) as e:
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
    """All training batches (``data_batch_1..5``, in order) or ``test_batch`` of a ``cifar-10-batches-py`` folder."""
    if os.path.isdir(os.path.join(folder, "cifar-10-batches-py")):
        folder = os.path.join(folder, "cifar-10-batches-py")
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    paths = [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]
    if not paths:
        raise ValueError(f"{folder} holds no CIFAR-10 python batches ({', '.join(names)})")
    parts = [read_batch(p) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
