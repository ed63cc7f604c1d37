"""The checks an op makes of its values, once per call, before any work (shapes and types are the
machines' to check, before the op is called; these need the data)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..validation import check_memory
from .memo import Memo

MAGNITUDES = Memo()  # the training images' max |value| (ops.memo: kept while the tensor lives unchanged)


def shapes(train: torch.Tensor, query: torch.Tensor, a: torch.Tensor, inv_2b2: torch.Tensor, t: Optional[torch.Tensor],
           labels: Optional[torch.Tensor], op: str, whole: bool) -> None:
    """The shapes and dtypes an op's arguments must agree on (the compiled engines trust them: a mismatch would
    read or write outside the buffers): ``train`` ``(N, C, H, W)`` and ``query`` ``(B, C, Hq, Wq)`` float32 or
    float64 with one ``C`` (``whole``: the same ``C x H x W``, IS and the same-position machines), ``B >= 1``; ``a``,
    ``inv_2b2`` (and ``t``, ``labels`` when given) one value per query image; integer labels. From the shapes
    alone: under ``torch.compile`` a check of the traced shapes."""
    for name, v in (("x", query), ("train", train)):
        if v.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape ({'B' if name == 'x' else 'N'}, C, H, W), got "
                             f"{tuple(v.shape)}")
    if query.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64, got {query.dtype}")
    if not train.dtype.is_floating_point:
        raise TypeError(f"{op}: the training images must be floating point, got {train.dtype}")
    B = int(query.shape[0])
    if B < 1:
        raise ValueError(f"{op}: x holds no image (shape {tuple(query.shape)})")
    have, want = (tuple(query.shape[1:]), tuple(train.shape[1:])) if whole else (query.shape[1], train.shape[1])
    if have != want:
        what = "images of the training size C x H x W" if whole else "the training images' channels"
        raise ValueError(f"{op}: x of shape {tuple(query.shape)} against training images of shape "
                         f"{tuple(train.shape)}: the queries must have {what}")
    for name, v in (("a", a), ("inv_2b2", inv_2b2), ("t", t), ("labels", labels)):
        if v is not None and tuple(v.shape) != (B,):
            raise ValueError(f"{op}: {name} must hold one value per query image, shape ({B},), got {tuple(v.shape)}")
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool):
        raise TypeError(f"{op}: labels must be integers, got {labels.dtype}")


def values(x: torch.Tensor, name: str, t: Optional[torch.Tensor], a: torch.Tensor, inv_2b2: torch.Tensor) -> None:
    """Every value of ``x`` finite, ``t`` in (0, 1] (when given as a tensor) and a schedule that leaves noise
    to remove at every t: one reduction, read once (one device sync for CUDA tensors), and the details
    only when something is wrong. Under the ``torch.func`` transforms the values checked are those the
    transform wraps (every slice of a ``vmap``); under ``torch.compile`` the check is one opaque node of the
    graph (:func:`check_values`), run with it."""
    if torch.compiler.is_compiling():
        torch.ops.patchmosaic.check_values(x.detach(), name, None if t is None else t.detach(), a.detach(),
                                           inv_2b2.detach())
        return
    x, t, a, inv_2b2 = (None if v is None else _unwrapped(v) for v in (x, t, a, inv_2b2))
    if x.is_meta:  # shapes only (a meta-device query: nothing to read)
        return
    ok = torch.isfinite(x).all() & (torch.isfinite(a) & torch.isfinite(inv_2b2) & (inv_2b2 > 0)).all()
    if t is not None:
        ok = ok & (torch.isfinite(t) & (t > 0) & (t <= 1)).all()
    if bool(ok):
        return
    finite(x, name)
    times(t, a, inv_2b2)


def _unwrapped(v: torch.Tensor) -> torch.Tensor:
    """The plain tensor inside ``v``'s ``torch.func`` wrappers (a ``vmap``'s: all slices, batched dimension
    included), for reading its values in a check."""
    v = v.detach()
    while torch._C._functorch.is_functorch_wrapped_tensor(v):
        v = torch._C._functorch.get_unwrapped(v)
    return v


@torch.library.custom_op("patchmosaic::check_values", mutates_args=())
def check_values(x: torch.Tensor, name: str, t: Optional[torch.Tensor], a: torch.Tensor,
                 inv_2b2: torch.Tensor) -> None:
    """:func:`values` as an op with no output, for a compiled graph (a check that reads the data is no guard
    of the graph; the op is marked as having a side effect, so that no compiler removes it)."""
    values(x, name, t, a, inv_2b2)


@check_values.register_fake
def _(x, name, t, a, inv_2b2):
    return None


@torch.library.custom_op("patchmosaic::check_labels", mutates_args=())
def check_labels(labels: torch.Tensor, label_values: torch.Tensor, label_ptr: torch.Tensor,
                 label_images: torch.Tensor, N: int) -> None:
    """A ValueError naming a query label no training image has (``labels.groups``' check), as an op with no
    output for machines that route their labels themselves (Wiener, SmoothedCFDM), in eager mode and in a
    compiled graph alike."""
    from .labels import groups

    groups(labels, label_values, label_ptr, label_images, N, labels.shape[0])


@check_labels.register_fake
def _(labels, label_values, label_ptr, label_images, N):
    return None


def labels_known(labels: torch.Tensor, label_values: torch.Tensor, label_ptr: torch.Tensor,
                 label_images: torch.Tensor, N: int) -> None:
    """A ValueError naming a query label no training image has: :func:`check_labels` under ``torch.compile``,
    else the check itself."""
    if torch.compiler.is_compiling():
        torch.ops.patchmosaic.check_labels(labels, label_values, label_ptr, label_images, N)
        return
    from .labels import groups

    groups(labels, label_values, label_ptr, label_images, N, labels.shape[0])


def finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values (shape {tuple(x.shape)})")


def times(t: Optional[torch.Tensor], a: torch.Tensor, inv_2b2: torch.Tensor) -> None:
    """``t`` in (0, 1] (when given as a tensor), and a schedule that leaves noise to remove at every t."""
    if t is not None:
        ok = torch.isfinite(t) & (t > 0) & (t <= 1)
        if not bool(ok.all()):
            raise ValueError(f"t must lie in (0, 1], got {float(t[~ok][0])}")
    bad = ~(torch.isfinite(a) & torch.isfinite(inv_2b2) & (inv_2b2 > 0))
    if bool(bad.any()):
        at = "" if t is None else f" at t = {float(t[bad][0])}"
        raise ValueError(f"the schedule gives alpha_bar(t) = 1{at}: no noise to remove")


def memory(nbytes: int, what: str, limit: Optional[int]) -> None:
    """:func:`patchmosaic.validation.check_memory` (``limit`` None or <= 0: the memory available); under
    ``torch.compile`` an opaque node of the graph (:func:`check_memory_op`), so that the memory free is read
    when the graph runs, not when it is traced."""
    limit = 0 if limit is None else int(limit)
    if torch.compiler.is_compiling():
        torch.ops.patchmosaic.check_memory(nbytes, what, limit)
        return
    check_memory(int(nbytes), what, None if limit <= 0 else limit)


@torch.library.custom_op("patchmosaic::check_memory", mutates_args=())
def check_memory_op(nbytes: int, what: str, limit: int) -> None:
    """:func:`memory` as an op with no output (marked as having a side effect, as :func:`check_values`)."""
    check_memory(int(nbytes), what, None if limit <= 0 else int(limit))


@check_memory_op.register_fake
def _(nbytes, what, limit):
    return None


def local_bytes(query_shape, dtype: torch.dtype, train: torch.Tensor, k: int, backend: str, provenance: bool,
                threads: int = 0) -> int:
    """Working memory of a local-machine call beyond its inputs, from the shapes alone (O(1)): outputs and
    statistics, the key set's index arrays, a conversion of the training set, and the engine's own buffers
    (CPU: per-thread key blocks and query tiles and the per-row partial states; torch: its chunks)."""
    B, C, Hq, Wq = (int(v) for v in query_shape)
    item = torch.empty((), dtype=dtype).element_size()
    pix = B * Hq * Wq
    d = C * int(k) * int(k)
    need = 2 * B * C * Hq * Wq * item + pix * 16  # output (+ a conversion), stats
    need += Hq * Wq * 24  # key set: class arrays of query pixels and key positions
    if provenance:
        need += pix * (8 + item)
    if train.dtype != dtype:
        need += train.numel() * item
    if backend == "cpu":
        from .engines import max_threads

        nt = threads if threads > 0 else max_threads()
        need += nt * (d * 256 * item * 3 + min(pix, 4096) * d * item)  # key block, logit tiles, query tile
        need += 2 * pix * (C + 3) * 8  # per-row partial softmax states (double), a few key ranges each
    elif backend == "torch":
        from .reference import BUDGET

        need += 8 * BUDGET * item + 4 * min(pix, 2048) * d * item
    elif backend == "cuda":
        need += pix * (C + 3) * 8 * 4
    elif backend == "triton":  # query patches as two float32 matrices; partial states, a few key ranges per row
        need += pix * (d + 64) * 8 + 4 * pix * (C + 3) * 8
    return need


# the largest logit magnitude a call may reach: well inside each type's range (float32 3.4e38)
LOGIT_LIMITS = {torch.float32: 1e30, torch.float64: 1e290}


def magnitude(x: torch.Tensor) -> float:
    """``max |x|`` (0 for an empty tensor), from one pass that allocates nothing (``aminmax``)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x.detach())
    return max(abs(float(lo)), abs(float(hi)))


def mask_weight(weights: Optional[torch.Tensor], C: int, k: int) -> float:
    """The largest total weight of one pixel's patch elements over all channels: ``C k^2`` for the square patch
    (``weights`` None), else ``C`` times the largest sum of a ``(k, k)`` mask's weights (per-pixel masks: of any
    pixel's) -- the factor of the logits' bound in :func:`scale`."""
    if weights is None:
        return float(C * k * k)
    w = weights.detach().to(torch.float64)
    return float(C) * float(w.reshape(-1, w.shape[-2] * w.shape[-1]).sum(1).amax())


def scale(query: torch.Tensor, train: torch.Tensor, inv_2b2: torch.Tensor, d: float) -> None:
    """Refuse data so large that the squared distances ``|Q - a K|^2`` (``d`` elements per patch, or the total
    weight of a neighbourhood mask's elements: :func:`mask_weight`) or the softmax logits ``-s |Q - a K|^2`` would
    overflow the working type, which would give NaN: both are at most ``max(s, 1) d (max|x| + max|train|)^2``
    (a <= 1; the engines form the distances in the working type before scaling them by s)."""
    xmax, kmax = magnitude(query), MAGNITUDES.get((train,), lambda: magnitude(train))
    smax = max(float(inv_2b2.detach().amax()), 1.0)
    bound = smax * d * (xmax + kmax) ** 2 if max(xmax, kmax, d) < 1e150 else float("inf")
    limit = LOGIT_LIMITS[query.dtype]
    if not bound <= limit:
        kind = "float32" if query.dtype == torch.float32 else "float64"
        weighted = f" and patch_mask weights summing to {d:.3g}" if d > 1e6 else ""
        raise ValueError(f"the data are too large for {kind}: queries up to {xmax:.3g} and training values up to "
                         f"{kmax:.3g}{weighted} make squared distances or softmax logits up to {bound:.3g} (limit "
                         f"{limit:.0e}); rescale the data (e.g. to [-1, 1]){' or the mask weights' if weighted else ''}"
                         f"{' or use float64' if kind == 'float32' else ''}")


def check_cuda_inputs(**named) -> None:
    """Refuse, before any work, a CUDA tensor or CUDA device on a torch without CUDA. Each keyword names a
    tensor, a ``torch.device``, a device string or None (skipped; so is anything that is not a device, for
    the caller's own checks to name). Raises a RuntimeError naming the argument and the reason, instead of
    torch's bare ``AssertionError: Torch not compiled with CUDA enabled`` somewhere later."""
    for name, value in named.items():
        if isinstance(value, np.ndarray):  # (torch.compile traces an array as a tensor: it is on the CPU)
            continue
        is_tensor = torch.is_tensor(value)
        if is_tensor:
            device = value.device
        elif isinstance(value, (torch.device, str)):
            try:
                device = torch.device(value)
            except RuntimeError:
                continue
        else:
            continue
        if device.type != "cuda" or torch.cuda.is_available():
            continue
        what = f"{name} is a CUDA tensor (on {device})" if is_tensor else \
            f"{name}={str(value)!r} asks for a CUDA device"
        why = "built without CUDA" if torch.version.cuda is None else \
            f"built for CUDA {torch.version.cuda}, but it sees no CUDA device"
        raise RuntimeError(f"{what}, but this torch has no CUDA: torch {torch.__version__} was {why} "
                           "(torch.cuda.is_available() is False); use CPU tensors and device='cpu', or install a "
                           "CUDA build of torch on a machine with a GPU")


# the checks have no output: marked as side effects, so that no compiler removes them from a graph
for _op in (torch.ops.patchmosaic.check_values.default, torch.ops.patchmosaic.check_labels.default,
            torch.ops.patchmosaic.check_memory.default):
    torch.fx.node.has_side_effect(_op)
