"""Data sets: images as float tensors in [-1, 1] with integer labels.

The package ships one small default set (``mnist_2k.npz``, below) so that its main job runs offline
on a fresh install. Loaders for other formats live beside it.
"""

from .default import load_default, preprocess
from .loaders import load, read_idx

__all__ = ["load", "load_default", "preprocess", "read_idx"]
