"""One entry point for every data set: ``load(spec, ...) -> (images, labels)``.

``images``: float32 ``(N, C, size, size)`` in [-1, 1] with the paper's preprocessing (``x / 127.5 - 1``,
bilinear antialiased resize when the size differs, e.g. MNIST 28 -> 32); ``labels``: int64 ``(N,)``.

``spec`` is one of

- ``"default"``: the packaged 2,000 MNIST digits (works offline on a fresh install);
- a named set, ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"celeba"``, looked for under ``root``
  (default ``$PATCHMOSAIC_DATA`` or ``~/.cache/patchmosaic``; Fashion-MNIST also in Debian's
  ``/usr/share/datasets/fashion-mnist``); ``download=True`` fetches it with torchvision where a network
  exists; otherwise the error says which files to put where;
- ``"skimage:NAME"``: a ``skimage.data`` photograph or texture (``brick``, ``grass``, ``astronaut``, ...):
  the whole picture at its own size, or with ``crop=S`` all ``S x S`` crops at ``stride`` as a training set;
- a path: an ``.npz`` file (uint8 images under ``x_train``/``images``/``x``, labels under
  ``y_train``/``labels``/``y``; with ``split="test"`` under ``x_test``/``y_test``), an IDX image file, or a folder
  holding IDX files, CIFAR-10 python batches, CelebA's ``img_align_celeba`` or any images (sub-folders = classes,
  hidden ones skipped; files beside class folders, or a class folder without images, are refused). JPEG's EXIF
  orientation is applied. ``split="test"`` where a set has no test split (the default set, a photograph, a folder
  of images) is refused.

Subsets: ``indices`` (positions in the file order), then ``classes`` (labels to keep), then ``limit``; in a
folder of image files only the files kept are decoded. ``layout`` (``"NHWC"`` / ``"NCHW"``) says where an
``.npz`` file's channel axis is when its shape leaves it open; ``alpha="drop"`` drops an alpha channel (refused
otherwise, in every format).
"""

from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .cifar import check_labels, load_cifar10
from .default import load_default_raw, preprocess
from .idx import find_idx, load_idx
from ..io.files import read_npz
from ..validation import check_memory
from .images import CELEBA_CROP, FolderImages, crops, load_photo

IMAGE_KEYS = ("x_train", "images", "x")
LABEL_KEYS = ("y_train", "labels", "y")
TEST_KEYS = ("x_test", "y_test")  # an .npz file's test split (split="test")
NAMED = ("mnist", "fashion-mnist", "cifar10", "celeba")
WHERE = {
    "mnist": "the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, ...) in ROOT/mnist",
    "fashion-mnist": "the four Fashion-MNIST IDX files in ROOT/fashion-mnist (Debian/Ubuntu: "
                     "apt-get install dataset-fashion-mnist)",
    "cifar10": "the extracted cifar-10-python.tar.gz (folder cifar-10-batches-py) in ROOT/cifar10",
    "celeba": "the extracted img_align_celeba.zip (folder img_align_celeba of 202,599 JPEGs) in ROOT/celeba",
}


def data_root(root: Optional[str] = None) -> str:
    """Where named data sets are looked for: ``root``, else ``$PATCHMOSAIC_DATA``, else ``~/.cache/patchmosaic``."""
    return root or os.environ.get("PATCHMOSAIC_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "patchmosaic")


def load(spec: str, *, limit: Optional[int] = None, size="auto", split: str = "train",
         indices: Optional[Sequence[int]] = None, classes: Optional[Sequence[int]] = None,
         root: Optional[str] = None, download: bool = False, crop: Optional[int] = None,
         stride: Optional[int] = None, layout: Optional[str] = None,
         alpha: str = "refuse") -> Tuple[torch.Tensor, torch.Tensor]:
    """Load ``spec`` (see the module docstring) as ``(images (N, C, size, size) float32, labels (N,) int64)``.

    ``size="auto"``: 32 (the paper's size) for image data sets; the picture's own size (or ``crop``) for
    ``skimage:`` photographs. ``size=None`` keeps every image's size (they must then agree).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a positive integer number of images, got {limit!r}")
    if size not in ("auto", None) and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or
                                       not 1 <= size <= 1 << 16):
        raise ValueError(f"size must be 'auto', None or an integer side in 1..65536, got {size!r}")
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"a data set is named by a string (a path, 'default', a named set or 'skimage:NAME'), got "
                        f"{type(spec).__name__}")
    spec = os.fspath(spec)
    if (crop is not None or stride is not None) and not spec.startswith("skimage:"):
        raise ValueError(f"crop and stride (--crop, --stride) cut a skimage: photograph into a training set; {spec!r} "
                         "is not one (its images are resized to size=, 32 by default)")
    opts = dict(layout=layout, alpha=alpha)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size == "auto":
        size = None if spec.startswith("skimage:") else 32
    if split == "test" and (spec == "default" or spec.startswith("skimage:")):
        raise ValueError(f"split='test': {spec!r} has no test split ("
                         f"{'2,000 training digits' if spec == 'default' else 'one photograph'})")
    if spec == "default":
        return _finish(*load_default_raw(), size, indices, classes, limit, **opts)
    if spec.startswith("skimage:"):
        img = load_photo(spec.split(":", 1)[1])
        if crop is None:
            raw, y = img[None], np.zeros(1, np.int64)
        else:
            raw = crops(img, int(crop), int(max(1, crop // 2) if stride is None else stride))
            y = np.zeros(len(raw), np.int64)
        return _finish(raw, y, size, indices, classes, limit, layout="NHWC", alpha=alpha)
    path = spec
    if spec in NAMED:
        path = _named(spec, data_root(root), download, split)
    raw, y, fixed = _read_path(path, split, alpha)
    return _finish(raw, y, size, indices, classes, limit, layout=fixed or layout, alpha=alpha)


def _read_path(path: str, split: str, alpha: str = "refuse"):
    """``(images, labels, layout)``: images as one array or a sequence of pictures decoded when indexed, and the
    layout the format fixes (None where the shape must say it)."""
    if not os.path.exists(path):
        raise ValueError(f"no data set at {path!r} (give 'default', a named set {NAMED}, 'skimage:NAME', "
                         "an .npz or IDX file, or a folder)")
    if path.lower().endswith(".npz"):
        return _read_npz(path, split) + (None,)
    if os.path.isfile(path):
        return load_idx(path) + (None,)  # (one IDX file: its path names the split)
    names = os.listdir(path)
    if any("idx3-ubyte" in n for n in names):
        return load_idx(*find_idx(path, split)) + (None,)
    if "cifar-10-batches-py" in names or "data_batch_1" in names or "test_batch" in names:
        return load_cifar10(path, split) + ("NHWC",)
    if split == "test":  # (CelebA's folder included: one set of images)
        raise ValueError(f"split='test': {path} is a folder of images, one set; give the test images' folder "
                         "itself, with the default split")
    if "img_align_celeba" in names or os.path.basename(os.path.normpath(path)) == "img_align_celeba":
        folder = path if "img_align_celeba" not in names else os.path.join(path, "img_align_celeba")
        imgs = FolderImages(folder, grey=False, crop=CELEBA_CROP, alpha=alpha)
        return imgs, imgs.labels, "NHWC"
    imgs = FolderImages(path, alpha=alpha)
    return imgs, imgs.labels, "NHWC"


def _read_npz(path: str, split: str = "train"):
    """uint8 (or uint16) images and int64 labels from an .npz of named arrays (no pickles); ``split="test"``: those
    under ``x_test`` / ``y_test``."""
    names = {}
    image_keys, label_keys = (IMAGE_KEYS, LABEL_KEYS) if split == "train" else (TEST_KEYS[:1], TEST_KEYS[1:])

    def pick(files):
        names["all"] = files
        names["x"] = next((k for k in image_keys if k in files), None)
        names["y"] = next((k for k in label_keys if k in files), None)
        return [k for k in (names["x"], names["y"]) if k is not None]

    arrays = read_npz(path, "a readable .npz file of images", pick)
    if names["x"] is None:
        what = f"the image keys {image_keys}" if split == "train" else "a test split (x_test, with labels y_test)"
        raise ValueError(f"{path} is not a readable .npz file of images{' with a test split' if split == 'test' else ''}"
                         f": it has none of {what} (it has {names['all']})")
    x = arrays[names["x"]]
    y = arrays.get(names["y"]) if names["y"] is not None else None
    if x.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: images under {names['x']!r} must be uint8 (or uint16) pixels, got {x.dtype}; "
                         "floats in [-1, 1] go straight to the machines (pm.ELS(images)), not through a data file")
    if x.ndim not in (3, 4) or len(x) == 0:
        raise ValueError(f"{path}: images must be (N, H, W) or (N, H, W, C) with N > 0, got shape {x.shape}")
    y = np.zeros(len(x), np.int64) if y is None else check_labels(y, len(x), path)
    return x, y


def _named(name: str, root: str, download: bool, split: str) -> str:
    folder = os.path.join(root, name)
    if name == "fashion-mnist" and not os.path.isdir(folder) and os.path.isdir("/usr/share/datasets/fashion-mnist"):
        folder = "/usr/share/datasets/fashion-mnist"
    if os.path.isdir(folder) and os.listdir(folder):
        return folder
    if download:
        _download(name, folder)
        return folder
    raise ValueError(f"{name} is not at {folder}: put {WHERE[name].replace('ROOT', root)}, "
                     "or pass download=True (--download) where a network and torchvision exist")


def _download(name: str, folder: str) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise RuntimeError(f"downloading {name} needs torchvision; or put {WHERE[name]}") from None
    os.makedirs(folder, exist_ok=True)
    try:
        if name == "mnist":
            tvd.MNIST(folder, download=True)
        elif name == "fashion-mnist":
            tvd.FashionMNIST(folder, download=True)
        elif name == "cifar10":
            tvd.CIFAR10(folder, download=True)
        else:
            tvd.CelebA(folder, download=True)
    except Exception as e:  # network errors come in many types
        raise RuntimeError(f"could not download {name} into {folder}: {e}; put {WHERE[name]} instead") from None
    for sub, _, files in os.walk(folder):  # torchvision nests the raw files; point at them
        if any("idx3-ubyte" in f for f in files) or "data_batch_1" in files:
            if sub != folder:
                for f in files:
                    os.replace(os.path.join(sub, f), os.path.join(folder, f))
            break


def _subset(n: int, y: np.ndarray, indices, classes, limit) -> np.ndarray:
    keep = np.arange(n)
    if indices is not None:
        idx = np.asarray(indices)
        if idx.size and idx.dtype.kind not in "iu":  # (a boolean mask would be read as indices 0 and 1)
            raise ValueError(f"indices must be integers, got {idx.dtype} values")
        if idx.size == 0 or idx.max() >= n or idx.min() < -n:
            raise ValueError(f"indices must lie in [0, {n}) (at least one), got "
                             f"{f'{idx.min()}..{idx.max()}' if idx.size else 'none'}")
        idx = idx.astype(np.int64).ravel()
        keep = keep[idx]
    if classes is not None:
        given = np.asarray(classes).ravel()
        if given.size == 0:
            raise ValueError("classes is empty: name at least one class to keep (or pass None for all)")
        if given.dtype.kind not in "iu":
            raise ValueError(f"classes must be integers, got {given.tolist()[:5]}")
        cls = [int(c) for c in given]
        for c in cls:
            if not np.any(y[keep] == c):
                raise ValueError(f"class {c} has no images in this data set (labels present: {sorted(set(y[keep].tolist()))})")
        keep = keep[np.isin(y[keep], cls)]
    return keep[:limit]


def _finish(raw, y, size, indices, classes, limit, layout=None, alpha="refuse"):
    if len(raw) == 0:
        raise ValueError("the data set holds no images")
    if isinstance(raw, np.ndarray) and (raw.ndim < 3 or 0 in raw.shape[1:]):
        raise ValueError(f"the data set's images have no pixels: array of shape {raw.shape}")
    keep = _subset(len(raw), np.asarray(y), indices, classes, limit)
    if size is not None:  # the float32 result, before any image is resized
        c = 3 if getattr(raw, "ndim", 0) == 4 else 1
        check_memory(4 * len(keep) * c * size * size, f"{len(keep)} images resized to {size}x{size}",
                     advice="use a smaller size or limit")
    if isinstance(raw, np.ndarray):
        x = preprocess(raw[keep], size, layout=layout, alpha=alpha)
    else:  # pictures one by one (a folder: decoded here, only those kept)
        if hasattr(raw, "prepare"):
            raw.prepare(keep)  # grey or RGB, from the headers of the pictures kept
        parts = [preprocess(raw[i][None], size, layout=layout, alpha=alpha) for i in keep]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)[:3]}; pass a size to resize them to")
        x = torch.cat(parts)
    return x, torch.from_numpy(np.asarray(y)[keep].astype(np.int64))

