"""The Triton engine (``backend="triton"``): the machines' softmax written in Triton, products on tensor cores in
split precision (tf32x3, kernels.py), float32 results within the float32 engines' tolerances.

What runs where:

- float32 forward passes of the local machines (LS, periodic ELS with interior or wrapped keys, boundary-aware
  ELS; labels, provenance, masked patches, a time per image; the multi-size pass of a calibration sweep) and of
  IS run on the Triton kernels: on CUDA tensors compiled for the GPU (Triton's autotuner picks the tiles), on CPU
  tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are first used; numpy, slow:
  for tests).
- float64 calls run on the existing engines of the tensors' device (the CUDA engine, else the torch reference on
  a GPU; the CPU engine on the CPU): TF32 tensor cores have nothing to offer float64.
- backward passes run on the compiled engine of the tensors' device (the CUDA engine on a GPU, else the torch
  reference; the CPU engine for CPU tensors): the local machines' from the Triton forward pass's ``out`` and
  ``stats`` (the contract's shifted-logit statistics), IS's from that engine's own forward pass (see
  :func:`ideal_backward`). The CUDA engine's backward is the only one written; whether a Triton backward would be
  faster is for a GPU run to measure (bench/gpu_triton.py times both passes).

The engine is a module with the interface of ``engines.py``'s functions (``local_forward``, ``local_forward_multi``,
``ideal_forward``), without the engine argument; ``engine_for`` chooses it, or the engine a call falls back to.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .tuning import settings  # noqa: F401  (the engine's knobs)

name = "triton"
INSTALL = 'pip install "patchmosaic[gpu]"  (or: pip install triton)'


def available() -> bool:
    """Whether ``triton`` can be imported."""
    return importlib.util.find_spec("triton") is not None


def unavailable_reason() -> str:
    return (f"backend='triton' needs the triton package, which is not installed: {INSTALL}. Triton needs a CUDA "
            "GPU for speed; on a CPU it runs under its interpreter (TRITON_INTERPRET=1), for tests")


INTERPRETER_MIN = (3, 8)  # older interpreters cannot take loop bounds loaded from memory (compiled kernels can)


def version() -> tuple:
    """The installed triton's (major, minor)."""
    from importlib.metadata import version as dist_version

    try:
        return tuple(int(v) for v in dist_version("triton").split(".")[:2])
    except Exception:  # noqa: BLE001  (a build without metadata: assume new enough)
        return (99, 0)


def interpreted() -> bool:
    """Whether the engine's kernels run under Triton's interpreter: decided when they are first loaded, by
    ``TRITON_INTERPRET`` (as Triton decides for every kernel)."""
    from . import kernels

    return type(kernels.local_softmax_kernel).__name__ == "InterpretedFunction"


def check(query: torch.Tensor) -> None:
    """Raise, before any work, the error that says why the Triton kernels cannot run on ``query``."""
    if not available():
        raise RuntimeError(unavailable_reason())
    if query.dtype != torch.float32:
        return  # float64 runs on the existing engines
    if query.device.type == "cpu":
        if interpreted() and version() < INTERPRETER_MIN:
            raise RuntimeError(f"Triton's interpreter before {INTERPRETER_MIN[0]}.{INTERPRETER_MIN[1]} cannot run "
                               f"patchmosaic's kernels (this is triton {'.'.join(map(str, version()))}); "
                               f"pip install 'triton>={INTERPRETER_MIN[0]}.{INTERPRETER_MIN[1]}' (compiled on a GPU, "
                               "triton 3 will do)")
        if not interpreted():
            flag = os.environ.get("TRITON_INTERPRET")
            raise ValueError("backend='triton' runs on CUDA tensors; this query is on the CPU, where Triton's kernels "
                             "run only under its interpreter (numpy, for tests), which must be switched on before "
                             "they are first loaded: set TRITON_INTERPRET=1 at the start of the process"
                             + (f" (it is {flag!r} now, set after they were loaded)" if flag else "")
                             + "; or move the tensors with .cuda(), or use backend='cpu'")
    elif query.device.type != "cuda":
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU tensors under Triton's interpreter), got a "
                         f"tensor on {query.device}")


def engine_for(query: torch.Tensor):
    """The engine of a forward pass with ``backend="triton"``: this module for float32, else the existing engine
    of the tensors' device (``engines.CPU``, ``engines.CUDA`` or the torch reference). Raises what :func:`check`
    raises."""
    import sys

    check(query)
    if query.dtype == torch.float32:
        return sys.modules[__name__]
    return backward_engine(query)


def backward_engine(query: torch.Tensor):
    """The engine of the backward passes (and of float64 calls): the compiled engine of the tensors' device (the
    CUDA engine on a GPU where it is built, else the torch reference; the CPU engine for CPU tensors)."""
    from .. import engines, reference

    if query.device.type == "cpu":
        return engines.CPU
    if query.device.type == "cuda" and engines.cuda_built() and torch.cuda.is_available():
        return engines.CUDA
    return reference


def auto_choice(query: torch.Tensor, C: int, shape):
    """``backend="auto"``'s engine for a forward pass of ``shape`` ``(op, rule, k, N)`` on a GPU, from the measured
    table (auto.py): ``engines.CUDA``, this module or the torch reference; None where the table has no row for
    the call (then ``auto`` keeps its rule: the CUDA engine)."""
    import sys

    from .. import engines, reference
    from . import auto

    if shape is None or query.device.type != "cuda":
        return None
    op, rule, k, N = shape
    found = {"torch": reference}
    if engines.cuda_available() and C <= engines.CUDA_MAX_CHANNELS:
        found["cuda"] = engines.CUDA
    if query.dtype == torch.float32 and available():
        found["triton"] = sys.modules[__name__]
    dtype = "float32" if query.dtype == torch.float32 else "float64"
    best = auto.choose(torch.cuda.get_device_name(query.device), op, rule, int(C), int(k or 0), int(query.shape[0]),
                       int(N), dtype, tuple(found))
    return found.get(best) if best else None


def local_forward(train, query, k, keyset, a, inv_2b2, groups, provenance=False, n_threads=0, elements=None):
    """The local machines' forward pass (engines.local_forward's contract), float32."""
    from . import local

    return local.local_forward(train, query, k, keyset, a, inv_2b2, groups, provenance, n_threads, elements,
                               interpreted())


def local_forward_multi(train, query, multi, a, inv_2b2, groups, n_threads=0):
    """Every patch size of a sweep (engines.local_forward_multi's contract), float32."""
    from . import local

    return local.local_forward_multi(train, query, multi, a, inv_2b2, groups, n_threads, interpreted())


def ideal_forward(train, query, a, inv_2b2, groups, provenance=False, n_threads=0):
    """IS's forward pass (engines.ideal_forward's contract: the statistics hold the largest logit itself, as every
    engine's IS), float32."""
    from . import ideal

    return ideal.ideal_forward(train, query, a, inv_2b2, groups, provenance, n_threads, interpreted())


def ideal_backward(grad_out, train, query, a, inv_2b2, groups):
    """IS's backward pass on the compiled engine of the tensors' device (:func:`backward_engine`), from that
    engine's own forward pass: IS's t-gradient ``-sum_n w_n <g, phi_n - out> |x - a phi_n|^2`` cancels
    (``sum_n w_n <g, phi_n - out> = 0``) and amplifies any difference between ``out`` and the weights the backward
    pass forms by ``E_w |x - a phi|^2`` (the image size), so the backward engine forms both; IS's forward pass is
    as cheap as its backward pass."""
    from .. import engines, reference

    engine = backward_engine(query)
    if engine is reference:
        out, stats, _, _ = reference.ideal_forward(train, query, a, inv_2b2, groups)
        return reference.ideal_backward(grad_out, out, stats, train, query, a, inv_2b2, groups)
    out, stats, _, _ = engines.ideal_forward(engine, train, query, a, inv_2b2, groups, False)
    return engines.ideal_backward(engine, grad_out, out, stats, train, query, a, inv_2b2, groups)
