"""Data sets: images as float tensors in [-1, 1] with integer labels.

The package ships one small default set (``mnist_2k.npz``, below) so that its main job runs offline
on a fresh install. Loaders for other formats live beside it.
"""

from .default import load_default, preprocess
from .cifar import load_cifar10
from .idx import load_idx, read_idx
from .images import crops, load_folder, load_photo
from .loaders import data_root, load

__all__ = ["load", "load_default", "preprocess", "read_idx", "load_idx", "load_cifar10", "load_folder",
           "load_photo", "crops", "data_root"]
