"""IDX files (the MNIST / Fashion-MNIST format), optionally gzip-compressed."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import Tuple

import numpy as np


def read_idx(path: str) -> np.ndarray:
    """An IDX array of unsigned bytes, shape from its header."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncated or corrupt compression
        raise ValueError(f"{path} is not a readable IDX file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims).copy()


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
