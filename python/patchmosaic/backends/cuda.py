"""The CUDA engine (``cpp/cuda``): torch CUDA tensors in and out, no host round-trips.

The compiled core receives device addresses, shapes, the small index arrays (classes, groups, the
per-image coefficients) and the handle of torch's current stream; its kernels are only enqueued on
that stream, like any torch operation. Outputs are allocated here with torch.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .. import _core


MAX_CHANNELS = 4  # the local kernels are compiled for 1 to 4 channels

# The test suite also runs these kernels on the CPU, built under an emulator (tests/cuda_emulation.py):
# it sets _EMULATOR to that build's module, and host tensors then stand for device memory.
_EMULATOR = None


def built() -> bool:
    """Whether this build of the compiled core has the CUDA kernels."""
    return bool(getattr(_core, "has_cuda", False))


def available() -> bool:
    """Whether ``backend='cuda'`` can run: CUDA kernels built and a CUDA device visible to torch."""
    return _EMULATOR is not None or (built() and torch.cuda.is_available())


def device_type() -> str:
    """The torch device type of this engine's tensors: 'cuda' ('cpu' under the test suite's emulator)."""
    return "cpu" if _EMULATOR is not None else "cuda"


def _why_not() -> str:
    if not built():
        return ("backend='cuda' is not available: this build of patchmosaic has no CUDA engine (reinstall with "
                "a CUDA toolchain and PATCHMOSAIC_CUDA=ON; backend='torch' runs the plain PyTorch implementation "
                "on a GPU meanwhile)")
    return ("backend='cuda' is not available: patchmosaic was built with its CUDA engine but torch sees no CUDA "
            "device (torch.cuda.is_available() is False); use backend='cpu'")


def require() -> None:
    """Raise a RuntimeError explaining why the CUDA engine cannot run here, if it cannot."""
    if not available():
        raise RuntimeError(_why_not())


def _inputs(train: torch.Tensor, query: torch.Tensor):
    """(train, query, device): contiguous CUDA tensors of one device and one float dtype."""
    require()
    dev = query.device
    for name, t in (("query", query), ("train", train)):
        if t.device.type != device_type():
            raise ValueError(f"the cuda backend needs CUDA tensors, got {name} on {t.device}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the query is on {dev}")
    if train.dtype != query.dtype or query.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"train and query must share float32 or float64, got {train.dtype} and {query.dtype}")
    return train.contiguous(), query.contiguous(), dev


def _launch(dev: torch.device):
    """(compiled module, stream handle, device index, context that makes the device current)."""
    if _EMULATOR is not None:
        return _EMULATOR, 0, 0, contextlib.nullcontext()
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return _core, int(torch.cuda.current_stream(dev).cuda_stream), index, torch.cuda.device(dev)


def local(train, query, k, keyset, a, inv_2b2, groups, provenance=False, n_threads=0):
    tr, q, dev = _inputs(train, query)
    B, C, Hq, Wq = q.shape
    if C > MAX_CHANNELS:
        raise ValueError(f"the cuda backend handles 1 to {MAX_CHANNELS} channels, got {C} (query shape "
                         f"{tuple(q.shape)}); use backend='torch' on the GPU")
    out = torch.empty_like(q)
    key = torch.empty((B, Hq, Wq), dtype=torch.int64, device=dev) if provenance else None
    share = torch.empty((B, Hq, Wq), dtype=q.dtype, device=dev) if provenance else None
    core, stream, index, current = _launch(dev)
    with current:
        core.patch_softmax_cuda(
            q.dtype == torch.float64, tr.data_ptr(), list(tr.shape), q.data_ptr(), list(q.shape), int(k),
            keyset.query_pad, keyset.key_pad,
            np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(inv_2b2, dtype=np.float64),
            keyset.cls_qpix_ptr, keyset.cls_qpix, keyset.cls_kpos_ptr, keyset.cls_kpos,
            groups.grp_img_ptr, groups.grp_img, groups.group_of_b,
            out.data_ptr(), 0 if key is None else key.data_ptr(), 0 if share is None else share.data_ptr(),
            stream, index,
        )
    return out, key, share


def ideal(train, query, a, inv_2b2, groups, provenance=False, n_threads=0):
    tr, q, dev = _inputs(train, query)
    B, N = q.shape[0], tr.shape[0]
    out = torch.empty_like(q)
    key = torch.empty((B,), dtype=torch.int64, device=dev) if provenance else None
    share = torch.empty((B,), dtype=q.dtype, device=dev) if provenance else None
    core, stream, index, current = _launch(dev)
    with current:
        core.ideal_score_cuda(
            q.dtype == torch.float64, tr.data_ptr(), [N, math.prod(tr.shape[1:])], q.data_ptr(),
            [B, math.prod(q.shape[1:])],
            np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(inv_2b2, dtype=np.float64),
            groups.grp_img_ptr, groups.grp_img, groups.group_of_b,
            out.data_ptr(), 0 if key is None else key.data_ptr(), 0 if share is None else share.data_ptr(),
            stream, index,
        )
    return out, key, share
