"""The machines' operations as PyTorch custom ops (``torch.ops.patchmosaic.*``).

Each op is a ``torch.library.custom_op`` with a fake implementation (shapes without running, for
``torch.compile`` and meta tensors) and an autograd formula, and runs on the CPU engine, the CUDA engine
or the torch reference (reference.py) by the device of its query and the ``backend`` argument:

- ``local_softmax``: LS / ELS / boundary-aware ELS: a softmax over the key set a machine hands in as a table
  (ops/tables.py; the rules that build the tables are the machines', machines/keysets.py);
- ``ideal_softmax``: IS;
- ``local_softmax_backward``, ``ideal_softmax_backward``: their vector-Jacobian products (engines.hpp);
- ``local_softmax_jvp``, ``ideal_softmax_jvp``: their Jacobian-vector products (forward mode, in torch:
  reference.py); how these meet autograd and the ``torch.func`` transforms: ops/autodiff.py;
- ``candidate_softmax``: the patch index's exact re-scoring of candidate keys (CPU).

Value checks (finite query, ``t`` in (0, 1], known labels, the key set's existence, memory) run once, in
the op, before any work; they are part of the op, so a compiled graph keeps them without a graph break.
The derivative (engines.hpp): the output of a row is a softmax average, so
``d<g, out>/dQ = 2 s sum_q w_q <g, V_q - out> (a K_q - Q)``; the engines accumulate it as flash
attention's backward pass does. Provenance and statistics outputs are not differentiable.
"""

from __future__ import annotations

import hashlib

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import autodiff, checks, engines, masks, reference, triton_engine
from .labels import groups
from .tables import KeySet, MultiKeySet

BACKENDS = ("auto", "cpu", "torch", "cuda", "triton")


# ------------------------------------------------------------------------------------------ dispatch
def _engine(query: Tensor, backend: str, C: int, shape=None):
    """The engine module that runs a call: engines.CPU, engines.CUDA, the Triton engine, or the reference.
    ``shape``: ``(op, kind, k, N)`` of a forward pass (``kind``: the key-set table's, ``KeySet.kind``), for
    ``auto``'s measured table (triton_engine/auto.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    dev = query.device.type
    if backend == "torch":
        return reference
    if backend == "triton":  # float32: the Triton kernels; float64: the device's existing engine
        return triton_engine.engine_for(query)
    if backend == "cuda":
        if not engines.cuda_available():
            raise RuntimeError(engines.cuda_unavailable_reason())
        if dev != engines.cuda_device_type():
            raise ValueError(f"backend='cuda' needs CUDA inputs, got a tensor on {query.device}; move it with .cuda() "
                             "or use 'auto'")
        return engines.CUDA
    if backend == "cpu":
        if dev != "cpu":
            raise ValueError(f"backend='cpu' needs CPU inputs, got a tensor on {query.device}; use 'auto' or 'torch'")
        return engines.CPU
    # auto: by device, and on a GPU by the measured table where it has the call's shape
    if dev == "cpu":
        return engines.CPU
    measured = triton_engine.auto_choice(query, C, shape)
    if measured is not None:
        return measured
    if dev == "cuda" and engines.cuda_available() and C <= engines.CUDA_MAX_CHANNELS:
        return engines.CUDA
    return reference


def _backward_engine(query: Tensor, backend: str, C: int, shape=None):
    """The engine of a backward pass: ``_engine``'s for the forward pass's ``shape`` (so that ``auto`` picks the
    forward's engine: the backward reads its statistics, whose convention is the engine's), except that the
    Triton engine's backward passes run on the compiled engine of the tensors' device
    (ops/triton_engine/__init__.py)."""
    engine = _engine(query, backend, C, shape)
    return triton_engine.backward_engine(query) if engine is triton_engine else engine


def gradient_fakes(query: Tensor, a: Tensor, inv_2b2: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """A backward op's fake outputs: the query's gradient like the query, those of ``a`` and ``inv_2b2`` float64 on
    the query's device whatever their own dtype (as the real ones)."""
    f64 = dict(dtype=torch.float64)
    return torch.empty_like(query), query.new_empty(a.shape, **f64), query.new_empty(inv_2b2.shape, **f64)


def _run_forward(engine, name, *args, **kw):
    if engine is reference:
        return getattr(reference, name)(*args)
    return getattr(engines, name)(engine, *args, **kw)


def _prepare(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor):
    dev = query.device
    return (train.to(device=dev, dtype=query.dtype).contiguous(), query.contiguous(),
            a.to(device=dev, dtype=torch.float64).contiguous(), inv_2b2.to(device=dev, dtype=torch.float64).contiguous())


def _local_keyset(query_class: Tensor, key_class: Tensor, query_pad: int, key_pad: int, query: Tensor,
                  train: Tensor) -> KeySet:
    """The key set of a call from its class maps (ops/tables.py), checked against the canvas of the queries and
    the training size before any work."""
    for name, cls, (h, w), what in (("query_class", query_class, query.shape[2:], "query canvas"),
                                    ("key_class", key_class, train.shape[2:], "training images")):
        if cls.dim() != 1 or cls.dtype != torch.int64 or cls.numel() != int(h) * int(w):
            raise ValueError(f"{name} must be a flat int64 tensor with one class per pixel of the {int(h)}x{int(w)} "
                             f"{what}, got {tuple(cls.shape)} {cls.dtype}")
    return KeySet.from_classes(query_class.detach().cpu().numpy(), key_class.detach().cpu().numpy(), query_pad,
                               key_pad)


def _check_mask(patch_mask: Optional[Tensor], k: int, query: Tensor) -> Optional[Tensor]:
    """The checked weights of a call's neighbourhood mask (ops/masks.py), or None."""
    if patch_mask is None:
        return None
    w = masks.check_patch_mask(patch_mask)
    if w.shape[-1] != k:
        raise ValueError(f"patch_mask is {w.shape[-2]}x{w.shape[-1]} but the call's patch size is k={k}: the mask "
                         "is the k x k frame of the patch")
    Hq, Wq = int(query.shape[2]), int(query.shape[3])
    if w.dim() == 4 and tuple(w.shape[:2]) != (Hq, Wq):
        raise ValueError(f"patch_mask holds one mask per pixel of a {w.shape[0]}x{w.shape[1]} canvas, but the "
                         f"queries are {Hq}x{Wq}")
    return w


def _masked_patch(engine, w: Optional[Tensor], ks, C: int, like: Tensor):
    """``(keyset, mask)``: the key set of a call (its classes split by mask for a mask per pixel) and the masked
    neighbourhood as the engine takes it: the element table (compiled engines) or the element weights, per class
    for a mask per pixel (the reference); None for the square patch (no mask, or one full mask of ones)."""
    if w is None:
        return ks, None
    if w.dim() == 4:
        ks, mask_of_class, distinct = masks.split_by_mask(ks, w)
        if engine is reference:
            per_mask = [masks.element_weights(wc, C, like) for wc in distinct]
            return ks, [per_mask[i] for i in mask_of_class]
        return ks, masks.class_elements(mask_of_class, distinct, C)
    elements = masks.patch_elements(w, C)
    if elements is None:
        return ks, None
    return ks, (masks.element_weights(w, C, like) if engine is reference else elements)


# ------------------------------------------------------------------------------- local machines
@torch.library.custom_op("patchmosaic::local_softmax", mutates_args=())
def local_softmax(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, t: Optional[Tensor],
                  labels: Optional[Tensor], label_values: Tensor, label_ptr: Tensor, label_images: Tensor,
                  query_class: Tensor, key_class: Tensor, query_pad: int, key_pad: int, k: int,
                  provenance: bool, backend: str,
                  n_threads: int, max_memory: int, patch_mask: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Local machine (LS / ELS / boundary-aware ELS) forward pass -> ``(out, stats, arg_key, arg_share)``.

    ``train`` (N, C, H, W); ``query`` (B, C, Hq, Wq) float32/float64; ``a``, ``inv_2b2`` (B,) float64 from
    the noise schedule; ``t`` (B,) the times, for the check of their range (None when already checked);
    ``labels`` (B,) int64 or None; ``label_*`` the machine's label index (ops/labels.py); ``query_class``
    (Hq * Wq,), ``key_class`` (H * W,) int64, ``query_pad``, ``key_pad``: the key set as class maps and padding
    codes (ops/tables.py, ``KeySet.from_classes``: a query pixel attends to the training positions of its class;
    class -1: a pixel not computed, giving 0, or a position that is no key). ``stats`` (B, Hq, Wq, 2) float64:
    each row's softmax maximum and sum (contract.hpp); ``arg_key``/``arg_share`` (B, Hq, Wq) when
    ``provenance``, else empty. ``patch_mask``: an optional neighbourhood mask in place of the square patch
    (ops/masks.py): ``(k, k)`` shared by every pixel, or ``(Hq, Wq, k, k)`` one per query pixel; boolean, or
    non-negative float weights.
    """
    checks.shapes(train, query, a, inv_2b2, t, labels, "local_softmax", whole=False)
    ks = _local_keyset(query_class, key_class, query_pad, key_pad, query, train)
    engine = _engine(query, backend, train.shape[1], ("local", ks.kind(), k, train.shape[0]))
    w = _check_mask(patch_mask, k, query)
    name = "torch" if engine is reference else engine.name
    checks.memory(checks.local_bytes(query.shape, query.dtype, train, k, name, provenance, n_threads),
                  f"the local machine (k={k}) on a batch of shape {tuple(query.shape)}", max_memory)
    checks.values(query, "x", t, a, inv_2b2)
    checks.scale(query, train, inv_2b2, checks.mask_weight(w, query.shape[1], k))
    ks, mask = _masked_patch(engine, w, ks, train.shape[1], query)
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    if engine is reference:
        return reference.local_forward(tr, q, k, ks, aa, ss, grp, provenance, weights=mask)
    if engine is triton_engine:
        return triton_engine.local_forward(tr, q, k, ks, aa, ss, grp, provenance, n_threads, elements=mask)
    return engines.local_forward(engine, tr, q, k, ks, aa, ss, grp, provenance, n_threads, elements=mask)


@local_softmax.register_fake
def _(train, query, a, inv_2b2, t, labels, label_values, label_ptr, label_images, query_class, key_class,
      query_pad, key_pad, k, provenance, backend, n_threads, max_memory, patch_mask=None):
    B, _, Hq, Wq = query.shape
    prov = (B, Hq, Wq) if provenance else (0,)
    return (torch.empty_like(query), query.new_empty((B, Hq, Wq, 2), dtype=torch.float64),
            query.new_empty(prov, dtype=torch.int64), query.new_empty(prov))


@torch.library.custom_op("patchmosaic::local_softmax_backward", mutates_args=())
def local_softmax_backward(grad_out: Tensor, out: Tensor, stats: Tensor, train: Tensor, query: Tensor, a: Tensor,
                           inv_2b2: Tensor, labels: Optional[Tensor], label_values: Tensor, label_ptr: Tensor,
                           label_images: Tensor, query_class: Tensor, key_class: Tensor, query_pad: int,
                           key_pad: int, k: int, backend: str, n_threads: int, patch_mask: Optional[Tensor] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """The vector-Jacobian product of ``local_softmax``'s ``out`` for ``grad_out`` ->
    ``(grad_query, grad_a, grad_inv_2b2)``."""
    ks = _local_keyset(query_class, key_class, query_pad, key_pad, query, train)
    engine = _backward_engine(query, backend, train.shape[1], ("local", ks.kind(), k, train.shape[0]))
    ks, mask = _masked_patch(engine, _check_mask(patch_mask, k, query), ks, train.shape[1], query)
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    g = grad_out.to(q.dtype).contiguous()
    if engine is reference:
        return reference.local_backward(g, out, stats, tr, q, k, ks, aa, ss, grp, weights=mask)
    return engines.local_backward(engine, g, out.contiguous(), stats.contiguous(), tr, q, k, ks, aa, ss, grp, n_threads,
                                  elements=mask)


@local_softmax_backward.register_fake
def _(grad_out, out, stats, train, query, a, inv_2b2, labels, label_values, label_ptr, label_images, query_class,
      key_class, query_pad, key_pad, k, backend, n_threads, patch_mask=None):
    return gradient_fakes(query, a, inv_2b2)


@torch.library.custom_op("patchmosaic::local_softmax_jvp", mutates_args=())
def local_softmax_jvp(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, labels: Optional[Tensor],
                      label_values: Tensor, label_ptr: Tensor, label_images: Tensor, query_class: Tensor,
                      key_class: Tensor, query_pad: int, key_pad: int, k: int, patch_mask: Optional[Tensor],
                      tangent_query: Optional[Tensor], tangent_a: Optional[Tensor],
                      tangent_inv_2b2: Optional[Tensor]) -> Tensor:
    """The Jacobian-vector product of ``local_softmax``'s ``out`` for the tangents of ``query``, ``a`` and
    ``inv_2b2`` (None: zero), computed by the torch formula on any device (reference.local_jvp)."""
    ks = _local_keyset(query_class, key_class, query_pad, key_pad, query, train)
    ks, mask = _masked_patch(reference, _check_mask(patch_mask, k, query), ks, train.shape[1], query)
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    return reference.local_jvp(tr, q, k, ks, aa, ss, grp, tangent_query, tangent_a, tangent_inv_2b2, weights=mask)


@local_softmax_jvp.register_fake
def _(train, query, a, inv_2b2, labels, label_values, label_ptr, label_images, query_class, key_class, query_pad,
      key_pad, k, patch_mask, tangent_query, tangent_a, tangent_inv_2b2):
    return torch.empty_like(query)


_LOCAL_NO_DERIVATIVE = ("the training images",) + (None,) * 17 + ("patch_mask",)
_IDEAL_NO_DERIVATIVE = ("the training images",)


def _no_tangent(tangents, names):
    """Refuse a tangent of an argument the ops have no derivative for (the training images, a mask's weights)."""
    for t, name in zip(tangents, names):
        if name is not None and t is not None:
            raise NotImplementedError(f"patchmosaic's ops have no derivative with respect to {name}: differentiate "
                                      "with respect to the queries x_t and the times t only")


def _asked(ctx):
    """The inputs a backward pass is asked a gradient of (a tangent's stand-in for :func:`_no_tangent`)."""
    return [True if need else None for need in ctx.needs_input_grad]


class LocalSoftmaxFunction(torch.autograd.Function):
    """``local_softmax``'s autograd and ``torch.func`` rules (ops/autodiff.py): reverse mode by
    ``local_softmax_backward``, forward mode by ``local_softmax_jvp``, vmap by folding into the query batch."""

    @staticmethod
    def forward(*args):
        return autodiff.call("local_softmax", *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (train, query, a, inv_2b2, t, labels, lv, lp, li, query_class, key_class, query_pad, key_pad, k, provenance,
         backend, n_threads, _, patch_mask) = inputs
        out, stats, key, share = output
        ctx.mark_non_differentiable(stats, key, share)
        ctx.save_for_backward(train, query, a, inv_2b2, labels, lv, lp, li, query_class, key_class, out, stats,
                              patch_mask)
        ctx.save_for_forward(train, query, a, inv_2b2, labels, lv, lp, li, query_class, key_class, patch_mask)
        ctx.set_materialize_grads(False)  # None, not zeros, for an input without a tangent
        ctx.args = (query_pad, key_pad, k, backend, n_threads)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        train, query, a, inv_2b2, labels, lv, lp, li, query_class, key_class, out, stats, patch_mask = \
            ctx.saved_tensors
        _no_tangent(_asked(ctx), _LOCAL_NO_DERIVATIVE)
        grads = [None] * _LOCAL_INPUTS
        if grad_out is None:
            return tuple(grads)
        query_pad, key_pad, k, backend, n_threads = ctx.args
        gq, ga, gs = torch.ops.patchmosaic.local_softmax_backward(grad_out, out, stats, train, query, a, inv_2b2,
                                                                 labels, lv, lp, li, query_class, key_class, query_pad,
                                                                 key_pad, k, backend, n_threads, patch_mask)
        grads[1], grads[2], grads[3] = gq, ga.to(a.dtype), gs.to(inv_2b2.dtype)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, *tangents):
        _no_tangent(tangents, _LOCAL_NO_DERIVATIVE)
        train, query, a, inv_2b2, labels, lv, lp, li, query_class, key_class, patch_mask = ctx.saved_tensors
        query_pad, key_pad, k, _, _ = ctx.args
        dout = torch.ops.patchmosaic.local_softmax_jvp(train, query, a, inv_2b2, labels, lv, lp, li, query_class,
                                                      key_class, query_pad, key_pad, k, patch_mask, tangents[1],
                                                      tangents[2], tangents[3])
        return dout, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return autodiff.fold(info, in_dims, args, (1, 2, 3, 4, 5), LocalSoftmaxFunction.apply)


_LOCAL_INPUTS = 19
autodiff.route("local_softmax", LocalSoftmaxFunction)
LocalSoftmaxBackwardFunction = autodiff.derivative_function("local_softmax_backward", (0, 1, 2, 4, 5, 6, 7))
LocalSoftmaxJvpFunction = autodiff.derivative_function("local_softmax_jvp", (1, 2, 3, 4, 14, 15, 16))


# ------------------------------------------------------------------ local machines, several sizes
def local_softmax_ks(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, t: Optional[Tensor],
                     labels: Optional[Tensor], label_values: Tensor, label_ptr: Tensor, label_images: Tensor,
                     multi: MultiKeySet, backend: str = "auto", n_threads: int = 0, max_memory: int = 0,
                     one_pass: bool = True) -> Tensor:
    """A local machine at several patch sizes on the same queries -> ``out`` ``(K, B, C, Hq, Wq)``, ``out[j]``
    the output at size ``multi.ks[j]`` (what ``local_softmax`` gives at that size with the key set of that size,
    to float rounding).

    A plain function, forward only (no autograd, no provenance, no statistics). On the compiled engines (CPU and
    CUDA) it is one pass: the squared distance at size ``ks[j]`` is that at ``ks[j-1]`` plus the ring between them,
    so each key patch is visited once, up to the largest size it serves (cpp/cpu/patch_softmax_multi.cpp,
    cpp/cuda/patch_softmax_multi.cu; boundary-aware ELS: the interior in one pass, the border pixels one size at a
    time, tables.MultiKeySet). The torch reference (``"torch"``) runs ``local_softmax`` once per size.

    Args:
        train, query, a, inv_2b2, t, labels, label_values, label_ptr, label_images, backend, n_threads,
            max_memory: as for :func:`local_softmax`.
        multi: the key sets at every size, one table (ops/tables.py; a machine's ``multi_keyset``); its sizes
            ``multi.ks`` are odd positive ints in strictly increasing order (1 to 32 of them).
        one_pass: False runs ``local_softmax`` once per size on every engine (for comparisons). Default True.
    """
    ks = tuple(int(k) for k in multi.ks)
    if not ks:
        raise ValueError("ks is empty: pass at least one patch size")
    if len(ks) > 32:
        raise ValueError(f"at most 32 patch sizes per call, got {len(ks)}")
    for k in ks:
        if k < 1 or k % 2 == 0:
            raise ValueError(f"patch sizes must be odd positive integers, got {k} in ks={list(ks)}")
    for k0, k1 in zip(ks, ks[1:]):
        if k1 <= k0:
            raise ValueError(f"patch sizes must be strictly increasing (sorted, no duplicates), got {k0} then {k1} "
                             f"in ks={list(ks)}")
    engine = _engine(query, backend, train.shape[1], ("local", multi.keyset.kind(), ks[-1], train.shape[0]))
    if len(multi.kmask) != len(multi.keyset.cls_kpos):
        raise ValueError("a multi-size table needs one size mask per key position")
    if engine is reference or not one_pass:
        name = "torch" if engine is reference else engine.name
        outs = [local_softmax(train, query, a, inv_2b2, t, labels, label_values, label_ptr, label_images,
                              *multi.size_keyset(j).class_maps(query, train), k, False, name, n_threads,
                              max_memory)[0]
                for j, k in enumerate(ks)]
        return torch.stack(outs)
    K, kmax = len(ks), ks[-1]
    B, C, Hq, Wq = (int(v) for v in query.shape)
    item = query.element_size()
    need = checks.local_bytes(query.shape, query.dtype, train, kmax, engine.name, False, n_threads)
    need += K * B * C * Hq * Wq * item  # out
    if engine is engines.CUDA:
        # partial states (m, s, C sums per size) of every row of every work item: one item per row block
        # of up to 64 rows, plus at most 4096 more (the key-range split, cuda/local_tile.cuh plan_cuda)
        need += (B * Hq * Wq + 4096 * 64) * K * (C + 2) * 8
    else:
        need += 2 * B * Hq * Wq * (C + 3) * 8 * K
    checks.memory(need, f"the local machine at sizes {list(ks)} on a batch of shape {tuple(query.shape)}", max_memory)
    checks.values(query, "x", t, a, inv_2b2)
    checks.scale(query, train, inv_2b2, C * kmax * kmax)
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    with torch.no_grad():
        if engine is triton_engine:
            return triton_engine.local_forward_multi(tr.detach(), q.detach(), multi, aa.detach(), ss.detach(), grp)
        return engines.local_forward_multi(engine, tr.detach(), q.detach(), multi, aa.detach(), ss.detach(), grp,
                                           n_threads)


# ---------------------------------------------------------------------------------- ideal score
@torch.library.custom_op("patchmosaic::ideal_softmax", mutates_args=())
def ideal_softmax(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, t: Optional[Tensor],
                  labels: Optional[Tensor], label_values: Tensor, label_ptr: Tensor, label_images: Tensor,
                  provenance: bool, backend: str, n_threads: int, max_memory: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """IS forward pass -> ``(out, stats (B, 2), arg_key (B,), arg_share (B,))`` (provenance empty unless asked)."""
    checks.shapes(train, query, a, inv_2b2, t, labels, "ideal_softmax", whole=True)
    engine = _engine(query, backend, train.shape[1], ("ideal", None, 0, train.shape[0]))
    item = query.element_size()
    checks.memory(3 * query.numel() * item + (train.numel() * item if train.dtype != query.dtype else 0)
                  + query.shape[0] * train.shape[0] * 8,
                  f"the IS machine on a batch of shape {tuple(query.shape)}", max_memory)
    checks.values(query, "x", t, a, inv_2b2)
    checks.scale(query, train, inv_2b2, train[0].numel())
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    if engine is reference:
        return reference.ideal_forward(tr, q, aa, ss, grp, provenance)
    if engine is triton_engine:
        return triton_engine.ideal_forward(tr, q, aa, ss, grp, provenance)
    return engines.ideal_forward(engine, tr, q, aa, ss, grp, provenance, n_threads)


@ideal_softmax.register_fake
def _(train, query, a, inv_2b2, t, labels, label_values, label_ptr, label_images, provenance, backend, n_threads,
      max_memory):
    B = query.shape[0]
    prov = (B,) if provenance else (0,)
    return (torch.empty_like(query), query.new_empty((B, 2), dtype=torch.float64),
            query.new_empty(prov, dtype=torch.int64), query.new_empty(prov))


@torch.library.custom_op("patchmosaic::ideal_softmax_backward", mutates_args=())
def ideal_softmax_backward(grad_out: Tensor, out: Tensor, stats: Tensor, train: Tensor, query: Tensor, a: Tensor,
                           inv_2b2: Tensor, labels: Optional[Tensor], label_values: Tensor, label_ptr: Tensor,
                           label_images: Tensor, backend: str, n_threads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The vector-Jacobian product of ``ideal_softmax``'s ``out``."""
    engine = _engine(query, backend, train.shape[1], ("ideal", None, 0, train.shape[0]))  # (the forward's engine)
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    g = grad_out.to(q.dtype).contiguous()
    if engine is triton_engine:
        return triton_engine.ideal_backward(g, tr, q, aa, ss, grp)
    if engine is reference:
        return reference.ideal_backward(g, out, stats, tr, q, aa, ss, grp)
    return engines.ideal_backward(engine, g, out.contiguous(), stats.contiguous(), tr, q, aa, ss, grp, n_threads)


@ideal_softmax_backward.register_fake
def _(grad_out, out, stats, train, query, a, inv_2b2, labels, label_values, label_ptr, label_images, backend, n_threads):
    return gradient_fakes(query, a, inv_2b2)


@torch.library.custom_op("patchmosaic::ideal_softmax_jvp", mutates_args=())
def ideal_softmax_jvp(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, labels: Optional[Tensor],
                      label_values: Tensor, label_ptr: Tensor, label_images: Tensor, tangent_query: Optional[Tensor],
                      tangent_a: Optional[Tensor], tangent_inv_2b2: Optional[Tensor]) -> Tensor:
    """The Jacobian-vector product of ``ideal_softmax``'s ``out`` (the torch formula, reference.ideal_jvp)."""
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    return reference.ideal_jvp(tr, q, aa, ss, grp, tangent_query, tangent_a, tangent_inv_2b2)


@ideal_softmax_jvp.register_fake
def _(train, query, a, inv_2b2, labels, label_values, label_ptr, label_images, tangent_query, tangent_a,
      tangent_inv_2b2):
    return torch.empty_like(query)


class IdealSoftmaxFunction(torch.autograd.Function):
    """``ideal_softmax``'s autograd and ``torch.func`` rules (see :class:`LocalSoftmaxFunction`)."""

    @staticmethod
    def forward(*args):
        return autodiff.call("ideal_softmax", *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (train, query, a, inv_2b2, t, labels, lv, lp, li, provenance, backend, n_threads, _) = inputs
        out, stats, key, share = output
        ctx.mark_non_differentiable(stats, key, share)
        ctx.save_for_backward(train, query, a, inv_2b2, labels, lv, lp, li, out, stats)
        ctx.save_for_forward(train, query, a, inv_2b2, labels, lv, lp, li)
        ctx.set_materialize_grads(False)  # None, not zeros, for an input without a tangent
        ctx.args = (backend, n_threads)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        train, query, a, inv_2b2, labels, lv, lp, li, out, stats = ctx.saved_tensors
        _no_tangent(_asked(ctx), _IDEAL_NO_DERIVATIVE)
        grads = [None] * _IDEAL_INPUTS
        if grad_out is None:
            return tuple(grads)
        backend, n_threads = ctx.args
        gq, ga, gs = torch.ops.patchmosaic.ideal_softmax_backward(grad_out, out, stats, train, query, a, inv_2b2,
                                                                 labels, lv, lp, li, backend, n_threads)
        grads[1], grads[2], grads[3] = gq, ga.to(a.dtype), gs.to(inv_2b2.dtype)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, *tangents):
        _no_tangent(tangents, _IDEAL_NO_DERIVATIVE)
        train, query, a, inv_2b2, labels, lv, lp, li = ctx.saved_tensors
        dout = torch.ops.patchmosaic.ideal_softmax_jvp(train, query, a, inv_2b2, labels, lv, lp, li, tangents[1],
                                                      tangents[2], tangents[3])
        return dout, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return autodiff.fold(info, in_dims, args, (1, 2, 3, 4, 5), IdealSoftmaxFunction.apply)


_IDEAL_INPUTS = 13
autodiff.route("ideal_softmax", IdealSoftmaxFunction)
IdealSoftmaxBackwardFunction = autodiff.derivative_function("ideal_softmax_backward", (0, 1, 2, 4, 5, 6, 7))
IdealSoftmaxJvpFunction = autodiff.derivative_function("ideal_softmax_jvp", (1, 2, 3, 4, 8, 9, 10))


# --------------------------------------------------------------------------- candidate re-scoring
@torch.library.custom_op("patchmosaic::candidate_softmax", mutates_args=(), device_types="cpu")
def candidate_softmax(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, pix: Tensor, cand: Tensor,
                      count: Optional[Tensor], k: int, query_pad: int, key_pad: int, provenance: bool,
                      n_threads: int, patch_mask: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Softmax over the candidate keys ``cand`` (P, m) of the listed pixels ``pix`` (P,), logits recomputed
    exactly (contract.hpp, PM_CANDIDATE_FIELDS) -> ``(out, top_logit, last_logit, sum_rel, arg_key,
    arg_share)``. CPU tensors. ``patch_mask``: an optional ``(k, k)`` neighbourhood mask shared by every pixel
    (ops/masks.py)."""
    elements = None
    if patch_mask is not None:
        w = _check_mask(patch_mask, k, query)
        if w.dim() != 2:
            raise ValueError("the candidate re-scoring takes one (k, k) mask shared by every pixel")
        elements = masks.patch_elements(w, train.shape[1])
    checks.finite(query, "x")
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    return engines.candidate_softmax(tr, q, k, query_pad, key_pad, aa, ss, pix.to(torch.int64).contiguous(),
                                     cand.to(torch.int64).contiguous(),
                                     None if count is None else count.to(torch.float64).contiguous(), provenance,
                                     n_threads, elements=elements)


@candidate_softmax.register_fake
def _(train, query, a, inv_2b2, pix, cand, count, k, query_pad, key_pad, provenance, n_threads, patch_mask=None):
    P = cand.shape[0]
    prov = (P,) if provenance else (0,)
    f64 = dict(dtype=torch.float64)
    return (torch.empty_like(query), query.new_empty((P,), **f64), query.new_empty((P,), **f64),
            query.new_empty((P,), **f64), query.new_empty(prov, dtype=torch.int64), query.new_empty(prov))


_NO_INDEX_GRADIENT = ("the patch index's approximate machine has no gradient; use the exact machine "
                      "(Machine.denoise) where you need one")


class CandidateSoftmaxFunction(torch.autograd.Function):
    """``candidate_softmax``'s autograd and ``torch.func`` rules: no derivative (a clear error in reverse and
    forward mode), vmap one slice at a time."""

    @staticmethod
    def forward(*args):
        return autodiff.call("candidate_softmax", *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(_NO_INDEX_GRADIENT)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_NO_INDEX_GRADIENT)

    @staticmethod
    def vmap(info, in_dims, *args):
        return autodiff.fold(info, in_dims, args, (), CandidateSoftmaxFunction.apply)


autodiff.route("candidate_softmax", CandidateSoftmaxFunction)


# ----------------------------------------------------------------------------------- seeded draws
@torch.library.custom_op("patchmosaic::seeded_normal", mutates_args=())
def seeded_normal(times: Tensor, seed: int, samples: int, shape: List[int]) -> Tensor:
    """Standard normal draws ``(samples, *shape)`` float64 on the CPU, those of query image ``b`` (``[:, b]``)
    from a generator seeded by ``seed``, its time ``times[b]`` (float64 ``(B,)``), ``b`` and ``shape``: the same
    draws for the same call whatever ran before (the smoothed denoiser's perturbations). An op, so that a compiled
    graph reads the times when it runs (a time given as a tensor) and holds the draws as one opaque node."""
    return seeded_draws(times.detach().cpu().to(torch.float64).reshape(-1).tolist(), seed, samples, shape)


def seeded_draws(vals: List[float], seed: int, samples: int, shape: List[int]) -> Tensor:
    """:func:`seeded_normal` for times given as Python floats, without the op's dispatch (an eager caller's path:
    the same draws)."""
    B = int(shape[0])
    if len(vals) != B:
        raise ValueError(f"seeded_normal needs one time per image ({B}), got {len(vals)}")
    eps = torch.empty((samples,) + tuple(shape), dtype=torch.float64)
    for b in range(B):
        key = f"{seed}:{float(vals[b]).hex()}:{b}:{tuple(shape)}".encode()
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
        eps[:, b] = torch.randn((samples,) + tuple(shape[1:]), generator=gen, dtype=torch.float64)
    return eps


@seeded_normal.register_fake
def _(times, seed, samples, shape):
    return times.new_empty((samples,) + tuple(shape), dtype=torch.float64, device="cpu")
