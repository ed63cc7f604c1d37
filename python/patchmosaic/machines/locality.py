"""The data-driven locality machine (after Lukoianov, Yuan, Solomon and Sitzmann, "Locality in Image Diffusion
Models Emerges from Data Statistics", NeurIPS 2025): an ELS machine whose neighbourhood at each noise level is
the set of pixels that the optimal *linear* denoiser (the Wiener filter of the training data) is most
sensitive to, instead of a square ``k x k`` patch.

The Wiener filter ``x0_hat = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x_t - a mu)`` has the Jacobian

    J_t = a Sigma (a^2 Sigma + b^2 I)^-1 = U diag(a lam / (a^2 lam + b^2)) U^T      (D x D, D = C H W)

and its row for output pixel ``p`` is the filter's *sensitivity field* at ``p`` (summed in absolute value over
the output and input channels): which input pixels the linear denoiser uses to denoise ``p`` at this noise
level. At high noise it is wide (``J ~ a Sigma / b^2``: the data's correlations), at low noise it shrinks to
the pixel itself. The machine keeps, at every call, the ``k^2`` pixels of largest sensitivity (so a neighbourhood
as large as a ``k x k`` patch, shaped by the data; ties go to the nearer pixel) and runs the ELS softmax over
that neighbourhood (a boolean ``patch_mask``, ops/masks.py). ``k`` is chosen per step exactly as the ELS
machine's patch size is: by :func:`patchmosaic.calibrate` against a trained network (a k-schedule).

Two forms of the field:

- ``per_pixel=False`` (default): one mask shared by every pixel, from the field averaged over the pixels at
  each offset (each pixel's field normalised to sum 1 first, so that flat background pixels count as much as
  busy ones). The machine stays translation-equivariant and runs as fast as a square patch of the mask's size.
- ``per_pixel=True``: every query pixel its own mask from its own field (position-dependent, as the Wiener
  filter itself). Queries then have the training size, and the ELS engines treat every pixel with its own
  mask as a class of its own (several times slower).

The masks come from the covariance of all the training images (also for class-conditional calls).
"""

from __future__ import annotations

import itertools
import numbers
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from ..schedules import ScheduleLike
from ..validation import (check_k, check_max_memory, check_memory, check_sweep, check_time, check_time_type, concrete,
                          constant, outside_transforms, to_tensor)
from .base import CALL_ARGS, DATA_ARGS, ENGINE_ARGS, SOURCE_ARGS, docstring, traced_name
from .local import ELS
from .wiener import Wiener


JACOBIAN_BLOCK = 1 << 28  # bytes of Wiener Jacobian rows computed at once for a field (the whole D x D below it)


def pixel_fields(wiener: Wiener, t: float) -> torch.Tensor:
    """Each output pixel's sensitivity field at time ``t``: ``F[p, q] = sum_{c, c'} |J_t[(c, p), (c', q)]|``,
    a float64 ``(H W, H W)`` tensor (row ``p`` = output pixel, column ``q`` = input pixel, row-major). The Jacobian
    is computed whole while it takes at most :data:`JACOBIAN_BLOCK` bytes, else in blocks of rows (never the
    whole ``D x D`` matrix of a large image)."""
    C, H, W = wiener.C, wiener.H, wiener.W
    HW, D = H * W, wiener.D
    if 2 * D * D * 8 <= JACOBIAN_BLOCK:
        J = wiener.jacobian(t).abs().reshape(C, HW, C, HW)
        return J.sum(dim=(0, 2))
    F = torch.empty(HW, HW, dtype=torch.float64)
    per = max(1, JACOBIAN_BLOCK // (2 * C * D * 8))
    for p0 in range(0, HW, per):
        p1 = min(HW, p0 + per)
        rows = (torch.arange(C)[:, None] * HW + torch.arange(p0, p1)[None]).reshape(-1)
        F[p0:p1] = wiener.jacobian_rows(t, rows).abs().reshape(C, p1 - p0, C, HW).sum(dim=(0, 2))
    return F


def field_bytes(C: int, H: int, W: int, K: int) -> int:
    """Working memory of one sensitivity field (:func:`pixel_fields` and its windows of side ``K``): the
    ``(H W)^2`` fields and a normalised copy, the windows' values and indices, a block of Jacobian rows."""
    HW, D = H * W, C * H * W
    return 2 * HW * HW * 8 + HW * K * K * 17 + min(2 * D * D * 8, JACOBIAN_BLOCK + 2 * C * D * 8)


def _offsets(H: int, W: int, K: int):
    """For every pixel ``p`` and every offset of a ``K x K`` window centred on it: the input pixel index and
    whether it lies inside the image. Returns ``(index (HW, K*K) int64, inside (HW, K*K) bool)``."""
    r = K // 2
    di, dj = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
    pi, pj = np.divmod(np.arange(H * W), W)
    qi = pi[:, None] + di.reshape(1, -1)
    qj = pj[:, None] + dj.reshape(1, -1)
    inside = (qi >= 0) & (qi < H) & (qj >= 0) & (qj < W)
    index = np.where(inside, qi * W + qj, 0)
    return torch.from_numpy(index), torch.from_numpy(inside)


def windowed_fields(fields: torch.Tensor, H: int, W: int, K: int) -> torch.Tensor:
    """The fields of :func:`pixel_fields` around each pixel: ``(H W, K, K)``, offset ``(di, dj)`` of pixel ``p``
    at ``[p, K//2 + di, K//2 + dj]``; 0 outside the image."""
    index, inside = _offsets(H, W, K)
    vals = torch.gather(fields, 1, index) * inside
    return vals.reshape(H * W, K, K)


def shared_field(fields: torch.Tensor, H: int, W: int, K: int) -> torch.Tensor:
    """The stationary (translation-averaged) sensitivity field: each pixel's field normalised to sum 1, then
    averaged at each offset of the ``K x K`` window over every pixel whose field is not zero (an offset that
    leaves the image counts 0). A float64 ``(K, K)`` tensor."""
    total = fields.sum(1, keepdim=True)
    rows = fields / total.clamp_min(1e-300)
    index, inside = _offsets(H, W, K)
    vals = torch.gather(rows, 1, index) * inside
    active = int((total > 0).sum())  # pixels the filter uses at all (a constant pixel has an all-zero field)
    return (vals.sum(0) / max(active, 1)).reshape(K, K)


def top_mask(field: torch.Tensor, k: int) -> torch.Tensor:
    """The boolean neighbourhood of ``k^2`` elements of ``field`` (``(K, K)``, or ``(..., K, K)``: one per leading
    index): the centre (the pixel denoised) and the ``k^2 - 1`` largest other values, ties going to the element
    nearer the centre. Returns a boolean tensor of the same shape; all ``K^2`` elements when ``k^2 > K^2``."""
    K = field.shape[-1]
    m = min(k * k, K * K)
    r = K // 2
    di, dj = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij")
    dist = torch.from_numpy((di * di + dj * dj).reshape(-1).astype(np.float64))
    flat = field.reshape(-1, K * K).to(torch.float64).numpy().copy()
    flat[:, (K * K) // 2] = np.inf  # the pixel itself first, then the m - 1 largest others
    # sort key: the value first, the distance only among equal values (np.lexsort sorts by its last key first)
    order = np.lexsort((dist.numpy()[None, :].repeat(flat.shape[0], 0), -flat), axis=1)
    keep = np.zeros(flat.shape, bool)
    np.put_along_axis(keep, order[:, :m], True, axis=1)
    return torch.from_numpy(keep.reshape(field.shape))


def crop_to_support(mask: torch.Tensor) -> torch.Tensor:
    """A centred boolean mask (``(K, K)`` or ``(..., K, K)``) cut to the smallest centred odd square holding all
    its True elements."""
    K = mask.shape[-1]
    r = K // 2
    any_ = mask.reshape(-1, K, K).any(0)
    rows, cols = torch.nonzero(any_, as_tuple=True)
    reach = int(torch.max(torch.cat([(rows - r).abs(), (cols - r).abs()])))
    return mask[..., r - reach : r + reach + 1, r - reach : r + reach + 1].contiguous()


LOCALITY_ARGS = """\
        boundary: ``"zeros"`` (default, boundary-aware) or ``"circular"`` (periodic), as for :class:`ELS`.
        per_pixel: False (default): one neighbourhood shared by every pixel (the translation-averaged
            sensitivity field; equivariant, any canvas with ``boundary="zeros"``); True: one per query pixel from
            its own field (queries of the training size; slower).
        window: the extent the neighbourhood is chosen from, an odd int: the ``k^2`` pixels are the largest of
            the ``window x window`` square around each pixel; None (default): ``2 k - 1`` for size ``k`` (twice
            the reach of the square patch, so that a low-noise field, concentrated on the pixel, does not pick
            stray pixels far away). At most the largest frame the boundary allows: ``2 max(H, W) - 1`` for
            zero padding, the largest odd size within ``min(H, W)`` for the periodic machine (its keys are the
            fully-inside patches of the mask's frame).
        weighting: ``"binary"`` (default): every pixel of the neighbourhood counts fully (a boolean mask);
            ``"field"``: each counts with its sensitivity relative to the pixel's own (the centre weighs 1; the
            squared distance becomes ``sum w (x - a q)^2``), a soft neighbourhood that fades where the linear
            denoiser looks less.
        statistics: the images whose mean and covariance define the Wiener filter and so the neighbourhoods,
            ``(M, C, H, W)`` of the training images' shape (e.g. the whole data set when the machine's softmax
            runs on a subset of it); None (default): the training images. With fewer images than pixels the
            covariance is rank-deficient and the filter at low noise projects onto the images' span (a field
            that is not local); use more images than pixels.
"""


_LIVE = weakref.WeakValueDictionary()  # handle -> Neighbourhoods
_HANDLES = itertools.count()


@torch.compiler.assume_constant_result
def _warm_mask(handle: int, t: float, k: int) -> bool:
    """Compute (or find) the mask of the live :class:`Neighbourhoods` ``handle`` at ``(t, k)`` and set it as its
    attribute :func:`traced_name`, for ``torch.compile``: called while a graph is traced (its arguments are
    constants there), so that the trace then reads the mask as a constant of the graph (specialised on ``t`` and
    ``k``)."""
    n = _LIVE[handle]
    setattr(n, traced_name(t, k), n.cached_mask(t, k))
    return True


class Neighbourhoods:
    """The neighbourhood rule of the data-driven locality machine, apart from any machine: the Wiener filter of
    ``statistics`` and, per time and size, the mask (:meth:`mask`). :class:`DataLocal` holds one, and so does
    its key-sharded form (``patchmosaic.distributed.ShardedDataLocal``).

    Args:
        statistics: the images whose covariance defines the neighbourhoods, ``(M, C, H, W)``.
        boundary, per_pixel, window, weighting: as for :class:`DataLocal`.
        schedule: the noise schedule (a :class:`patchmosaic.schedules.Schedule`).
        max_memory: the Wiener filter's memory limit (see :class:`patchmosaic.Wiener`).
    """

    def __init__(self, statistics, *, boundary: str, per_pixel: bool, window: Optional[int], weighting: str,
                 schedule, max_memory: Optional[int] = None):
        max_memory = check_max_memory(max_memory)
        statistics = to_tensor(statistics, "statistics")  # (named as such: the Wiener filter would say "images")
        shape = tuple(getattr(statistics, "shape", ()))
        if len(shape) == 4 and min(shape) > 0:  # refused from the shape alone, before the Wiener filter is built
            self._check_fields(*(int(v) for v in shape[1:]), boundary, max_memory)
        self.wiener = Wiener(statistics, schedule=schedule, max_memory=max_memory)
        self.limit, self.field_bytes = self._check_fields(self.wiener.C, self.wiener.H, self.wiener.W, boundary,
                                                          max_memory)
        self.max_memory = max_memory
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
                raise ValueError(f"window must be a positive odd int, got {window!r}")
            if window > self.limit:
                raise ValueError(f"window {window} exceeds the largest frame of boundary={boundary!r} on "
                                 f"{self.wiener.H}x{self.wiener.W} images ({self.limit})")
        self.window = None if window is None else int(window)
        if weighting not in ("binary", "field"):
            raise ValueError(f"weighting must be 'binary' or 'field', got {weighting!r}")
        self.weighting = weighting
        self.per_pixel = bool(per_pixel)
        self._fields = {}  # t -> (L, L) shared field or (H, W, L, L) per-pixel fields
        self._masks = {}  # (t, k) -> mask
        self._handle = next(_HANDLES)  # its name in _LIVE, for a compiled graph's trace (_warm_mask)
        _LIVE[self._handle] = self

    @staticmethod
    def _check_fields(C: int, H: int, W: int, boundary: str, max_memory: Optional[int]):
        """``(limit, bytes)``: the largest frame of ``boundary`` on ``H x W`` images (the fields are computed at this
        size) and the working memory of one noise level's fields, refused (ResourceError) above ``max_memory``."""
        limit = 2 * max(H, W) - 1 if boundary == "zeros" else min(H, W) - (1 - min(H, W) % 2)
        need = field_bytes(C, H, W, limit)
        check_memory(need, f"the data-driven neighbourhoods of {C}x{H}x{W} images (each noise level's sensitivity "
                     f"fields of every pixel pair: {(H * W) ** 2 * 8 / 2**30:.2f} GiB of float64, and their "
                     f"{limit}x{limit} windows)", max_memory,
                     "use smaller images (the fields grow as (H W)^2), or the ELS machine")
        return limit, need

    def field(self, t: float) -> torch.Tensor:
        """The sensitivity field the masks are cut from at time ``t``: float64 ``(L, L)`` (shared) or
        ``(H, W, L, L)`` (per pixel), centre = the pixel denoised, ``L`` the largest frame of the boundary."""
        t = float(check_time(t))
        if t not in self._fields:
            f = pixel_fields(self.wiener, t)
            H, W, K = self.wiener.H, self.wiener.W, self.limit
            if self.per_pixel:
                self._fields[t] = windowed_fields(f, H, W, K).reshape(H, W, K, K)
            else:
                self._fields[t] = shared_field(f, H, W, K)
        return self._fields[t]

    def mask(self, t: float, k: int) -> torch.Tensor:
        """The neighbourhood of a call with patch size ``k`` at time ``t`` (boolean, or float64 weights with
        ``weighting="field"``): ``(K, K)`` shared by every pixel or ``(H, W, K, K)`` one per pixel, holding the
        pixel itself and the ``k^2 - 1`` others of largest sensitivity in the window (all of the window when
        ``k^2`` exceeds it), cut to the smallest centred odd square ``K`` that holds them.

        Args:
            t: diffusion time in ``(0, 1]``.
            k: the neighbourhood's size in pixels as that of a ``k x k`` patch: an odd positive int.
        """
        k = check_k(k, self.wiener.H, self.wiener.W)
        t = float(check_time(t))
        key = (t, k)
        if torch.compiler.is_compiling():  # a constant of the graph, computed (or read) while it is traced
            _warm_mask(self._handle, t, k)
            return getattr(self, traced_name(t, k))
        return self.cached_mask(t, k)

    def cached_mask(self, t: float, k: int) -> torch.Tensor:
        """:meth:`mask` of a checked float ``t`` and int ``k``, from the cache (computed on a miss, outside any
        ``torch.func`` transform)."""
        key = (t, k)
        if key not in self._masks:
            with outside_transforms():  # a constant of the call: no torch.func transform sees it
                self._masks[key] = self._make_mask(t, k)
        return self._masks[key]

    def _make_mask(self, t: float, k: int) -> torch.Tensor:
        """The mask of :meth:`mask` at ``(t, k)``, computed."""
        K = min(2 * k - 1 if self.window is None else self.window, self.limit)
        f = self.field(t)
        o = (f.shape[-1] - K) // 2
        f = f[..., o : o + K, o : o + K]
        keep = top_mask(f, k)
        if self.weighting == "binary":
            return crop_to_support(keep)
        # the field relative to the centre, on the kept pixels (the centre weighs exactly 1)
        c = f[..., K // 2, K // 2].clamp_min(1e-300)[..., None, None]
        w = torch.where(keep, (f / c).clamp(min=1e-12), torch.zeros_like(f))
        w[..., K // 2, K // 2] = 1.0
        r = crop_to_support(keep).shape[-1] // 2
        return w[..., K // 2 - r : K // 2 + r + 1, K // 2 - r : K // 2 + r + 1].contiguous()

    def describe(self) -> dict:
        """The rule's settings and the statistics' content hash (what changes the masks)."""
        return {"rule": "k^2 pixels of largest Wiener sensitivity", "per_pixel": self.per_pixel,
                "weighting": self.weighting, "window": self.window or "2k-1", "statistics": self.wiener.data_digest,
                "statistics_images": self.wiener.N}


class DataDrivenCalls:
    """The calls of a machine with data-driven neighbourhoods (``self.neighbourhood``, a :class:`Neighbourhoods`),
    on top of a local machine whose ``denoise`` takes ``patch_mask=`` (the next class in the method order: ELS, or a
    key-sharded ELS)."""

    neighbourhood: Neighbourhoods

    def field(self, t: float) -> torch.Tensor:
        """The sensitivity field at time ``t`` (see :meth:`Neighbourhoods.field`)."""
        return self.neighbourhood.field(t)

    def mask(self, t: float, k: int) -> torch.Tensor:
        """The neighbourhood of size ``k`` (``k^2`` pixels) at time ``t`` (see :meth:`Neighbourhoods.mask`).

        Args:
            t: diffusion time in ``(0, 1]``.
            k: the neighbourhood's size in pixels as that of a ``k x k`` patch: an odd positive int.
        """
        return self.neighbourhood.mask(t, k)

    @docstring("""Posterior-mean estimate ``x0_hat`` over the data-driven neighbourhood of ``k^2`` pixels at the
        call's noise level (see :meth:`mask`), differentiable in ``x`` (not in ``t``: the neighbourhood is a
        discrete choice) on one process.

        Args:
""" + CALL_ARGS + """\
            return_provenance: also return a :class:`Provenance` of the winning keys (default False).
            backend, pixels: as for :meth:`ELS.denoise`.

        Returns:
            as :meth:`ELS.denoise`.
        """)
    def denoise(self, x, t, k: Optional[int] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None, pixels=None, patch_mask=None):
        if patch_mask is not None:
            raise ValueError("DataLocal chooses its own neighbourhood (the Wiener sensitivity mask): patch_mask= "
                             "is not accepted; use ELS(...).denoise(..., patch_mask=...) for a mask of your own")
        if k is None:
            raise ValueError("DataLocal needs a neighbourhood size k (k^2 pixels) or a k-schedule")
        times = _times(t)
        kw = dict(return_provenance=return_provenance, backend=backend, pixels=pixels)
        if len(times) == 1:
            m = self.mask(times[0], k)
            return super().denoise(x, t, m.shape[-1], labels, patch_mask=m, **kw)
        return self._by_time(x, t, k, labels, times, kw)

    def _by_time(self, x, t, k, labels, times, kw):
        """A call whose images have different times: one call per distinct time, the rows put back in order."""
        if kw["return_provenance"] or kw["pixels"] is not None:
            raise ValueError("DataLocal: return_provenance and pixels need one time for all images of a call")
        is_numpy = isinstance(x, np.ndarray)
        xt = self._query(x)
        tt = torch.as_tensor(constant(t) if torch.is_tensor(t) else np.asarray(t, dtype=np.float64))
        if tuple(tt.shape) != (xt.shape[0],):  # (several times: one per image)
            raise ValueError(f"t must be a float or have shape ({xt.shape[0]},), got shape {tuple(tt.shape)}")
        lab = None if labels is None else self._query_labels(labels, xt.shape[0])
        out = torch.empty_like(xt)
        for tv in times:
            rows = torch.nonzero(tt.to(torch.float64) == tv).reshape(-1)
            m = self.mask(tv, k)
            sub_t = t[rows.to(t.device)] if torch.is_tensor(t) else tv
            res = super().denoise(xt[rows.to(xt.device)], sub_t, m.shape[-1],
                                  None if lab is None else lab[rows], patch_mask=m, backend=kw["backend"])
            out = out.index_copy(0, rows.to(xt.device), res)
        return out.detach().numpy() if is_numpy else out

    def denoise_ks(self, x, t, ks: Sequence[int], labels=None, *, backend: Optional[str] = None):
        """``x0_hat`` at several neighbourhood sizes (one :meth:`denoise` per size: each size has its own
        mask), stacked as ``(K, B, C, Hq, Wq)``; forward only. Used by :func:`patchmosaic.calibrate`.

        Args:
            x, t, labels, backend: as for :meth:`denoise`.
            ks: the sizes, odd positive ints in strictly increasing order.
        """
        ks = check_sweep(ks, self.H, self.W)
        with torch.no_grad():
            outs = [self.denoise(x, t, k, labels, backend=backend) for k in ks]
        return np.stack(outs) if isinstance(x, np.ndarray) else torch.stack(outs)

    def check_request(self, shape, dtype=torch.float32, backend: str = "cpu", provenance: bool = False,
                      k: Optional[int] = None) -> None:
        """As :meth:`patchmosaic.Machine.check_request`, for the largest frame a neighbourhood of size ``k`` may
        have (its window, ``2 k - 1`` by default), from the shape alone.

        Args:
            shape, dtype, backend, provenance: as for :meth:`patchmosaic.Machine.check_request`.
            k: the neighbourhood's size (``k^2`` pixels), or None (3).
        """
        k = 3 if k is None else check_k(k, self.H, self.W)
        n = self.neighbourhood
        frame = min(2 * k - 1 if n.window is None else n.window, n.limit)
        # a call at a new noise level first computes its sensitivity fields (freed before the softmax runs)
        check_memory(n.field_bytes, f"{type(self).__name__}: the sensitivity fields of a new noise level",
                     self.max_memory, "use smaller images (the fields grow as (H W)^2), or the ELS machine")
        super().check_request(shape, dtype, backend, provenance, frame)

    def _check_canvas(self, Hq, Wq):
        if self.neighbourhood.per_pixel and (Hq, Wq) != (self.H, self.W):
            raise ValueError(f"DataLocal(per_pixel=True) needs queries of the training size {self.H}x{self.W}, got "
                             f"{Hq}x{Wq}: each pixel's mask is the Wiener field of that pixel of the training canvas")
        super()._check_canvas(Hq, Wq)

    def describe(self) -> dict:
        """What changes the machine's results: the ELS description plus the neighbourhood rule."""
        d = super().describe()
        d["neighbourhood"] = self.neighbourhood.describe()
        return d


def check_statistics(neighbourhood: Neighbourhoods, C: int, H: int, W: int) -> None:
    """A ValueError unless the statistics images have the training images' shape ``C x H x W``."""
    w = neighbourhood.wiener
    if (w.C, w.H, w.W) != (C, H, W):
        raise ValueError(f"statistics images are {w.C}x{w.H}x{w.W}, the training images {C}x{H}x{W}: give images "
                         "of the training images' shape")


class DataLocal(DataDrivenCalls, ELS):
    __doc__ = """The data-driven locality machine: ELS over the neighbourhood that the training data's optimal
    linear denoiser (Wiener filter) is most sensitive to at each noise level, instead of a square patch.

    A call with patch size ``k`` at time ``t`` uses the ``k^2`` pixels of largest Wiener sensitivity (see the
    module's docstring; :meth:`mask` returns it), so ``k`` means "as many pixels as a ``k x k`` patch" and a
    k-schedule is calibrated for it with :func:`patchmosaic.calibrate` exactly as for ELS. The sensitivity
    fields are computed once per time (cached); the Wiener filter's eigendecomposition once at construction.

    Args:
""" + DATA_ARGS + LOCALITY_ARGS + SOURCE_ARGS + ENGINE_ARGS + """
    Raises:
        ValueError naming a bad argument, :class:`patchmosaic.ResourceError` when the Wiener filter's
        eigendecomposition would not fit in ``max_memory``: before any work.
    """

    def __init__(self, images, labels=None, boundary: str = "zeros", *, per_pixel: bool = False,
                 window: Optional[int] = None, weighting: str = "binary", statistics=None, xflip: bool = False,
                 schedule: ScheduleLike = "cosine_legacy", backend: str = "auto", n_threads: int = 0,
                 max_memory: Optional[int] = None):
        super().__init__(images, labels, boundary, xflip=xflip, schedule=schedule, backend=backend,
                         n_threads=n_threads, max_memory=max_memory)
        self.neighbourhood = Neighbourhoods(self.images if statistics is None else statistics, boundary=boundary,
                                            per_pixel=per_pixel, window=window, weighting=weighting,
                                            schedule=self.schedule, max_memory=max_memory)
        check_statistics(self.neighbourhood, self.C, self.H, self.W)
        self.wiener = self.neighbourhood.wiener

    def __repr__(self):
        n = self.neighbourhood
        lab = "" if self.labels is None else f", {len(self.label_index.values)} labels"
        return (f"DataLocal({self.N} images {self.C}x{self.H}x{self.W}{lab}, boundary={self.boundary}, "
                f"per_pixel={n.per_pixel}, window={n.window or '2k-1'}, weighting={n.weighting}, "
                f"schedule={self.schedule.name})")


def _times(t) -> list:
    """The distinct times of a call (a float, or one per image) as Python floats, checked. Under
    ``torch.compile`` a Python float only (a TypeError says why)."""
    if isinstance(t, numbers.Real) and not isinstance(t, (bool, np.ndarray)):
        return [check_time(concrete(t))]
    if torch.compiler.is_compiling():
        raise TypeError("DataLocal under torch.compile takes t as a Python float: its neighbourhood is chosen by "
                        "the value of t, which a compiled graph cannot read from a tensor or an array (pass the "
                        "float; a graph is compiled per time)")
    if torch.is_tensor(t):
        vals = constant(t).reshape(-1).astype(np.float64)
    else:
        check_time_type(t)
        vals = np.asarray(t, dtype=np.float64).reshape(-1)
    if vals.size == 0:
        raise ValueError("t is empty")
    return [check_time(v) for v in np.unique(vals)]
