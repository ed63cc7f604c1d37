"""The same-position machines as a PyTorch custom op: ``torch.ops.patchmosaic.aligned_softmax``.

A same-position machine compares each query row with the training images at the query's own positions (LS,
PCA-locality, patch-set posteriors): every row is a softmax over the training images of the query's label group,
its logit a weighted squared distance over the row's neighbourhood of elements, its output the weighted mean of
its response elements (tables.ElementTable; contract.hpp, AlignedCall). Engines: the CPU engine (each image's
squared residual once, summed over each row's runs of elements: cpu/aligned_softmax.cpp), the CUDA engine
(cuda/aligned_softmax.cu), and the torch reference, a dense matrix product per chunk of images
(reference_aligned.py; the float64 oracle, and the faster path when the neighbourhoods are large).

The op returns the rows' responses ``(B, n_resp)``; a machine places them in its output (:func:`composite`).
Value checks and the memory check run in the op, before any work, as for the other ops (library.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import autodiff, checks, engines, masks, reference, reference_aligned, triton_engine
from .labels import groups
from .library import _asked, _engine, _no_tangent, _prepare, gradient_fakes
from .memo import Memo
from .tables import ElementTable


def _aligned_engine(query: Tensor, backend: str):
    """The engine of a call (library's choice by device and name); the torch reference is reference_aligned; the
    Triton engine has no same-position kernel, so ``"triton"`` runs on the compiled engine of the device."""
    engine = _engine(query, backend, 1)
    if engine is triton_engine:
        return triton_engine.backward_engine(query)
    return reference_aligned if engine is reference else engine


TABLES = Memo()  # checked element tables (ops.memo: kept while their tensors live unchanged)


def _table(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, query: Tensor) -> ElementTable:
    D = query[0].numel()
    return TABLES.get((hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem),
                      lambda: ElementTable.from_tensors(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, D),
                      extra=(D,))


def table_bytes(n_rows: int, row_elements: int) -> int:
    """Memory to make an element table of ``n_rows`` rows of at most ``row_elements`` elements (``patch_table``,
    ``window_table``: dense ``(rows, elements)`` index, mask and weight tensors), with its checked copy and the CPU
    engine's plan: about 40 bytes per element, from the sizes alone."""
    return 40 * int(n_rows) * int(row_elements)


def aligned_bytes(query_shape, dtype: torch.dtype, table_rows: int, n_resp: int, n_images: int, engine: str,
                  threads: int = 0) -> int:
    """Working memory of a same-position call beyond its inputs, from the sizes alone: outputs and statistics, and
    the engine's buffers (CPU: per part of the images the rows' states and one block of logits; torch: chunks)."""
    B = int(query_shape[0])
    D = int(np.prod([int(v) for v in query_shape[1:]]))
    item = torch.empty((), dtype=dtype).element_size()
    need = B * n_resp * item + B * table_rows * (16 + 8 + item)
    if engine == "cpu":
        parts = max(1, threads or engines.max_threads())
        # per running part: the rows' states, its 16 lanes of weight and response sums, one block of logits, the
        # block of images, its residuals and their prefix sums
        need += parts * (B * (3 * table_rows + n_resp) * 8 + B * (table_rows + n_resp) * 16 * item
                         + 16 * table_rows * 8 + 3 * (D + 1) * 8 * 16)
    elif engine == "torch":
        need += 6 * reference_aligned.BUDGET * item
    else:
        need += 2 * B * min(n_images, 1 << 16) // 64 * (3 * table_rows + n_resp) * 8
    return int(need)


@torch.library.custom_op("patchmosaic::aligned_softmax", mutates_args=())
def aligned_softmax(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, t: Optional[Tensor],
                    labels: Optional[Tensor], label_values: Tensor, label_ptr: Tensor, label_images: Tensor,
                    hood_ptr: Tensor, hood_elem: Tensor, hood_weight: Optional[Tensor], resp_ptr: Tensor,
                    resp_elem: Tensor, provenance: bool, backend: str, n_threads: int,
                    max_memory: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same-position machine forward pass -> ``(out, stats, arg_key, arg_share)``.

    ``train`` (N, C, H, W); ``query`` (B, C, H, W) float32/float64; ``a``, ``inv_2b2`` (B,) float64; ``t``
    (B,) the times for the range check (None when checked); ``labels`` and ``label_*`` as for ``local_softmax``;
    ``hood_*``, ``resp_*``: the element table (tables.ElementTable.tensors()). ``out`` (B, n_resp): each row's
    weighted mean of its response elements; ``stats`` (B, n_rows, 2) float64: the largest logit and the sum of
    ``exp(logit - max)`` (logits not shifted); ``arg_key`` (B, n_rows) int64 the winning training image and
    ``arg_share`` its weight when ``provenance``, else empty.
    """
    checks.shapes(train, query, a, inv_2b2, t, labels, "aligned_softmax", whole=True)
    engine = _aligned_engine(query, backend)
    table = _table(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, query)
    name = "torch" if engine is reference_aligned else engine.name
    checks.memory(aligned_bytes(query.shape, query.dtype, table.n_rows, len(table.resp_elem), train.shape[0], name,
                                n_threads), f"the same-position machine on a batch of shape {tuple(query.shape)} "
                  f"({table.n_rows} rows)", max_memory)
    checks.values(query, "x", t, a, inv_2b2)
    checks.scale(query, train, inv_2b2, table.largest_weight_sum())
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    if engine is reference_aligned:
        return reference_aligned.aligned_forward(tr, q, table, aa, ss, grp, provenance)
    return engines.aligned_forward(engine, tr, q, table, aa, ss, grp, provenance, n_threads)


@aligned_softmax.register_fake
def _(train, query, a, inv_2b2, t, labels, label_values, label_ptr, label_images, hood_ptr, hood_elem, hood_weight,
      resp_ptr, resp_elem, provenance, backend, n_threads, max_memory):
    B = query.shape[0]
    rows = hood_ptr.shape[0] - 1
    prov = (B, rows) if provenance else (0,)
    return (query.new_empty((B, resp_elem.shape[0])), query.new_empty((B, rows, 2), dtype=torch.float64),
            query.new_empty(prov, dtype=torch.int64), query.new_empty(prov))


@torch.library.custom_op("patchmosaic::aligned_softmax_backward", mutates_args=())
def aligned_softmax_backward(grad_out: Tensor, out: Tensor, stats: Tensor, train: Tensor, query: Tensor, a: Tensor,
                             inv_2b2: Tensor, labels: Optional[Tensor], label_values: Tensor, label_ptr: Tensor,
                             label_images: Tensor, hood_ptr: Tensor, hood_elem: Tensor, hood_weight: Optional[Tensor],
                             resp_ptr: Tensor, resp_elem: Tensor, backend: str,
                             n_threads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The vector-Jacobian product of ``aligned_softmax``'s ``out`` -> ``(grad_query, grad_a, grad_inv_2b2)``."""
    engine = _aligned_engine(query, backend)
    table = _table(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, query)
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    g = grad_out.to(q.dtype).contiguous()
    if engine is reference_aligned:
        return reference_aligned.aligned_backward(g, out, stats, tr, q, table, aa, ss, grp)
    transposed = transpose(table, q[0].numel()) if engine is engines.CUDA else None
    return engines.aligned_backward(engine, g, out.contiguous(), stats.contiguous(), tr, q, table, aa, ss, grp,
                                    n_threads, transposed)


@aligned_softmax_backward.register_fake
def _(grad_out, out, stats, train, query, a, inv_2b2, labels, label_values, label_ptr, label_images, hood_ptr,
      hood_elem, hood_weight, resp_ptr, resp_elem, backend, n_threads):
    return gradient_fakes(query, a, inv_2b2)


def transpose(table: ElementTable, D: int):
    """``(ptr, row, weight)``: for each element, the rows whose neighbourhood holds it (ascending) and its weight
    there (host arrays; the CUDA engine's backward pass reads the table by element)."""
    rows = np.repeat(np.arange(table.n_rows, dtype=np.int32), np.diff(table.hood_ptr))
    order = np.argsort(table.hood_elem, kind="stable")
    ptr = np.zeros(D + 1, np.int64)
    ptr[1:] = np.cumsum(np.bincount(table.hood_elem, minlength=D))
    w = np.ones(len(order)) if table.hood_weight is None else table.hood_weight[order]
    return ptr, np.ascontiguousarray(rows[order]), np.ascontiguousarray(w, np.float64)


@torch.library.custom_op("patchmosaic::aligned_softmax_jvp", mutates_args=())
def aligned_softmax_jvp(train: Tensor, query: Tensor, a: Tensor, inv_2b2: Tensor, labels: Optional[Tensor],
                        label_values: Tensor, label_ptr: Tensor, label_images: Tensor, hood_ptr: Tensor,
                        hood_elem: Tensor, hood_weight: Optional[Tensor], resp_ptr: Tensor, resp_elem: Tensor,
                        tangent_query: Optional[Tensor], tangent_a: Optional[Tensor],
                        tangent_inv_2b2: Optional[Tensor]) -> Tensor:
    """The Jacobian-vector product of ``aligned_softmax``'s ``out`` for the tangents of ``query``, ``a`` and
    ``inv_2b2`` (None: zero), computed by the torch formula on any device (reference_aligned.aligned_jvp)."""
    table = _table(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, query)
    grp = groups(labels, label_values, label_ptr, label_images, train.shape[0], query.shape[0])
    tr, q, aa, ss = _prepare(train, query, a, inv_2b2)
    return reference_aligned.aligned_jvp(tr, q, table, aa, ss, grp, tangent_query, tangent_a, tangent_inv_2b2)


@aligned_softmax_jvp.register_fake
def _(train, query, a, inv_2b2, labels, label_values, label_ptr, label_images, hood_ptr, hood_elem, hood_weight,
      resp_ptr, resp_elem, tangent_query, tangent_a, tangent_inv_2b2):
    return query.new_empty((query.shape[0], resp_elem.shape[0]))


class AlignedSoftmaxFunction(torch.autograd.Function):
    """``aligned_softmax``'s autograd and ``torch.func`` rules (ops/autodiff.py; see
    library.LocalSoftmaxFunction)."""

    @staticmethod
    def forward(*args):
        return autodiff.call("aligned_softmax", *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (train, query, a, inv_2b2, t, labels, lv, lp, li, hp, he, hw, rp, re, provenance, backend, n_threads,
         _) = inputs
        out, stats, key, share = output
        ctx.mark_non_differentiable(stats, key, share)
        ctx.save_for_backward(train, query, a, inv_2b2, labels, lv, lp, li, hp, he, hw, rp, re, out, stats)
        ctx.save_for_forward(train, query, a, inv_2b2, labels, lv, lp, li, hp, he, hw, rp, re)
        ctx.set_materialize_grads(False)  # None, not zeros, for an input without a tangent
        ctx.args = (backend, n_threads)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        train, query, a, inv_2b2, labels, lv, lp, li, hp, he, hw, rp, re, out, stats = ctx.saved_tensors
        _no_tangent(_asked(ctx), _NO_DERIVATIVE)
        grads = [None] * _INPUTS
        if grad_out is None:
            return tuple(grads)
        backend, n_threads = ctx.args
        gq, ga, gs = torch.ops.patchmosaic.aligned_softmax_backward(grad_out, out, stats, train, query, a, inv_2b2,
                                                                   labels, lv, lp, li, hp, he, hw, rp, re, backend,
                                                                   n_threads)
        grads[1], grads[2], grads[3] = gq, ga.to(a.dtype), gs.to(inv_2b2.dtype)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, *tangents):
        _no_tangent(tangents, _NO_DERIVATIVE)
        train, query, a, inv_2b2, labels, lv, lp, li, hp, he, hw, rp, re = ctx.saved_tensors
        dout = torch.ops.patchmosaic.aligned_softmax_jvp(train, query, a, inv_2b2, labels, lv, lp, li, hp, he, hw, rp,
                                                        re, tangents[1], tangents[2], tangents[3])
        return dout, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return autodiff.fold(info, in_dims, args, (1, 2, 3, 4, 5), AlignedSoftmaxFunction.apply)


_INPUTS = 18
_NO_DERIVATIVE = ("the training images",) + (None,) * 10 + ("the neighbourhood weights (hood_weight)",)
autodiff.route("aligned_softmax", AlignedSoftmaxFunction)
AlignedSoftmaxBackwardFunction = autodiff.derivative_function("aligned_softmax_backward", (0, 1, 2, 4, 5, 6, 7))
AlignedSoftmaxJvpFunction = autodiff.derivative_function("aligned_softmax_jvp", (1, 2, 3, 4, 13, 14, 15))


def composite(rows_out: Tensor, resp_elem: Tensor, count: Tensor, shape, resp_weight: Optional[Tensor] = None
              ) -> Tensor:
    """The output image of a same-position machine from its rows' responses ``(B, n_resp)``: each element the mean
    of the responses that name it, shaped ``shape``. Differentiable.

    ``resp_weight`` None: the plain mean, ``count`` ``(D,)`` how many responses name each element. ``resp_weight``
    ``(n_resp,)`` (> 0): the weighted mean ``sum w v / sum w``, ``count`` the sum of the weights that name each element
    (:func:`response_count` gives it). An element no response names is 0."""
    B = rows_out.shape[0]
    vals = rows_out if resp_weight is None else rows_out * resp_weight.to(rows_out.device, rows_out.dtype)
    img = rows_out.new_zeros((B, count.shape[0])).index_add(1, resp_elem.to(rows_out.device), vals)
    c = count.to(rows_out.device, rows_out.dtype)
    return (img / torch.where(c > 0, c, torch.ones_like(c))).reshape(shape)


def element_weights(resp_elem: Tensor, log_weight: Tensor, D: int) -> Tensor:
    """Response weights ``exp(log_weight)`` for :func:`composite`, each divided by the largest weight among the
    responses that name the same element (float64, the largest per element 1, none below ``e^-690``): the
    composite's ratios are unchanged, but a Gaussian response far from every crop centre that names an element (the
    corner of a whole-image crop at a small width) no longer underflows to 0 in float64, nor in the float32 of the
    composite, where the element came out 0. ``resp_elem`` ``(n,)`` element per response, ``log_weight`` ``(n,)``."""
    e = resp_elem.to(torch.int64).cpu()
    lw = log_weight.to(torch.float64).cpu()
    top = torch.full((D,), -torch.inf, dtype=torch.float64).scatter_reduce(0, e, lw, "amax")
    return torch.exp(torch.clamp(lw - top[e], min=-690.0))


def window_table_log_response(weights: Tensor, log_resp: Tensor, anchors: Tensor, C: int, H: int, W: int):
    """:func:`window_table` with the response weights given by their logarithm ``log_resp`` (float64 ``(kh, kw)``,
    finite: every position of a window responds), formed as :func:`element_weights` does (a Gaussian response kernel
    itself would underflow at small widths, and leave elements out). Returns the same six tensors."""
    kh, kw = log_resp.shape
    marker = torch.arange(1, kh * kw + 1, dtype=torch.float64).reshape(kh, kw)  # > 0 everywhere: each position's id
    hp, he, hw, rp, re, pos = window_table(weights, marker, anchors, C, H, W)
    lw = log_resp.to(torch.float64).reshape(-1)[pos.to(torch.int64) - 1]
    return hp, he, hw, rp, re, element_weights(re, lw, C * H * W)


def response_count(resp_elem: Tensor, D: int, resp_weight: Optional[Tensor] = None, dtype=torch.float64) -> Tensor:
    """``(D,)``: how many responses name each element (with ``resp_weight``, the sum of their weights): the ``count``
    of :func:`composite`."""
    w = torch.ones(len(resp_elem), dtype=dtype) if resp_weight is None else resp_weight.to(dtype)
    return torch.zeros(D, dtype=dtype).index_add_(0, resp_elem.cpu(), w.cpu())


# ------------------------------------------------------------------------------- element tables
# Two generic constructors of element tables, as custom ops with data-dependent output sizes (so that a machine
# under torch.compile(fullgraph=True) builds its table inside the graph): from a patch mask around every pixel, and
# from a dense matrix of neighbourhood weights. The machines decide which masks and matrices (machines/).

@torch.library.custom_op("patchmosaic::patch_table", mutates_args=())
def patch_table(weights: Tensor, C: int, H: int, W: int, pixels: Optional[Tensor]
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The element table of a patch neighbourhood: one row per pixel of an ``H x W`` image (only those where the
    boolean ``(H, W)`` tensor ``pixels`` is true, when given), in row-major order; its neighbourhood the elements of
    the ``C`` channels at the offsets of the ``k x k`` mask ``weights`` around the pixel that lie inside the image
    (outside: zero padding, which adds nothing to the distance) with weight ``weights > 0``; its response the
    pixel's ``C`` channels. ``weights``: float64 ``(k, k)`` (every pixel) or ``(H, W, k, k)`` (one per pixel).
    Returns ``(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem)``."""
    masks.check_patch_mask(weights)  # its values, when a compiled graph runs too (the machine checked only its shape)
    k = int(weights.shape[-1])
    r = k // 2
    dev = torch.device("cpu")
    w = weights.detach().to(dev, torch.float64)
    rows = torch.arange(H * W) if pixels is None else torch.nonzero(pixels.detach().to(dev).reshape(-1)).reshape(-1)
    i, j = rows // W, rows % W
    off = torch.arange(k) - r
    y = i[:, None, None] + off[None, :, None]
    x = j[:, None, None] + off[None, None, :]
    wr = w[i, j] if w.dim() == 4 else w.expand(len(rows), k, k)
    valid = (wr > 0) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    ch = torch.arange(C)[None, :, None, None] * (H * W)
    elem = (ch + (y * W + x)[:, None]).reshape(len(rows), -1)  # (rows, C k^2), ascending within a row
    keep = valid[:, None].expand(-1, C, -1, -1).reshape(len(rows), -1)
    wt = wr[:, None].expand(-1, C, -1, -1).reshape(len(rows), -1)
    hood_ptr = torch.zeros(len(rows) + 1, dtype=torch.int64)
    hood_ptr[1:] = keep.sum(1).cumsum(0)
    resp = (torch.arange(C)[None, :] * (H * W) + rows[:, None]).reshape(-1)
    return (hood_ptr, elem[keep].to(torch.int64), wt[keep].contiguous(), torch.arange(len(rows) + 1) * C,
            resp.to(torch.int64))


@patch_table.register_fake
def _(weights, C, H, W, pixels):
    ctx = torch.library.get_ctx()
    n_rows = H * W if pixels is None else ctx.new_dynamic_size()
    n_hood = ctx.new_dynamic_size()
    i64 = dict(dtype=torch.int64, device=torch.device("cpu"))
    return (torch.empty((n_rows + 1,), **i64), torch.empty((n_hood,), **i64),
            torch.empty((n_hood,), dtype=torch.float64, device=torch.device("cpu")), torch.empty((n_rows + 1,), **i64),
            torch.empty((n_rows * C,), **i64))


@torch.library.custom_op("patchmosaic::dense_table", mutates_args=())
def dense_table(weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The neighbourhoods of rows given as a dense ``(rows, D)`` matrix of weights (0: not in the neighbourhood; a
    boolean matrix: weights 1) -> ``(hood_ptr, hood_elem, hood_weight)`` (a row may be empty)."""
    w = weights.detach().to("cpu")
    nz = w > 0
    hood_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    hood_ptr[1:] = nz.sum(1).cumsum(0)
    r, c = torch.nonzero(nz, as_tuple=True)  # (views of one (n, 2) tensor: copied, as register_fake says)
    return hood_ptr, c.clone(memory_format=torch.contiguous_format), w[r, c].to(torch.float64)


@dense_table.register_fake
def _(weights):
    n = torch.library.get_ctx().new_dynamic_size()
    cpu = torch.device("cpu")
    return (torch.empty((weights.shape[0] + 1,), dtype=torch.int64, device=cpu),
            torch.empty((n,), dtype=torch.int64, device=cpu), torch.empty((n,), dtype=torch.float64, device=cpu))


@torch.library.custom_op("patchmosaic::window_table", mutates_args=())
def window_table(weights: Tensor, resp_weights: Tensor, anchors: Tensor, C: int, H: int, W: int
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The element table of windows: one row per anchor, the top-left corner ``(i, j)`` of a ``kh x kw`` window
    (``anchors`` int64 ``(n, 2)``, in order; a window may reach past the ``H x W`` image, where it is cut off). Its
    neighbourhood: the elements of the ``C`` channels at the window's positions where ``weights`` (float64
    ``(kh, kw)``) is ``> 0``, with that weight; its response: the elements where ``resp_weights`` (float64
    ``(kh, kw)``) is ``> 0``, with that weight (for :func:`composite`). Positions outside the image are left out
    (zero padding adds nothing to a distance). Every row needs a response element inside the image (a ValueError
    otherwise). Returns ``(hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, resp_weight)``."""
    dev = torch.device("cpu")
    w = weights.detach().to(dev, torch.float64)
    rw = resp_weights.detach().to(dev, torch.float64)
    if w.dim() != 2 or rw.shape != w.shape:
        raise ValueError(f"window_table: weights and resp_weights must be equal (kh, kw) matrices, got "
                         f"{tuple(w.shape)} and {tuple(rw.shape)}")
    kh, kw = int(w.shape[0]), int(w.shape[1])
    anc = anchors.detach().to(dev, torch.int64).reshape(-1, 2)
    n = anc.shape[0]
    y = anc[:, 0, None, None] + torch.arange(kh)[None, :, None]
    x = anc[:, 1, None, None] + torch.arange(kw)[None, None, :]
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    ch = torch.arange(C)[None, :, None, None] * (H * W)
    elem = (ch + (y * W + x)[:, None]).reshape(n, -1)  # (n, C kh kw), ascending within a row

    def part(wt):
        keep = ((wt[None] > 0) & inside)[:, None].expand(-1, C, -1, -1).reshape(n, -1)
        vals = wt[None, None].expand(n, C, -1, -1).reshape(n, -1)
        ptr = torch.zeros(n + 1, dtype=torch.int64)
        ptr[1:] = keep.sum(1).cumsum(0)
        return ptr, elem[keep].to(torch.int64), vals[keep].contiguous()

    hood_ptr, hood_elem, hood_weight = part(w)
    resp_ptr, resp_elem, resp_weight = part(rw)
    empty = torch.nonzero(resp_ptr[1:] == resp_ptr[:-1]).reshape(-1)
    if len(empty):
        i, j = (int(v) for v in anc[int(empty[0])])
        raise ValueError(f"window_table: the window at anchor ({i}, {j}) has no response element inside the "
                         f"{H}x{W} image")
    return hood_ptr, hood_elem, hood_weight, resp_ptr, resp_elem, resp_weight


@window_table.register_fake
def _(weights, resp_weights, anchors, C, H, W):
    ctx = torch.library.get_ctx()
    n_rows = anchors.shape[0]
    n_hood, n_resp = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    cpu = torch.device("cpu")
    i64 = dict(dtype=torch.int64, device=cpu)
    f64 = dict(dtype=torch.float64, device=cpu)
    return (torch.empty((n_rows + 1,), **i64), torch.empty((n_hood,), **i64), torch.empty((n_hood,), **f64),
            torch.empty((n_rows + 1,), **i64), torch.empty((n_resp,), **i64), torch.empty((n_resp,), **f64))
