"""Loaders for image files on disk; all return ``(images float32 (N, C, 32, 32) in [-1, 1], labels int64)``.

``load(spec)`` understands:

- ``"default"``: the packaged 2,000 MNIST digits;
- a ``.npz`` file with uint8 images under ``x_train`` / ``images`` / ``x`` and labels under ``y_train`` /
  ``labels`` / ``y`` (e.g. ``shared/data/mnist.npz``, ``cifar10_10k.npz``); loaded without pickles;
- an IDX image file (``train-images-idx3-ubyte[.gz]``, the MNIST / Fashion-MNIST format); labels come
  from the matching ``*-labels-idx1-ubyte[.gz]`` beside it;
- a directory holding one of those (``train-images-idx3-ubyte*`` is looked for first).

``limit`` keeps the first ``limit`` images (in file order), ``size`` the output size (None: keep).
"""

from __future__ import annotations

import gzip
import os
from typing import Optional, Tuple

import numpy as np
import torch

from .default import load_default, preprocess

IMAGE_KEYS = ("x_train", "images", "x")
LABEL_KEYS = ("y_train", "labels", "y")


def read_idx(path: str) -> np.ndarray:
    """An IDX array (uint8 data; optionally gzip-compressed)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims).copy()


def load(spec: str, *, limit: Optional[int] = None, size: Optional[int] = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    if spec == "default":
        x, y = load_default(size)
        return (x, y) if limit is None else (x[:limit], y[:limit])
    if os.path.isdir(spec):
        found = sorted(f for f in os.listdir(spec) if f.startswith("train-images-idx3-ubyte"))
        if not found:
            raise ValueError(f"{spec} holds no train-images-idx3-ubyte[.gz] file")
        spec = os.path.join(spec, found[0])
    if not os.path.exists(spec):
        raise ValueError(f"no data set at {spec!r} (give 'default', an .npz file or an IDX file/directory)")
    if spec.endswith(".npz"):
        with np.load(spec, allow_pickle=False) as z:
            ik = next((k for k in IMAGE_KEYS if k in z.files), None)
            lk = next((k for k in LABEL_KEYS if k in z.files), None)
            if ik is None:
                raise ValueError(f"{spec} has none of the image keys {IMAGE_KEYS} (it has {z.files})")
            x = z[ik][:limit]
            y = z[lk][:limit] if lk is not None else np.zeros(len(x), np.int64)
    else:
        x = read_idx(spec)[:limit]
        lab = spec.replace("images-idx3", "labels-idx1")
        y = read_idx(lab)[:limit] if lab != spec and os.path.exists(lab) else np.zeros(len(x), np.int64)
    if len(y) != len(x):
        raise ValueError(f"{spec}: {len(x)} images but {len(y)} labels")
    return preprocess(x, size), torch.from_numpy(np.asarray(y).astype(np.int64))
