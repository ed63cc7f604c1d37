"""The PCA-locality machine of Lukoianov, Yuan, Scarvelis and Kamb ("Locality in Image Diffusion Models Emerges
from Data Statistics", NeurIPS 2025; arXiv 2509.09672), exactly as their method defines it, on the same-position
engine.

Per noise level, the linear (Wiener) denoiser's matrix from the eigendecomposition of the training set's full
covariance over every channel and pixel (mean subtracted, divided by ``N - 1``), ``Sigma = U diag(lam) U^T``:

    L = U diag(a^2 lam / (b^2 + a^2 lam)) U^T                     (D x D, D = C H W; a^2 = alpha_bar(t))
    M[n, m] = L[n, m] / L[n, n]        (each row by its diagonal; a diagonal below 1e-6 in magnitude divides by 1)
    mask[n, m] = |M[n, m]| >= theta * max |M|                      (one global relative threshold)

and output element ``m`` (a channel of a pixel) is a softmax over all training images of the masked squared
distance at the same positions, with temperature ``tau``:

    x0_hat[m] = sum_n w_n phi_n[m] / sum_n w_n,   w_n = exp(-sum_{e: mask[e, m]} (x[e] - a phi_n[e])^2 / (2 b^2 tau))

(the distance of element ``m`` runs over the column ``m`` of the mask, across channels). Their reference
implementation (the Analytic Diffusion Studio, ``pca_locality.py``) forms the distance as a dense ``D x D`` product
and normalises the softmax within each data-loader batch, then averages the batch means with equal weight; here
the softmax runs over all images exactly (``batch_average=`` reproduces theirs, for comparison), and each training
image's squared residual is summed over each element's mask as runs of elements (ops/aligned.py).
"""

from __future__ import annotations

import itertools
import numbers
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from .. import ops
from ..schedules import ScheduleLike
from ..validation import check_memory, check_threshold, check_time, outside_transforms
from .base import BACKEND_ARG, DATA_ARGS, ENGINE_ARGS, SOURCE_ARGS, docstring, traced_name
from .same_position import SamePosition

PCA_ARGS = """\
        threshold: the relative threshold ``theta`` of the binarised mask, in ``(0, 1]`` (default 0.02; the
            authors' settings: MNIST and Fashion-MNIST 0.005, CIFAR-10 0.05, 64x64 data 0.02). A call may give
            its own (``denoise(x, t, threshold)``; a :class:`patchmosaic.ThresholdSchedule` per step).
        temperature: the softmax temperature ``tau > 0`` (default 1).
        batch_average: None (default): the exact softmax over all training images. An int ``S``: the
            reference implementation's approximation, for comparison -- the images (in order; per class for a
            conditional call) in consecutive batches of ``S``, the softmax normalised within each batch and the
            batch means averaged with equal weight.
"""


_LIVE = weakref.WeakValueDictionary()  # handle -> PCALocality
_HANDLES = itertools.count()


@torch.compiler.assume_constant_result
def _warm_table(handle: int, t: float, theta: float) -> bool:
    """Compute (or find) the element table of the live :class:`PCALocality` ``handle`` at ``(t, theta)`` and set
    it as its attribute ``traced_name(t, theta)`` (machines/base.py), for ``torch.compile``: called while a
    graph is traced (its arguments are constants there), so that the trace then reads the table as constants of
    the graph (specialised on ``t``)."""
    m = _LIVE[handle]
    setattr(m, traced_name(t, theta), m.cached_table(t, theta))
    return True


class PCALocality(SamePosition):
    __doc__ = """The PCA-locality machine (Lukoianov et al., NeurIPS 2025): each output element is a softmax over
    all training images of the squared distance over its own neighbourhood, the elements where the data's Wiener
    matrix, normalised by its diagonal, is above ``threshold`` times its largest entry (see the module for the
    formulas). Queries have the training size; the masks come from the covariance of all training images (also
    for class-conditional calls); ``pixels=`` and ``patch_mask=`` do not apply. Provenance is per pixel, from the
    rows of its first channel.

    Args:
""" + DATA_ARGS + PCA_ARGS + SOURCE_ARGS + ENGINE_ARGS + """
    Raises:
        :class:`patchmosaic.ResourceError` when the float64 covariance, its eigenvectors and one noise level's
        ``D x D`` matrix (about ``4 * 8 D^2`` bytes) would not fit in ``max_memory``, before any is computed;
        ValueError for a threshold outside ``(0, 1]``, a temperature ``<= 0`` or a bad ``batch_average``.
    """

    parameter = "threshold"

    def __init__(self, images, labels=None, threshold: float = 0.02, temperature: float = 1.0, *,
                 batch_average: Optional[int] = None, xflip: bool = False, schedule: ScheduleLike = "cosine_legacy",
                 backend: str = "auto",
                 n_threads: int = 0, max_memory: Optional[int] = None):
        self.threshold = check_threshold(threshold)
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0 \
                or not np.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        if batch_average is not None and (isinstance(batch_average, bool) or not isinstance(batch_average, int)
                                          or batch_average < 1):
            raise ValueError(f"batch_average must be None or a positive int (images per batch), got {batch_average!r}")
        self.batch_average = batch_average
        super().__init__(images, labels, xflip=xflip, schedule=schedule, backend=backend, n_threads=n_threads,
                         max_memory=max_memory)
        self.D = self.C * self.H * self.W
        need = 4 * 8 * self.D * self.D + 8 * self.N * self.D + 12 * self.D * min(self.D, self.N)
        check_memory(need, f"PCALocality on {self.N} images of {self.C}x{self.H}x{self.W} (D = {self.D} elements: "
                           f"float64 D x D covariance, eigenvectors and one noise level's matrix, "
                           f"{8 * self.D * self.D / 2**30:.2f} GiB each)", self.max_memory)
        X = self.images.reshape(self.N, self.D).to(torch.float64)
        Xc = X - X.mean(0)
        denom = max(self.N - 1, 1)
        if self.N - 1 < self.D:  # rank <= N - 1: the thin SVD of the centred images gives the whole range
            _, s, Vh = torch.linalg.svd(Xc / denom ** 0.5, full_matrices=False)
            self._lam, self._U = s * s, Vh.T.contiguous()
        else:
            lam, U = torch.linalg.eigh(Xc.T @ Xc / denom)
            self._lam, self._U = lam.clamp_min(0.0).flip(0), U.flip(1).contiguous()  # by decreasing variance
        self._U = self._U.contiguous()
        self._U2, self._U32 = self._U * self._U, self._U.to(torch.float32)  # for the masks' search
        self._level = (None, None, None)  # (t, mask search arguments, max |M|) of the latest noise level
        self._checked = 0  # entries the latest mask search recomputed in float64
        self._tables = {}  # (t, threshold) -> element table tensors
        self._handle = next(_HANDLES)  # its name in _LIVE, for a compiled graph's trace (_warm_table)
        _LIVE[self._handle] = self

    # ----- the masks -----------------------------------------------------------------------------
    def matrix(self, t: float) -> torch.Tensor:
        """``M`` at time ``t``: the Wiener matrix ``U diag(a^2 lam / (b^2 + a^2 lam)) U^T`` with each row divided
        by its diagonal (by 1 where that is below 1e-6 in magnitude); float64 ``(D, D)``, row ``n`` = input
        element, column ``m`` = output element."""
        t = check_time(t)
        V = self._factor(t)
        L = V @ V.T  # = U diag(shrink) U^T
        d = torch.diagonal(L).clone()
        d[d.abs() < 1e-6] = 1.0
        return L / d[:, None]

    def _shrink(self, t: float) -> torch.Tensor:
        """The Wiener filter's shrinkage ``a^2 lam / (b^2 + a^2 lam)`` of each principal direction at time ``t``."""
        a, b2 = self.schedule.scalar_coefficients(t)
        a2 = a * a
        return a2 * self._lam / (b2 + a2 * self._lam)

    def _factor(self, t: float) -> torch.Tensor:
        """``V = U diag(shrink)^(1/2)`` at time ``t`` (float64 ``(D, r)``): the Wiener matrix is ``V V^T``."""
        return (self._U * self._shrink(t).sqrt()).contiguous()

    def mask(self, t: float, threshold: Optional[float] = None) -> torch.Tensor:
        """The boolean ``(D, D)`` mask at time ``t``: column ``m`` is output element ``m``'s neighbourhood
        (``|M| >= threshold * max |M|``; ``threshold`` None: the machine's)."""
        theta = self.threshold if threshold is None else check_threshold(threshold)
        hp, he = self.cached_table(check_time(t), theta)[:2]
        out = torch.zeros((self.D, self.D), dtype=torch.bool)
        out[he, torch.repeat_interleave(torch.arange(self.D), hp.diff())] = True
        return out

    def _noise_level(self, t: float):
        """The arguments of the compiled mask search at time ``t`` (``ops.wiener_masks``), and ``max |M|``."""
        if self._level[0] != t:
            with outside_transforms():  # a cached constant: no torch.func transform may wrap it
                args = ops.wiener_masks(self._U, self._U2, self._U32, self._shrink(t), self.n_threads)
                top, self._checked = ops.wiener_mask_max(args)
                self._level = (t, args, top)
        return self._level[1], self._level[2]

    def neighbourhood_sizes(self, t: float, threshold: Optional[float] = None) -> torch.Tensor:
        """How many elements each output element's neighbourhood holds at time ``t``: ``(C, H, W)`` int64."""
        theta = self.threshold if threshold is None else check_threshold(threshold)
        return self.cached_table(check_time(t), theta)[0].diff().reshape(self.C, self.H, self.W)

    def _table(self, t: float, theta: float):
        if torch.compiler.is_compiling():  # constants of the graph, computed (or read) while it is traced
            _warm_table(self._handle, t, theta)
            return getattr(self, traced_name(t, theta))
        return self.cached_table(t, theta)

    def cached_table(self, t: float, theta: float):
        """The element table of the mask at ``(t, theta)`` as ``ops.aligned_softmax`` takes it, from the cache
        (computed on a miss, outside any ``torch.func`` transform)."""
        key = (t, theta)
        if key not in self._tables:
            if len(self._tables) > 64:
                self._tables.clear()
            args, top = self._noise_level(t)
            with outside_transforms():  # a cached constant: no torch.func transform may wrap it
                ptr, elem, self._checked = ops.wiener_mask_rows(args, theta * top)
                rows = torch.arange(self.D, dtype=torch.int64)
                self._tables[key] = (torch.from_numpy(ptr), torch.from_numpy(elem), None,
                                     torch.arange(self.D + 1, dtype=torch.int64), rows)
        return self._tables[key]

    # ----- calls ---------------------------------------------------------------------------------
    @docstring("""Posterior-mean estimate ``x0_hat`` (differentiable in ``x``, and in ``t`` through the softmax's
        coefficients; the mask at each ``t`` is a constant).

        Args:
            x: noisy images ``x_t`` ``(B, C, H, W)``, float32 or float64, numpy or torch.
            t: diffusion time in ``(0, 1]``: a float, or one per image as a ``(B,)`` array or tensor (images with
                different times are computed in groups, one mask each).
            threshold: this call's ``theta`` in ``(0, 1]``; None (default): the machine's.
            labels: ``(B,)`` integer class labels or None, as for :meth:`patchmosaic.ELS.denoise`.
            return_provenance: also return a :class:`patchmosaic.Provenance` per pixel (default False).
""" + BACKEND_ARG + """
        Returns:
            ``x0_hat`` with the shape and dtype of ``x`` (numpy for numpy ``x``); with ``return_provenance``, the
            pair ``(x0_hat, provenance)``.
        """)
    def denoise(self, x, t, threshold: Optional[float] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None):
        theta = self.threshold if threshold is None else check_threshold(threshold)
        is_numpy, xt, _, a, inv_2b2, t_check, lab, name, train, max_memory = \
            self._prepare_call(x, t, [None], labels, backend)
        times = self.call_times(t, xt.shape[0])
        if lab is not None and self.batch_average is not None:  # the exact path's op checks them; the batch average
            ops.groups(lab, *self._label_tensors, self.N, xt.shape[0])  # reads the classes itself: checked first
        out, key, share = self._forward(train, xt, a, inv_2b2 / self.temperature, t_check, lab, times, theta,
                                        return_provenance, name, max_memory)
        result = out.detach().numpy() if is_numpy else out
        if not return_provenance:
            return result
        return result, self._provenance(key, share, is_numpy)

    def denoise_ks(self, x, t, thresholds: Sequence[float], labels=None, *, backend: Optional[str] = None):
        """``x0_hat`` at several thresholds on the same noisy images (a calibration sweep): ``(K, B, C, H, W)``,
        ``out[j] = denoise(x, t, thresholds[j], labels)`` (one call per threshold; the noise level's matrix is
        computed once). Forward only."""
        thetas = [check_threshold(v) for v in thresholds]
        if not thetas:
            raise ValueError("thresholds is empty: pass at least one threshold in (0, 1]")
        with torch.no_grad():
            outs = [torch.as_tensor(self.denoise(x, t, v, labels, backend=backend)) for v in thetas]
        out = torch.stack(outs)
        return out.numpy() if isinstance(x, np.ndarray) else out

    def effective_k(self, k, Hq: int, Wq: int) -> int:
        return 0  # no patch size: the neighbourhoods are the masks'

    def _forward(self, train, xt, a, inv, t_check, lab, times, theta, provenance, name, max_memory):
        B, C, H, W = xt.shape
        lv, lp, li = self._label_tensors
        out = torch.zeros_like(xt)
        key = torch.full((B, H, W), -1, dtype=torch.int64)
        share = torch.zeros((B, H, W), dtype=xt.dtype)
        count = torch.ones(self.D, dtype=xt.dtype)
        for tv in sorted(set(times)):
            idx = [b for b in range(B) if times[b] == tv]
            sel = torch.as_tensor(idx, device=xt.device)
            hp, he, hw, rp, re = self._table(tv, theta)
            q, aa, ss = xt[sel], a[sel], inv[sel]
            tc = None if t_check is None else t_check[sel]
            lb = None if lab is None else lab[torch.as_tensor(idx)]
            if self.batch_average is None:
                rows, _, img, sh = ops.aligned_softmax(train, q, aa, ss, tc, lb, lv, lp, li, hp, he, hw, rp, re,
                                                       provenance, name, self.n_threads, max_memory)
            else:
                rows, img, sh = self._batch_averaged(train, q, aa, ss, tc, lb, (hp, he, hw, rp, re), provenance,
                                                     name, max_memory)
            out = out.index_put((sel,), ops.composite(rows, re, count, q.shape))
            if provenance:
                first = img[:, : H * W]  # the rows of channel 0, one per pixel
                pix = torch.arange(H * W)
                key[torch.as_tensor(idx)] = torch.where(first >= 0, first * H * W + pix, first).reshape(-1, H, W).cpu()
                share[torch.as_tensor(idx)] = sh[:, : H * W].reshape(-1, H, W).cpu()
        return out, key, share

    def _batch_averaged(self, train, q, a, inv, t_check, lab, table, provenance, name, max_memory):
        """The reference implementation's streaming softmax: per query, its images in consecutive batches of
        ``batch_average``, the softmax normalised within each batch, the batch means averaged with equal weight
        (their ``sum / (n_batches + 1e-8)``). Provenance: the winner of the batch with the largest logit."""
        S = self.batch_average
        B = q.shape[0]
        groups = self.images_by_label()
        out = torch.zeros((B, len(table[4])), dtype=q.dtype, device=q.device)
        img = torch.full((B, len(table[0]) - 1), -1, dtype=torch.int64)
        sh = torch.zeros((B, len(table[0]) - 1), dtype=q.dtype)
        no_labels = ops.LabelIndex.from_labels(None).tensors()  # each batch call: its images, no classes
        for b in range(B):
            images = groups[None] if lab is None else groups[int(lab[b])]
            best = None
            n_batches = 0
            for i0 in range(0, len(images), S):
                part = torch.as_tensor(np.asarray(images[i0 : i0 + S], np.int64))
                rows, stats, key, share = ops.aligned_softmax(
                    train[part.to(train.device)], q[b : b + 1], a[b : b + 1], inv[b : b + 1],
                    None if t_check is None else t_check[b : b + 1], None, *no_labels, *table, provenance, name,
                    self.n_threads, max_memory)
                out[b] += rows[0]
                n_batches += 1
                if provenance:
                    m = stats[0, :, 0]
                    if best is None:
                        best = m.clone()
                        img[b], sh[b] = part[key[0].cpu()], share[0].cpu()
                    else:
                        better = m > best
                        best = torch.where(better, m, best)
                        img[b] = torch.where(better, part[key[0].cpu()], img[b])
                        sh[b] = torch.where(better, share[0].cpu(), sh[b])
            out[b] = out[b] / (n_batches + 1e-8)
        return out, img, sh

    def check_request(self, shape, dtype=torch.float32, backend: str = "cpu", provenance: bool = False,
                      k: Optional[int] = None) -> None:
        """Raise :class:`patchmosaic.ResourceError` if a call on a batch of ``shape`` would need more working
        memory than allowed (the engine's per-row states; the masks' tables are bounded by ``D^2``)."""
        shape = tuple(int(v) for v in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"a batch shape is (B, C, H, W) with positive sizes, got {shape}")
        need = ops.aligned.aligned_bytes(shape, dtype, self.D, self.D, self.N, backend, self.n_threads)
        need += 16 * self.D * self.D  # the call's table, at most every element in every neighbourhood
        check_memory(need, f"PCALocality.denoise on a batch of shape {shape}", self.max_memory)

    def describe(self) -> dict:
        """What changes the machine's results: its kind, data, schedule, threshold, temperature, and the batch
        size of the reference implementation's approximation when used."""
        d = super().describe()
        d.update(threshold=self.threshold, temperature=self.temperature, batch_average=self.batch_average)
        return d

    def __repr__(self):
        return (super().__repr__()[:-1] + f", threshold={self.threshold}, temperature={self.temperature}"
                + ("" if self.batch_average is None else f", batch_average={self.batch_average}") + ")")
