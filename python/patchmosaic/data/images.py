"""Folders of image files (PNG, JPEG, ...) via Pillow, CelebA's ``img_align_celeba`` and ``skimage.data``."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CELEBA_CROP = (40, 188, 15, 163)  # rows, cols of the 148x148 centre crop of a 218x178 aligned face
PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "rocket", "text")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError("reading image files needs Pillow: pip install 'patchmosaic[images]'") from None
    return Image


def _read(path: str, grey: Optional[bool]) -> np.ndarray:
    Image = _pil()
    with Image.open(path) as im:
        im = im.convert("L" if grey else "RGB")
        return np.asarray(im, dtype=np.uint8)


def _square(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(h, w)
    return a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def load_folder(folder: str, *, grey: Optional[bool] = None, crop: Optional[Tuple[int, int, int, int]] = None,
                limit: Optional[int] = None) -> Tuple[List[np.ndarray], np.ndarray, List[str]]:
    """Images of ``folder`` in sorted order (uint8 ``(H, W)`` or ``(H, W, 3)``), labels and class names.

    Sub-folders are classes (label = index of the sorted sub-folder name); files directly inside get
    label 0. ``grey`` None: grey if the first image is. ``crop = (r0, r1, c0, c1)``, else a centre square.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"no image folder at {folder}")
    subs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    groups = [(i, os.path.join(folder, d)) for i, d in enumerate(subs)] or [(0, folder)]
    files = []
    for lab, d in groups:
        files += [(lab, os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.lower().endswith(EXTENSIONS)]
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(EXTENSIONS)})")
    files = files[:limit]
    if grey is None:
        Image = _pil()
        with Image.open(files[0][1]) as im:
            grey = im.mode in ("L", "1", "I;16", "I")
    out = []
    for _, f in files:
        a = _read(f, grey)
        out.append(a[crop[0] : crop[1], crop[2] : crop[3]] if crop else _square(a))
    return out, np.array([lab for lab, _ in files], np.int64), subs or [os.path.basename(folder)]


def load_photo(name: str) -> np.ndarray:
    """A ``skimage.data`` photograph or texture as uint8 ``(H, W)`` or ``(H, W, 3)`` (no download needed)."""
    try:
        import skimage.data as sd
    except ImportError:
        raise RuntimeError("photographs come from scikit-image: pip install 'patchmosaic[images]'") from None
    if name not in PHOTOS or not hasattr(sd, name):
        raise ValueError(f"unknown skimage.data photograph {name!r}; known: {', '.join(PHOTOS)}")
    a = np.asarray(getattr(sd, name)())
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(np.ptp(a), 1e-12)).astype(np.uint8)
    return a[..., :3] if a.ndim == 3 else a


def crops(image: np.ndarray, size: int, stride: int) -> np.ndarray:
    """All ``size x size`` crops of one image ``(H, W[, C])`` at the given stride, ``(N, size, size[, C])``."""
    H, W = image.shape[:2]
    if size > min(H, W) or size < 1 or stride < 1:
        raise ValueError(f"crop size must be in [1, {min(H, W)}] and stride positive, got {size}, {stride}")
    return np.stack([image[r : r + size, c : c + size] for r in range(0, H - size + 1, stride)
                     for c in range(0, W - size + 1, stride)])
