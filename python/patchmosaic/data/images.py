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


GREY_MODES = ("L", "1", "I;16", "I;16L", "I;16B", "I;16N", "I", "LA", "La")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _open(path: str):
    """``Image.open`` of one file, with a picture above Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``, a
    decompression bomb: a small file that decodes to gigabytes) and an unreadable file refused by a
    ValueError naming ``path``."""
    import warnings

    Image = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refused, the picture is too large to decode safely ({e}); raise "
                         "PIL.Image.MAX_IMAGE_PIXELS to read it on purpose") from None
    except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def has_alpha(im) -> bool:
    """Whether a Pillow image carries transparency (an alpha channel or a transparent palette entry)."""
    return im.mode in ALPHA_MODES or "transparency" in im.info


def is_grey(path: str) -> bool:
    """Whether the picture at ``path`` is grey (read from its header, nothing decoded)."""
    with _open(path) as im:
        return im.mode in GREY_MODES


def read_image(path: str, grey: Optional[bool] = None, alpha: str = "refuse") -> np.ndarray:
    """One picture as ``(H, W)`` (grey) or ``(H, W, 3)``: uint8, or uint16 with the full range of a 16-bit
    grey file (scaled by 65535 in :func:`patchmosaic.data.preprocess`; Pillow reads 16-bit colour files as
    8 bits, scaled). ``grey``: convert to grey (True) or RGB (False); None: as the file is. A picture with an
    alpha channel (or a transparent palette) is refused unless ``alpha="drop"``. Every failure -- not an
    image, truncated, too large (a decompression bomb) -- is a ValueError naming ``path``."""
    if alpha not in ("refuse", "drop"):
        raise ValueError(f"alpha must be 'refuse' or 'drop', got {alpha!r}")
    with _open(path) as stored:
        im = _upright(stored, path)
        mode = im.mode
        if has_alpha(im) and alpha != "drop":
            raise ValueError(f"{path} has an alpha channel (mode {mode}); images are grey or RGB: drop the alpha "
                             "channel first, or pass alpha='drop' (--drop-alpha) to drop it")
        if grey is None:
            grey = mode in GREY_MODES
        try:
            if mode in SIXTEEN_BIT or mode == "I":
                a = np.asarray(im)
                if mode == "I" and (a.min() < 0 or a.max() > 65535):
                    raise ValueError(f"{path}: 32-bit integer pixels outside 0..65535 (mode I) are not supported")
                a = a.astype(np.uint16)
                return a if grey else np.repeat(a[:, :, None], 3, axis=2)
            if mode == "F":
                raise ValueError(f"{path}: floating-point pixels (mode F) are not supported; save 8- or 16-bit "
                                 "images")
            return np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
        except ValueError:
            raise
        except (OSError, SyntaxError) as e:  # a truncated or corrupt file fails while decoding
            raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def _upright(im, path: str):
    """The picture as it is meant to be seen: a JPEG's (or TIFF's) EXIF orientation tag applied (a camera's portrait
    photograph is stored sideways); ``im`` itself when it has none."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # (an unreadable EXIF block: the stored picture)
        return im
    if orientation in (None, 1):
        return im
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None


def _square(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(h, w)
    return a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def list_folder(folder: str) -> Tuple[List[Tuple[int, str]], List[str]]:
    """``([(label, path), ...], class names)`` of the image files of ``folder`` in sorted order, nothing decoded:
    sub-folders are classes (label = index of the sorted sub-folder name; hidden ones, ``.name``, are skipped);
    without sub-folders the files directly inside get label 0. A folder holding both image files and class
    sub-folders, or a class sub-folder without images, is refused (a ValueError naming it)."""
    if not os.path.isdir(folder):
        raise ValueError(f"no image folder at {folder}")

    def images_in(d):
        return [os.path.join(d, f) for f in sorted(os.listdir(d))
                if not f.startswith(".") and f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(d, f))]

    subs = sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    top = images_in(folder)
    if subs and top:
        raise ValueError(f"{folder} holds both image files ({os.path.basename(top[0])}, ...) and class sub-folders "
                         f"({', '.join(subs[:3])}{', ...' if len(subs) > 3 else ''}): move the files into a class "
                         "folder, or give a folder of files only")
    files = []
    for lab, d in enumerate(subs):
        mine = images_in(os.path.join(folder, d))
        if not mine:
            raise ValueError(f"class folder {os.path.join(folder, d)} holds no images ({', '.join(EXTENSIONS)}): an "
                             "empty class; remove it or add its images")
        files += [(lab, f) for f in mine]
    if not subs:
        files = [(0, f) for f in top]
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(EXTENSIONS)})")
    return files, subs or [os.path.basename(folder)]


class FolderImages:
    """The pictures of a folder as a sequence that decodes a file only when it is indexed (so a subset or a
    ``limit`` decodes only the files it keeps): ``images[i]`` is uint8 / uint16 ``(H, W)`` or ``(H, W, 3)``,
    cropped (``crop = (r0, r1, c0, c1)``, else the centre square); ``labels`` and ``paths`` are known at once.
    ``grey`` None: grey if every file kept is (read from their headers by :meth:`prepare`, so that a colour picture
    among grey ones makes every picture RGB instead of losing its colour)."""

    def __init__(self, folder: str, *, grey: Optional[bool] = None, crop: Optional[Tuple[int, int, int, int]] = None,
                 alpha: str = "refuse"):
        files, self.classes = list_folder(folder)
        self.paths = [f for _, f in files]
        self.labels = np.array([lab for lab, _ in files], np.int64)
        self.grey = None if grey is None else bool(grey)
        self.crop, self.alpha = crop, alpha

    def prepare(self, keep) -> None:
        """Decide grey or RGB from the headers of the files ``keep`` (indices) when ``grey`` was not given."""
        if self.grey is None:
            self.grey = all(is_grey(self.paths[int(i)]) for i in keep)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.grey is None:
            self.prepare(range(len(self.paths)))
        a = read_image(self.paths[int(i)], self.grey, self.alpha)
        c = self.crop
        return a[c[0] : c[1], c[2] : c[3]] if c else _square(a)


def load_folder(folder: str, *, grey: Optional[bool] = None, crop: Optional[Tuple[int, int, int, int]] = None,
                limit: Optional[int] = None, alpha: str = "refuse") -> Tuple[List[np.ndarray], np.ndarray, List[str]]:
    """Images of ``folder`` in sorted order (uint8 or uint16 ``(H, W)`` or ``(H, W, 3)``), labels and class names;
    only the first ``limit`` files are decoded.

    Sub-folders are classes (label = index of the sorted sub-folder name); files directly inside get
    label 0. ``grey`` None: grey if every image read is. ``crop = (r0, r1, c0, c1)``, else a centre square.
    ``alpha``: a picture with an alpha channel is refused (``"refuse"``, default) or loses it (``"drop"``).
    """
    imgs = FolderImages(folder, grey=grey, crop=crop, alpha=alpha)
    n = len(imgs) if limit is None else min(len(imgs), int(limit))
    imgs.prepare(range(n))
    return [imgs[i] for i in range(n)], imgs.labels[:n], imgs.classes


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
