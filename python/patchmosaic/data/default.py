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


LAYOUTS = ("NHWC", "NCHW")
PIXEL_MAX = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def preprocess(images: np.ndarray, size: int | None = 32, *, layout: str | None = None,
               alpha: str = "refuse") -> torch.Tensor:
    """uint8 or uint16 ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` -> float32 ``(N, C, size, size)`` in
    [-1, 1].

    The paper's recipe: ``x / 127.5 - 1`` (uint16: ``x / 32767.5 - 1``, the full 16 bits), then, when the size
    differs, bilinear resizing with antialiasing (``align_corners=False``), clamped to [-1, 1].

    The channel axis: ``layout="NHWC"`` or ``"NCHW"`` says where it is; None (default) reads it from the shape
    -- the axis of 1 to 4 entries, axis 1 or the last -- and refuses a shape where both are (e.g. 3x3 RGB
    pictures ``(N, 3, 3, 3)``), naming both readings. Images with an alpha channel (2 or 4 channels) are
    refused, unless ``alpha="drop"`` (then the grey or RGB channels are kept).
    """
    x = np.asarray(images)
    if x.dtype not in PIXEL_MAX:
        raise TypeError(f"preprocess expects uint8 or uint16 images, got {x.dtype} with shape {x.shape}")
    if layout not in (None,) + LAYOUTS:
        raise ValueError(f"layout must be 'NHWC', 'NCHW' or None (read from the shape), got {layout!r}")
    if alpha not in ("refuse", "drop"):
        raise ValueError(f"alpha must be 'refuse' or 'drop', got {alpha!r}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 2, 3, 4), x.shape[-1] in (1, 2, 3, 4)
        if layout is None:
            if first and last:
                raise ValueError(f"images of shape {x.shape} are ambiguous: (N, C, H, W) with {x.shape[1]} channels "
                                 f"of {x.shape[2]}x{x.shape[3]}, or (N, H, W, C) with {x.shape[3]} channels of "
                                 f"{x.shape[1]}x{x.shape[2]}; say which with layout='NCHW' or 'NHWC' (--layout)")
            if not first and not last:
                raise ValueError(f"images of shape {x.shape}: neither axis 1 nor the last axis is a channel axis "
                                 "(1 grey or 3 RGB channels)")
            layout = "NHWC" if last else "NCHW"
        if layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
        if x.shape[1] not in (1, 2, 3, 4):
            raise ValueError(f"images of shape {np.shape(images)} read as {layout} have {x.shape[1]} channels; "
                             "images are grey (1) or RGB (3)")
        if x.shape[1] in (2, 4):
            if alpha != "drop":
                raise ValueError(f"images of shape {np.shape(images)} have {x.shape[1]} channels (grey or RGB with "
                                 "an alpha channel); drop the alpha channel first (e.g. x[..., :3] or x[..., :1]), "
                                 "or pass alpha='drop' (--drop-alpha)")
            x = x[:, : x.shape[1] - 1]
    else:
        raise ValueError(f"images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    half = PIXEL_MAX[x.dtype] / 2
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # a decoded picture's buffer: torch wants memory it may write
        x = x.copy()
    t = torch.from_numpy(x).float() / half - 1
    if x.dtype == np.uint16:  # float32 rounding of x / 32767.5 may leave [-1, 1] by an ulp
        t = t.clamp(-1, 1)
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
