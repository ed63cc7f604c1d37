"""Pictures of image arrays: composing tiles into one picture (numpy) and writing it as a PNG (Pillow).

The composition helpers work on uint8 ``(H, W, 3)`` arrays; :func:`write_png` saves one through the
atomic-write helper of io/files.py (a symbolic link is written through, a reader never sees half a file).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .files import write_with


def write_png(path: str, rgb: np.ndarray) -> None:
    """``rgb``: uint8 ``(H, W, 3)`` or ``(H, W)`` (grey, written as RGB), saved losslessly as PNG at ``path``."""
    a = np.asarray(rgb)
    if a.dtype != np.uint8:
        raise TypeError(f"write_png expects uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"write_png expects (H, W, 3) or (H, W), got {a.shape}")
    picture = Image.fromarray(np.ascontiguousarray(a))
    write_with(path, lambda tmp: picture.save(tmp, format="PNG"), suffix=".png")


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] ``(C, H, W)`` -> uint8 ``(H, W, 3)``."""
    x = np.clip((np.asarray(img, dtype=np.float64) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    return x.transpose(1, 2, 0)


def label_colours(ids: np.ndarray) -> np.ndarray:
    """A distinct colour per integer id (golden-ratio hues), ``(...,) -> (..., 3)`` uint8."""
    h = (np.asarray(ids, dtype=np.float64) * 0.618033988749895) % 1.0
    s, v = 0.65, 0.95
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(np.shape(ids) + (3,))
    for k, (r, g, b) in enumerate(table):
        m = i == k
        out[m] = np.stack([np.broadcast_to(r, h.shape)[m], np.broadcast_to(g, h.shape)[m],
                           np.broadcast_to(b, h.shape)[m]], -1)
    return (out * 255 + 0.5).astype(np.uint8)


def grid(tiles, rows: int, cols: int, pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """Lay out equal-size uint8 ``(h, w, 3)`` tiles row-major into one picture."""
    h, w, _ = tiles[0].shape
    out = np.full((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, 3), background, np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        big = np.repeat(np.repeat(tile, scale, 0), scale, 1)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        out[y : y + h * scale, x : x + w * scale] = big
    return out


def provenance_picture(sample: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """Each pixel coloured by the training image its winning patch came from, shaded by the sample's
    brightness (``sample`` ``(C, H, W)`` in [-1, 1], ``image_ids`` ``(H, W)``) -> uint8 ``(H, W, 3)``."""
    shade = ((sample.mean(0) + 1) / 2).clip(0, 1)[:, :, None]
    return (label_colours(image_ids) * (0.15 + 0.85 * shade)).astype(np.uint8)
