"""The compiled engines behind the ops: torch tensors in, call structs to ``_core``, torch tensors out.

Two engines run the same contract (cpp/include/patchmosaic/engines.hpp): the CPU engine on host tensors,
the CUDA engine on CUDA tensors (on torch's current stream). Outputs are allocated here, with torch, on
the query's device. The test suite also runs the CUDA kernels on the CPU, built under an emulator
(tests/cuda_emulation.py): it sets ``_EMULATOR`` to that build's module, and host tensors then stand for
device memory.

The CPU engine is built for several instruction-set levels, each a module of the extension (CMakeLists.txt):
``_core`` (the baseline, x86-64-v2), ``_core_avx2`` (x86-64-v3), ``_core_avx512`` (x86-64-v4) and, when asked
for at build time, ``_core_native``. At import the best one this CPU executes is chosen (like FAISS's
loader); ``PATCHMOSAIC_CPU_VARIANT=baseline|avx2|avx512|native`` forces one, :func:`cpu_variant` says which
runs, :func:`use_cpu_variant` switches (for benchmarks and tests).
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, Optional

import torch

from .. import _core
from . import contract
from .tables import KeySet
from .labels import Groups

# variant name -> (module, the x86-64 level it needs; None: whatever the build machine had)
_LEVELS = {"avx512": ("_core_avx512", "x86-64-v4"), "avx2": ("_core_avx2", "x86-64-v3"),
           "native": ("_core_native", None)}
_PREFERENCE = ("native", "avx512", "avx2", "baseline")


def cpu_variants() -> Dict[str, str]:
    """The CPU engine variants of this build that this CPU can run: ``{name: instruction-set level}``."""
    found = {"baseline": str(_core.CPU_VARIANT)}
    for name, (module, level) in _LEVELS.items():
        if level is not None and not _core.cpu_supports(level):
            continue
        try:
            mod = importlib.import_module(f"patchmosaic.{module}")
        except ImportError:
            continue
        found[name] = str(mod.CPU_VARIANT)
    return found


def _load(name: str):
    return _core if name == "baseline" else importlib.import_module(f"patchmosaic.{_LEVELS[name][0]}")


def _choose() -> str:
    available = cpu_variants()
    forced = os.environ.get("PATCHMOSAIC_CPU_VARIANT")
    if forced:
        if forced not in available:
            known = ", ".join(sorted(set(_PREFERENCE)))
            from ..validation import ConfigurationError

            raise ConfigurationError(f"PATCHMOSAIC_CPU_VARIANT={forced!r}: not a variant this build has and this CPU "
                                     f"runs (runnable here: {sorted(available)}; names: {known})")
        return forced
    return next(name for name in _PREFERENCE if name in available)


_CPU_VARIANT = _choose()
_CPU_MODULE = _load(_CPU_VARIANT)


def cpu_variant() -> str:
    """The CPU engine variant in use (``"avx512"``, ``"avx2"``, ``"native"`` or ``"baseline"``)."""
    return _CPU_VARIANT


def use_cpu_variant(name: str) -> None:
    """Run the CPU engine from variant ``name`` from now on (one this build has and this CPU runs)."""
    global _CPU_VARIANT, _CPU_MODULE
    available = cpu_variants()
    if name not in available:
        raise ValueError(f"CPU engine variant {name!r} cannot run here (runnable: {sorted(available)})")
    _CPU_VARIANT, _CPU_MODULE = name, _load(name)


CUDA_MAX_CHANNELS = int(_core.CUDA_MAX_CHANNELS)
CUDA_MAX_K = int(_core.CUDA_MAX_K)
_EMULATOR = None


def cuda_built() -> bool:
    """Whether this build of the compiled core has the CUDA kernels."""
    return bool(getattr(_core, "has_cuda", False))


def cuda_available() -> bool:
    """Whether the CUDA engine can run: CUDA kernels built and a CUDA device visible to torch."""
    return _EMULATOR is not None or (cuda_built() and torch.cuda.is_available())


def cuda_device_type() -> str:
    """The torch device type of the CUDA engine's tensors: 'cuda' ('cpu' under the test suite's emulator)."""
    return "cpu" if _EMULATOR is not None else "cuda"


def cuda_unavailable_reason() -> str:
    if not cuda_built():
        return ("backend='cuda' is not available: this build of patchmosaic has no CUDA engine (reinstall with "
                "a CUDA toolchain and PATCHMOSAIC_CUDA=ON; backend='torch' runs the plain PyTorch implementation "
                "on a GPU meanwhile)")
    return ("backend='cuda' is not available: patchmosaic was built with its CUDA engine but torch sees no CUDA "
            "device (torch.cuda.is_available() is False); use backend='cpu'")


class Engine:
    """One compiled engine: ``name`` is 'cpu' or 'cuda'."""

    def __init__(self, name: str):
        self.name = name

    @property
    def module(self):
        if self.name == "cpu":
            return _CPU_MODULE
        return _EMULATOR if _EMULATOR is not None else _core

    def run(self, entry: str, call, device: torch.device, *cpu_args) -> None:
        """Runs ``entry`` on ``call``; ``cpu_args``: further arguments of the CPU entry point."""
        fn = getattr(self.module, f"{entry}_{self.name}")
        if self.name == "cpu":
            fn(call, *cpu_args)
            return
        if _EMULATOR is not None:
            fn(call, 0, 0)
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(device):
            fn(call, int(torch.cuda.current_stream(device).cuda_stream), index)


CPU, CUDA = Engine("cpu"), Engine("cuda")


def _provenance_buffers(shape, query: torch.Tensor, provenance: bool):
    if not provenance:
        return query.new_empty((0,), dtype=torch.int64), query.new_empty((0,))
    return (torch.full(shape, -1, dtype=torch.int64, device=query.device),
            torch.zeros(shape, dtype=query.dtype, device=query.device))


def local_forward(engine: Engine, train, query, k: int, keyset: KeySet, a, inv_2b2, groups: Groups,
                  provenance: bool, n_threads: int = 0, elements=None):
    """(out, stats, arg_key, arg_share) of the local machines; pixels without a row (a restricted key set)
    get 0, with key -1 and share 0. ``elements``: a masked patch's element table (masks.PatchElements), None
    for the square patch."""
    B, C, Hq, Wq = query.shape
    partial = keyset.n_rows_per_image < Hq * Wq
    out = torch.zeros_like(query) if partial else torch.empty_like(query)
    stats = torch.zeros((B, Hq, Wq, 2), dtype=torch.float64, device=query.device)
    key, share = _provenance_buffers((B, Hq, Wq), query, provenance)
    if keyset.n_rows_per_image == 0:
        return out, stats, key, share
    call = contract.local_call(engine.module, train=train, query=query, k=k, keyset=keyset, a=a, inv_2b2=inv_2b2,
                               groups=groups, out=out, stats=stats, arg_key=key if provenance else None,
                               arg_share=share if provenance else None, n_threads=n_threads, elements=elements)
    engine.run("local_forward", call, query.device)
    return out, stats, key, share


def local_forward_multi(engine: Engine, train, query, multi, a, inv_2b2, groups: Groups, n_threads: int = 0):
    """The multi-size forward pass of a compiled engine (``CPU`` or ``CUDA``): ``out`` (K, B, C, Hq, Wq) on the
    query's device, ``out[j]`` the local machine's output at patch size ``multi.ks[j]``.

    Args:
        engine: :data:`CPU` or :data:`CUDA` (its tensors on the engine's device).
        train: ``(N, C, H, W)`` training images, the dtype of ``query``, contiguous.
        query: ``(B, C, Hq, Wq)`` noisy images, contiguous.
        multi: the key sets at every size (a tables.MultiKeySet).
        a, inv_2b2: ``(B,)`` float64 coefficients of each query image.
        groups: the training images each query image attends to (labels.Groups).
        n_threads: CPU threads (0: all available); the CUDA engine ignores it.
    """
    B, C, Hq, Wq = query.shape
    # a pixel no class computes at a size: 0
    out = torch.zeros((len(multi.ks), B, C, Hq, Wq), dtype=query.dtype, device=query.device)
    call, ks = contract.local_multi_call(engine.module, train=train, query=query, multi=multi, a=a, inv_2b2=inv_2b2,
                                         groups=groups, out=out, n_threads=n_threads)
    engine.run("local_forward_multi", call, query.device)
    del ks  # kept alive until the call returned
    return out


def local_backward(engine: Engine, grad_out, out, stats, train, query, k: int, keyset: KeySet, a, inv_2b2,
                   groups: Groups, n_threads: int = 0, elements=None):
    """(grad_query, grad_a, grad_inv_2b2): the vector-Jacobian product of local_forward's out."""
    grad_query = torch.zeros_like(query)
    grad_a = torch.zeros_like(a)
    grad_s = torch.zeros_like(inv_2b2)
    if keyset.n_rows_per_image == 0:
        return grad_query, grad_a, grad_s
    call = contract.local_call(engine.module, train=train, query=query, k=k, keyset=keyset, a=a, inv_2b2=inv_2b2,
                               groups=groups, out=out, stats=stats, grad_out=grad_out, grad_query=grad_query,
                               grad_a=grad_a, grad_inv_2b2=grad_s, n_threads=n_threads, elements=elements)
    engine.run("local_backward", call, query.device)
    return grad_query, grad_a, grad_s


def aligned_forward(engine: Engine, train, query, table, a, inv_2b2, groups: Groups, provenance: bool,
                    n_threads: int = 0):
    """(out, stats, arg_key, arg_share) of a same-position machine (contract.hpp, AlignedCall): ``out`` ``(B,
    n_resp)`` the rows' responses, ``stats`` ``(B, n_rows, 2)``, provenance ``(B, n_rows)`` or empty."""
    B = query.shape[0]
    out = torch.empty((B, len(table.resp_elem)), dtype=query.dtype, device=query.device)
    stats = torch.empty((B, table.n_rows, 2), dtype=torch.float64, device=query.device)
    key, share = _provenance_buffers((B, table.n_rows), query, provenance)
    call = contract.aligned_call(engine.module, train=train, query=query, table=table, a=a, inv_2b2=inv_2b2,
                                 groups=groups, out=out, stats=stats, arg_key=key if provenance else None,
                                 arg_share=share if provenance else None, n_threads=n_threads)
    engine.run("aligned_forward", call, query.device, *hood_plan(engine, call, table, query.dtype))
    return out, stats, key, share


def hood_plan(engine: Engine, call, table, dtype: torch.dtype) -> tuple:
    """``(plan,)``: the CPU engine's HoodPlan of ``table`` for ``dtype`` (its rows' runs and chains,
    cpu/aligned_softmax.cpp), derived by the first call on this module and dtype and kept with the table; ``()`` for
    the CUDA engine."""
    if engine.name != "cpu":
        return ()
    key = ("hood_plan", engine.module.__name__, dtype)
    plan = table.derived.get(key)
    if plan is None:
        plan = table.derived[key] = engine.module.hood_plan_cpu(call)
    return (plan,)


def aligned_backward(engine: Engine, grad_out, out, stats, train, query, table, a, inv_2b2, groups: Groups,
                     n_threads: int = 0, transposed=None):
    """(grad_query, grad_a, grad_inv_2b2): the vector-Jacobian product of aligned_forward's out; ``transposed``:
    the table's transpose (the CUDA engine needs it)."""
    grad_query = torch.zeros_like(query)
    grad_a = torch.zeros_like(a)
    grad_s = torch.zeros_like(inv_2b2)
    call = contract.aligned_call(engine.module, train=train, query=query, table=table, a=a, inv_2b2=inv_2b2,
                                 groups=groups, out=out, stats=stats, grad_out=grad_out, grad_query=grad_query,
                                 grad_a=grad_a, grad_inv_2b2=grad_s, transposed=transposed, n_threads=n_threads)
    engine.run("aligned_backward", call, query.device, *hood_plan(engine, call, table, query.dtype))
    return grad_query, grad_a, grad_s


def ideal_forward(engine: Engine, train, query, a, inv_2b2, groups: Groups, provenance: bool, n_threads: int = 0):
    B = query.shape[0]
    out = torch.empty_like(query)
    stats = torch.zeros((B, 2), dtype=torch.float64, device=query.device)
    key, share = _provenance_buffers((B,), query, provenance)
    call = contract.ideal_call(engine.module, train=train, query=query, a=a, inv_2b2=inv_2b2, groups=groups, out=out,
                               stats=stats, arg_key=key if provenance else None,
                               arg_share=share if provenance else None, n_threads=n_threads)
    engine.run("ideal_forward", call, query.device)
    return out, stats, key, share


def ideal_backward(engine: Engine, grad_out, out, stats, train, query, a, inv_2b2, groups: Groups, n_threads: int = 0):
    grad_query = torch.zeros_like(query)
    grad_a = torch.zeros_like(a)
    grad_s = torch.zeros_like(inv_2b2)
    call = contract.ideal_call(engine.module, train=train, query=query, a=a, inv_2b2=inv_2b2, groups=groups, out=out,
                               stats=stats, grad_out=grad_out, grad_query=grad_query, grad_a=grad_a,
                               grad_inv_2b2=grad_s, n_threads=n_threads)
    engine.run("ideal_backward", call, query.device)
    return grad_query, grad_a, grad_s


def candidate_softmax(train, query, k: int, query_pad: int, key_pad: int, a, inv_2b2, pix, cand,
                      count: Optional[torch.Tensor], provenance: bool, n_threads: int = 0, elements=None):
    """The CPU engine's exact softmax over candidate keys (see contract.hpp, PM_CANDIDATE_FIELDS);
    ``elements``: a masked patch's element table (masks.PatchElements), None for the square patch."""
    P = cand.shape[0]
    out = torch.zeros_like(query)
    top, last, srel = (torch.empty(P, dtype=torch.float64) for _ in range(3))
    key, share = _provenance_buffers((P,), query, provenance)
    call = contract.candidate_call(_CPU_MODULE, train=train, query=query, k=k, query_pad=query_pad, key_pad=key_pad, a=a,
                                   inv_2b2=inv_2b2, pix=pix, cand=cand, count=count, out=out, top_logit=top,
                                   last_logit=last, sum_rel=srel, arg_key=key if provenance else None,
                                   arg_share=share if provenance else None, n_threads=n_threads,
                                   elements=elements)
    _CPU_MODULE.candidate_softmax_cpu(call)
    return out, top, last, srel, key, share


def max_threads() -> int:
    """OpenMP threads the CPU engine uses by default."""
    return int(_CPU_MODULE.max_threads())
