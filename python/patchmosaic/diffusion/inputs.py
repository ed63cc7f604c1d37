"""Inputs of samplers and denoisers, taken as the machines take them (``Machine.denoise``): images as numpy
or torch float32/float64 (the result then has the same array type), labels as integers of any array type,
and CUDA tensors or devices refused up front on a torch without CUDA."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..ops.checks import check_cuda_inputs
from ..validation import as_batch


def as_images(x, name: str = "x") -> Tuple[torch.Tensor, bool]:
    """``x`` ``(B, C, H, W)``, float32 or float64, numpy or torch, as a torch tensor (numpy arrays are shared,
    not copied, where they are contiguous), and whether it was numpy. A TypeError or ValueError names a bad
    type, dtype or shape; a RuntimeError a CUDA tensor on a torch without CUDA."""
    check_cuda_inputs(**{name: x})
    if (isinstance(x, np.ndarray) or torch.is_tensor(x)) and x.ndim != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) array or tensor, got shape {tuple(x.shape)}")
    return as_batch(x, name), isinstance(x, np.ndarray)


def as_labels(labels, B: int, name: str = "labels") -> Optional[torch.Tensor]:
    """None, or ``B`` integer labels (numpy, torch, a list, or one int for every image) as an int64 tensor of
    shape ``(B,)`` (a tensor stays on its device, without a look at its values: ``torch.compile`` traces it)."""
    if labels is None:
        return None
    check_cuda_inputs(**{name: labels})
    if torch.is_tensor(labels):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"{name} must be integers, got dtype {labels.dtype}")
        lab = labels.detach().to(torch.int64)
    else:
        arr = np.asarray(labels)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
        lab = torch.from_numpy(arr.astype(np.int64))
    if lab.dim() == 0:
        lab = lab.expand(B)
    if tuple(lab.shape) != (B,):
        raise ValueError(f"{name} must hold one label per image ({B}), got shape {tuple(lab.shape)}")
    return lab


def like_input(out: torch.Tensor, is_numpy: bool):
    """``out`` as the caller gave its input: a numpy array for numpy input, else the tensor itself."""
    return out.detach().cpu().numpy() if is_numpy else out
