"""The CUDA engine. Its kernels (``cpp/cuda``) arrive with the CUDA issue; until the compiled core
has them, asking for this backend fails with a clear message."""

from __future__ import annotations

from .. import _core


def available() -> bool:
    return bool(getattr(_core, "has_cuda", False))


def _unavailable(*args, **kwargs):
    raise RuntimeError(
        "backend='cuda' is not available: this build of patchmosaic has no CUDA engine "
        "(reinstall with a CUDA toolchain and PATCHMOSAIC_CUDA=ON; use backend='torch' to run the "
        "plain PyTorch implementation on a GPU meanwhile)"
    )


local = _unavailable
ideal = _unavailable
