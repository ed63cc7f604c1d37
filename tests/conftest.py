import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The Triton engine's kernels run on CPU tensors only under Triton's interpreter, which must be on before they are
# first loaded: without a CUDA device the suite switches it on (tests/triton_cases.py).
if importlib.util.find_spec("triton") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import triton_cases

        triton_cases.interpreter_without_nested_repatching()

SHARED = os.environ.get("PATCHMOSAIC_SHARED") or os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def noisy(rng, train, B, t, schedule, size=None, labels_of=None):
    """Queries that look like the forward process: a * (a training image, perturbed) + b * noise."""
    import patchmosaic as pm

    N, C, H, W = train.shape
    Hq, Wq = size or (H, W)
    a, b2 = pm.schedules.get_schedule(schedule).coefficients(np.broadcast_to(np.asarray(t, float), (B,)))
    idx = rng.integers(0, N, B)
    x0 = np.empty((B, C, Hq, Wq))
    for b in range(B):
        tile = np.tile(train[idx[b]], (1, -(-Hq // H), -(-Wq // W)))[:, :Hq, :Wq]
        x0[b] = np.clip(tile + 0.1 * rng.standard_normal(tile.shape), -1, 1)
    eps = rng.standard_normal((B, C, Hq, Wq))
    return a[:, None, None, None] * x0 + np.sqrt(b2)[:, None, None, None] * eps


def scripted(module):
    """``torch.jit.script(module)`` without torch's deprecation warning: TorchScript modules (such as the reference
    networks) stay supported as inputs, which the tests that call this check; torch's deprecation is not theirs."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=DeprecationWarning)
        return torch.jit.script(module)
