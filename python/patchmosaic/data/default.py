"""The built-in default data set and the paper's preprocessing.

``mnist_2k.npz``: 2,000 MNIST training digits, the first 200 of each class in the original training
order (``source_index`` gives their indices in the 60,000-image training set), uint8 28x28.
MNIST: Y. LeCun, C. Cortes and C. J. C. Burges, http://yann.lecun.com/exdb/mnist/ (commonly used
under CC BY-SA 3.0).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F


def preprocess(images: np.ndarray, size: int | None = 32) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` / ``(N, C, H, W)`` -> float32 ``(N, C, size, size)`` in [-1, 1].

    The paper's recipe: ``x / 127.5 - 1``, then, when the size differs, bilinear resizing with
    antialiasing (``align_corners=False``), clamped to [-1, 1].
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"preprocess expects uint8 images, got {x.dtype} with shape {x.shape}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 2, 3, 4), x.shape[-1] in (1, 2, 3, 4)
        if last and not first:
            x = x.transpose(0, 3, 1, 2)
        elif not first:
            raise ValueError(f"images of shape {x.shape}: neither axis 1 nor the last axis is a channel axis "
                             "(1 grey or 3 RGB channels)")
        if x.shape[1] in (2, 4):
            raise ValueError(f"images of shape {images.shape} have {x.shape[1]} channels (grey or RGB with an alpha "
                             "channel); drop the alpha channel first (e.g. x[..., :3] or x[..., :1])")
    else:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).float() / 127.5 - 1
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
    return t.contiguous()


def load_default_raw():
    """The packaged 2,000-digit MNIST subset as stored: uint8 ``(2000, 28, 28)`` and int64 labels."""
    with resources.files(__package__).joinpath("mnist_2k.npz").open("rb") as f:
        d = np.load(f, allow_pickle=False)
        return d["images"], d["labels"].astype(np.int64)


def load_default(size: int | None = 32):
    """The packaged 2,000-digit MNIST subset: ``(images (2000, 1, size, size) float32, labels (2000,) int64)``."""
    images, labels = load_default_raw()
    return preprocess(images, size), torch.from_numpy(labels)
