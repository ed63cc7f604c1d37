"""What the Triton engine's tests share: the skip mark, the device its kernels run on (CUDA where there is one,
else the CPU under Triton's interpreter, switched on by conftest.py), and its tolerances.

Tolerances (bench/RESULTS.md section 5c, bench/triton_precision.py): the split-precision logit error on MNIST and
CIFAR-10 patches, k = 3..23, t = 0.02..1, measured against float64 with a model of the tensor cores' accumulation
that truncates, is at most ``KAPPA`` units of ``u = 2^-24 s a |k| (2 |q| + a |k|)``, against at most ``KAPPA_F32``
for plain float32 products (the CPU and CUDA engines). So the Triton engine is held to the float32 engines' output
tolerances (mean 1e-5, max 1e-3 of the data range, tests/test_exactness.py), and where a test's tolerance is
written in the float32 logit error ``lam`` it takes ``TRITON_LAM = KAPPA / KAPPA_F32`` times it (at least 1).
"""

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _usable() -> str:
    """Why the Triton engine's tests cannot run here ('' when they can)."""
    if not HAS_TRITON:
        return ('triton is not installed: pip install "patchmosaic[gpu]" (or: pip install triton); on a machine '
                "without a GPU its kernels then run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)")
    if not torch.cuda.is_available():
        from patchmosaic.ops import triton_engine

        if triton_engine.version() < triton_engine.INTERPRETER_MIN:
            return (f"Triton's interpreter before {'.'.join(map(str, triton_engine.INTERPRETER_MIN))} cannot run the "
                    f"engine's kernels (triton {'.'.join(map(str, triton_engine.version()))} here): pip install "
                    "'triton>=3.8'")
    return ""


needs_triton = pytest.mark.skipif(bool(_usable()), reason=_usable() or "-")
TRITON = pytest.param("triton", marks=needs_triton)
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

KAPPA = 6.5  # worst split-precision logit error (truncating accumulation), units of u: RESULTS 5c
KAPPA_F32 = 8.3  # worst plain float32 logit error on the same patches (the CPU and CUDA engines)
TRITON_LAM = max(1.0, KAPPA / KAPPA_F32)


def on_device(x, backend: str):
    """``x`` (numpy) as the engine takes it: a tensor on the Triton device for ``"triton"``, unchanged otherwise."""
    import numpy as np

    if backend != "triton":
        return x
    return torch.from_numpy(np.ascontiguousarray(x)).to(DEVICE)


def to_numpy(y):
    return y.detach().cpu().numpy() if torch.is_tensor(y) else y


def interpreter_without_nested_repatching():
    """Make Triton's interpreter (TRITON_INTERPRET=1) skip re-patching ``triton.language`` at every call of a
    jit'd function from inside a kernel (``tl.sum``, ``tl.max``, ``tl.argmax`` are such functions; each re-patch
    inspects every member of the language modules, about 5 ms, six times per key tile). A launch has already
    patched ``triton.language`` and ``triton.language.core`` (the engine's kernels module imports both), so the
    nested patch changes nothing; tests/test_triton.py checks that results are bit-identical without this. Does
    nothing where the interpreter's internals differ from those it was written against (triton 3.x)."""
    if not HAS_TRITON:
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    cls = getattr(interpreter, "InterpretedFunction", None)
    if cls is None or getattr(cls, "patchmosaic_fast_nested", False) or not hasattr(cls, "rewrite"):
        return
    error = getattr(interpreter, "InterpreterError", RuntimeError)
    original = cls.__call__

    def call(self, *args, **kwargs):
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise error(repr(e)) from e

    cls.__call__ = call
    cls.patchmosaic_fast_nested = True
    cls.patchmosaic_original_call = original
