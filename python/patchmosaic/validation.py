"""Input checks shared by every machine: each raises before any work starts and names the problem."""

from __future__ import annotations

import contextlib
import math
import numbers
import os

import numpy as np
import torch


class ResourceError(ValueError, MemoryError):
    """A request whose working memory would exceed what this machine has."""


class ConfigurationError(RuntimeError):
    """The environment asks for something this installation cannot do (e.g. a ``PATCHMOSAIC_CPU_VARIANT`` this
    build lacks or this CPU cannot run); raised when the package is imported."""


def as_batch(x, name: str, ndim: int = 4) -> torch.Tensor:
    """numpy or torch -> torch tensor (no copy where possible); checks type, rank and dtype, from the
    metadata alone (no look at the values: this runs inside ``torch.compile`` without a graph break)."""
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got numpy dtype {x.dtype} with shape {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {x.dtype} with shape {tuple(x.shape)}")
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return x


def to_tensor(x, name: str, ndim: int = 4) -> torch.Tensor:
    """:func:`as_batch` (detached from autograd), and every value finite."""
    x = as_batch(x, name, ndim)
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values (shape {tuple(x.shape)})")
    return x


def concrete(t) -> float:
    """A Python number's value as a float. Under ``torch.compile``, where a float argument of the compiled function
    may be traced as a symbol, its value read while the graph is traced: the graph is specialised on it (and
    compiled again for another value), for what chooses its computation by a time (a neighbourhood, a table)."""
    if torch.compiler.is_compiling():
        return float.fromhex(float(t).hex())
    return float(t)


def outside_transforms():
    """A context in which tensors are made as constants that no ``torch.func`` transform wraps (a machine's cached
    tables, its seeded draws): ``torch.func``'s own switch; and outside inference mode, so that a constant first made
    under ``torch.inference_mode()`` can serve a later call that autograd records (an inference tensor cannot be saved
    for backward). Nothing under ``torch.compile`` (which traces no transform inside a graph)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    both = contextlib.ExitStack()  # (entered here; the `with` statement's exit leaves both)
    both.enter_context(torch._C._DisableFuncTorch())
    both.enter_context(torch.inference_mode(False))
    return both


def constant(t: torch.Tensor) -> np.ndarray:
    """The values of ``t`` as a numpy array, under the ``torch.func`` transforms too (``grad`` and ``jvp`` wrap their
    inputs; their values are the wrapped tensor's), for reading values a computation is built from (a time's
    neighbourhood, a draw's seed). A TypeError for a tensor ``vmap`` batches (its values differ per slice)."""
    t = t.detach()
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        if F.is_batchedtensor(t):
            raise TypeError("this argument is read as values that choose the computation (not differentiated): it "
                            "cannot be batched by torch.func.vmap; vmap over x only, or loop over its values")
        t = F.get_unwrapped(t)
    with outside_transforms():  # (an op on a plain tensor inside a transform wraps its result)
        return t.cpu().numpy().copy()


def to_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    """Integer labels of shape ``(n,)`` as an int64 numpy array."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    elif isinstance(labels, numbers.Integral):
        labels = np.full(n, int(labels))
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {labels.shape}")
    return labels.astype(np.int64)


def check_k(k, H: int, W: int) -> int:
    """An odd positive integer patch size."""
    if k is None:
        raise ValueError("this machine is local: pass a patch size k (an odd positive integer)")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"patch size k must be an odd positive integer, got {k!r}")
    k = int(k)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"patch size k must be an odd positive integer, got {k}")
    return k


def check_sweep(ks, H: int, W: int) -> list:
    """The patch sizes of a sweep (``denoise_ks``): a non-empty sequence of odd positive ints in strictly increasing
    order, as a list, or a TypeError / ValueError naming what is wrong."""
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a sequence of odd patch sizes, got {ks!r}")
    ks = [check_k(k, H, W) for k in ks]
    if not ks:
        raise ValueError("ks is empty: pass at least one patch size")
    for k0, k1 in zip(ks, ks[1:]):
        if k1 <= k0:
            raise ValueError(f"ks must be strictly increasing (sorted, no duplicates), got {k0} then {k1} in ks={ks}")
    return ks


def check_time(t) -> float:
    """One time as a Python float in ``(0, 1]``."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"t must be a float in (0, 1] or an array of them, got {type(t).__name__} {t!r}")
    t = float(t)
    if not (t > 0.0 and t <= 1.0):
        raise ValueError(f"t must lie in (0, 1], got {t}")
    return t


def check_time_type(t) -> None:
    """A TypeError for a time that is no number nor an array of them (None, a string, a bool, a boolean or object
    array), which numpy would read as NaN, fail to parse, or take as 0 and 1."""
    if t is None or isinstance(t, (str, bytes, bool, np.bool_)) or (
            isinstance(t, np.ndarray) and t.dtype.kind not in "iuf"):
        what = f"an array of dtype {t.dtype}" if isinstance(t, np.ndarray) else f"{type(t).__name__} {t!r}"
        raise TypeError(f"t must be a float in (0, 1] or an array of them, got {what}")


def check_t(t, B: int) -> np.ndarray:
    """Time as a float64 array of shape ``(B,)``, every entry in ``(0, 1]``."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().double().numpy()
    check_time_type(t)
    t = np.asarray(t, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(B, float(t))
    if t.shape != (B,):
        raise ValueError(f"t must be a float or have shape ({B},), got shape {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t <= 0.0) or np.any(t > 1.0):
        bad = t[~(np.isfinite(t) & (t > 0) & (t <= 1))][0]
        raise ValueError(f"t must lie in (0, 1], got {bad}")
    return t


def available_memory() -> int:
    """Bytes of memory this process may still use (MemAvailable, else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_max_memory(limit) -> int | None:
    """A machine's ``max_memory``: None (the memory available) or a positive number of bytes, as an int; a
    TypeError / ValueError naming it otherwise (0 or a negative limit is not "no limit")."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real):
        raise TypeError(f"max_memory must be None or a number of bytes, got {limit!r}")
    if not (math.isfinite(float(limit)) and limit >= 1):
        raise ValueError(f"max_memory must be None or a positive number of bytes, got {limit!r}")
    return int(limit)


def check_memory(nbytes: int, what: str, limit: int | None = None,
                 advice: str = "use a smaller batch or canvas") -> None:
    """Refuse a request whose working memory exceeds ``limit`` (default: what the machine has): the one check
    every entry point runs on its estimate, from the arguments alone, before allocating; ``advice`` ends the
    message."""
    limit = available_memory() if limit is None else limit
    if nbytes > limit:
        raise ResourceError(
            f"{what} needs about {nbytes / 2**30:.2f} GiB of working memory, more than the "
            f"{limit / 2**30:.2f} GiB available; {advice}"
        )


def check_threshold(theta) -> float:
    """``theta`` as a float in ``(0, 1]``, or a ValueError / TypeError naming it."""
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real):
        raise TypeError(f"threshold must be a number in (0, 1], got {theta!r}")
    theta = float(theta)
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {theta}")
    return theta
