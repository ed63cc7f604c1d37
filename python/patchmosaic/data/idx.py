"""IDX files (the MNIST / Fashion-MNIST format), optionally gzip-compressed."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import Tuple

import numpy as np

from ..validation import check_memory


def read_idx(path: str) -> np.ndarray:
    """An IDX array of unsigned bytes, shape from its header. The header is read first and the array's size checked
    against the memory before the rest is read, and no more than it is read (a small .gz that would expand to more
    than the machine holds is refused, not decompressed)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise ValueError(f"{path} is not an unsigned-byte IDX file")
            ndim = head[3]
            dim_bytes = f.read(4 * ndim)
            if len(dim_bytes) != 4 * ndim:
                raise ValueError(f"{path}: its header is cut short ({len(dim_bytes)} of {4 * ndim} bytes of sizes)")
            dims = [int.from_bytes(dim_bytes[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            n = math.prod(dims)
            check_memory(2 * n, f"{path}: an IDX array of shape {tuple(dims)}", advice="use a smaller file")
            raw = f.read(n)
            extra = len(f.read(1))
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncated or corrupt compression
        raise ValueError(f"{path} is not a readable IDX file ({type(e).__name__}: {e})") from None
    if len(raw) != n or extra:
        raise ValueError(f"{path}: header says {dims} but holds {len(raw) + extra}{'+' if extra else ''} bytes")
    return np.frombuffer(raw, np.uint8).reshape(dims).copy()


def find_idx(folder: str, split: str = "train") -> Tuple[str, str]:
    """``(images, labels)`` paths of ``{split}-images-idx3-ubyte[.gz]`` and its labels in ``folder``."""
    stem = "t10k" if split == "test" else "train"
    names = os.listdir(folder) if os.path.isdir(folder) else []
    img = sorted(n for n in names if n.startswith(f"{stem}-images-idx3-ubyte") or n.startswith(f"{stem}-images.idx3-ubyte"))
    lab = sorted(n for n in names if n.startswith(f"{stem}-labels-idx1-ubyte") or n.startswith(f"{stem}-labels.idx1-ubyte"))
    if not img or not lab:
        raise ValueError(f"{folder} holds no {stem}-images-idx3-ubyte[.gz] / {stem}-labels-idx1-ubyte[.gz] pair")
    return os.path.join(folder, img[0]), os.path.join(folder, lab[0])


def load_idx(images_path: str, labels_path: str | None = None):
    """uint8 images ``(N, H, W)`` and int64 labels (zeros when there is no label file)."""
    x = read_idx(images_path)
    if labels_path is None:
        cand = images_path.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
        labels_path = cand if cand != images_path and os.path.exists(cand) else None
    if x.ndim != 3:
        raise ValueError(f"{images_path} holds an array of shape {x.shape}, not images (N, H, W)")
    y = read_idx(labels_path) if labels_path else np.zeros(len(x), np.int64)
    if y.ndim != 1:
        raise ValueError(f"{labels_path} holds an array of shape {y.shape}, not labels (N,)")
    y = y.astype(np.int64)
    if len(y) != len(x):
        raise ValueError(f"{images_path}: {len(x)} images but {len(y)} labels in {labels_path}")
    return x, y
