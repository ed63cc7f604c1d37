"""The optimal linear denoiser (the Gaussian / Wiener filter): the posterior mean of ``x0`` under a Gaussian
fitted to the training set, ``x0_hat = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x_t - a mu)``.

It is the closed-form baseline of this line of work. ``Sigma = U diag(lam) U^T`` is eigendecomposed once per
class (float64, on the CPU; a thin SVD of the centred images for a class of ``n < D`` images, whose
covariance has rank below ``n``); a call is then two products with ``U`` per image,
``x0_hat = mu + U diag(a lam / (a^2 lam + b^2)) U^T (x_t - a mu)``, with ``a`` and ``b`` of each image's
own ``t``. It needs no op of the compiled core: plain torch, on the device of the query.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import ops
from ..ops import checks
from ..ops.checks import check_cuda_inputs
from ..schedules import ScheduleLike
from ..validation import check_memory, check_time
from .base import BACKEND_ARG, CALL_ARGS, DATA_ARGS, SOURCE_ARGS, Machine, docstring

WIENER_ARGS = """\
        schedule: the noise schedule ``alpha_bar(t)``: ``"cosine_legacy"`` (the paper's, default),
            ``"cosine"``, ``"linear"``, a :class:`patchmosaic.schedules.Schedule` or any callable
            ``t -> alpha_bar(t)`` on ``(0, 1]``.
        max_memory: bytes the machine may use, for its ``D x D`` eigendecompositions (at construction) and
            for a call's working memory; None (default) means the memory this machine has available. A larger
            request raises :class:`patchmosaic.ResourceError` before any work.
"""


class Wiener(Machine):
    __doc__ = """The optimal linear denoiser (Gaussian posterior mean, the Wiener filter): with the training
    set's mean ``mu`` and covariance ``Sigma`` (normalised by ``1/N``; per class for a conditional call),
    ``x0_hat = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x_t - a mu)``, ``a = sqrt(alpha_bar(t))``,
    ``b = sqrt(1 - alpha_bar(t))``.

    ``Sigma`` (``D x D``, ``D = C H W``) is eigendecomposed once per class in float64 when the machine is
    built; for a class of ``n < D`` images through the thin SVD of its centred images, as only the ``n``
    directions of its range have a nonzero gain. A machine built with labels decomposes the covariance of
    all its images at its first unconditional call. Every call computes in float64 on the device of ``x`` and answers in ``x``'s dtype.
    The filter is not translation-equivariant: queries have the training size. ``k`` is ignored, as by IS.

    Args:
""" + DATA_ARGS + SOURCE_ARGS + WIENER_ARGS + """
    Raises:
        :class:`patchmosaic.ResourceError` when the float64 eigenbases (``8 D min(n, D)`` bytes for a class
        of ``n`` images: ``8 D^2`` for a large class) would not fit in ``max_memory``, before any is computed.
    """

    local = False

    def __init__(self, images, labels=None, *, xflip: bool = False, schedule: ScheduleLike = "cosine_legacy",
                 max_memory: Optional[int] = None):
        super().__init__(images, labels, xflip=xflip, schedule=schedule, backend="torch", max_memory=max_memory)
        self.D = self.C * self.H * self.W
        sizes = [self.N] if self.labels is None else np.diff(self.label_index.ptr).tolist()
        ranks = [min(int(n), self.D) for n in sizes] + ([] if self.labels is None else [min(self.N, self.D)])
        # per class (and, with labels, for all images) its eigenvectors U (D x min(n, D) float64); once, the
        # largest decomposition's workspace (about three times its U); and the images as a float64 (N, D) copy
        need = (sum(ranks) + 3 * max(ranks)) * self.D * 8 + self.N * self.D * 8
        check_memory(need, f"Wiener on {self.N} images of {self.C}x{self.H}x{self.W} (D = {self.D} pixels: "
                           f"{len(ranks)} float64 eigenbases of up to {self.D} x {max(ranks)}, "
                           f"{self.D * max(ranks) * 8 / 2**30:.2f} GiB each)", self.max_memory)
        self._flat = self.images.reshape(self.N, self.D).to(torch.float64)
        self._groups = {}  # group -> (mu (D,), lam (r,), U (D, r)), float64 on the CPU; None: all images
        self._on_device = {}  # (group, device) -> the same on that device
        if self.labels is None:
            self._decompose(None)
        else:
            for g in range(len(self.label_index.values)):
                self._decompose(g)

    # ----- the statistics ----------------------------------------------------------------------
    def _decompose(self, group: Optional[int]):
        """``(mu, lam, U)`` of the images of ``group`` (an index into the label values; None: all images)."""
        if group not in self._groups:
            if group is None:
                X = self._flat
            else:
                idx = self.label_index.images[self.label_index.ptr[group] : self.label_index.ptr[group + 1]]
                X = self._flat[torch.from_numpy(idx.astype(np.int64))]
            n = X.shape[0]
            mu = X.mean(0)
            Xc = X - mu
            if n < self.D:  # Sigma has rank < n: the thin SVD of the centred images gives its whole range
                _, s, Vh = torch.linalg.svd(Xc / n ** 0.5, full_matrices=False)
                lam, U = s * s, Vh.T.contiguous()
            else:
                lam, U = torch.linalg.eigh(Xc.T @ Xc / n)
                lam = lam.clamp_min(0.0)  # eigh may return roundoff below 0
            self._groups[group] = (mu, lam, U)
        return self._groups[group]

    def statistics(self, label: Optional[int] = None):
        """The Gaussian the filter uses: ``(mu, Sigma)`` of the training images of class ``label`` (None: of
        all of them) as float64 CPU tensors of shapes ``(D,)`` and ``(D, D)``, ``D = C H W``; ``Sigma`` is
        rebuilt from its eigendecomposition.

        Args:
            label: a class label the machine was built with, or None (default): all training images.
        """
        if label is None:
            group = None
        else:
            if self.labels is None:
                raise ValueError("a label was given but this machine was built without training labels")
            group = int(ops.groups(torch.tensor([int(label)]), *self._label_tensors, self.N, 1).group_of_b[0])
        mu, lam, U = self._decompose(group)
        return mu.clone(), (U * lam) @ U.T

    def jacobian(self, t: float) -> torch.Tensor:
        """The filter's Jacobian ``d x0_hat / d x_t = a Sigma (a^2 Sigma + b^2 I)^-1`` over all training images
        at time ``t``: a float64 ``(D, D)`` CPU tensor (row = output element, column = input element; ``D = C H
        W``), the filter's sensitivity fields (used by :class:`patchmosaic.DataLocal`).

        Args:
            t: diffusion time in ``(0, 1]``.
        """
        a, b2 = (float(v) for v in self.schedule.coefficients(check_time(t)))
        check_memory(2 * self.D * self.D * 8, f"the {self.D} x {self.D} float64 Jacobian of the Wiener filter",
                     self.max_memory, "use jacobian_rows for a few rows, or smaller images")
        _, lam, U = self._decompose(None)
        gain = a * lam / (a * a * lam + b2)
        return (U * gain) @ U.T

    def jacobian_rows(self, t: float, rows) -> torch.Tensor:
        """Rows ``rows`` (output elements, an index tensor or array) of :meth:`jacobian` at time ``t``, without the
        whole ``D x D`` matrix: a float64 ``(len(rows), D)`` CPU tensor.

        Args:
            t: diffusion time in ``(0, 1]``.
            rows: the output elements (indices into ``C H W``).
        """
        a, b2 = (float(v) for v in self.schedule.coefficients(check_time(t)))
        _, lam, U = self._decompose(None)
        gain = a * lam / (a * a * lam + b2)
        return (U[torch.as_tensor(rows, dtype=torch.long)] * gain) @ U.T

    def _stats_on(self, group: Optional[int], device: torch.device):
        key = (group, str(device))
        if key not in self._on_device:
            self._on_device[key] = tuple(v.to(device) for v in self._decompose(group))
        return self._on_device[key]

    # ----- calls -------------------------------------------------------------------------------
    @docstring("""Posterior-mean estimate ``x0_hat = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x - a mu)``
        (differentiable in ``x`` and ``t``), each query with the mean and covariance of its own class when
        ``labels`` are given.

        Args:
""" + CALL_ARGS + """\
            return_provenance: must be False (default): a linear filter has no winning training key.
""" + BACKEND_ARG + """\
                The filter itself always runs in plain torch on ``x``'s device; ``"cpu"`` and ``"cuda"``
                only check that ``x`` is there (for a :class:`patchmosaic.MachineDenoiser` shared with
                other machines).

        Returns:
            ``x0_hat`` with the shape and dtype of ``x``: a torch tensor on ``x``'s device for torch input, a
            numpy array for numpy input.

        Raises:
            ValueError or TypeError naming a bad argument (a query of another size than the training images,
            NaN, ``t`` outside ``(0, 1]``, a label without training images), :class:`patchmosaic.ResourceError`
            for a call that would need more than ``max_memory``: all before any work.
        """)
    def denoise(self, x, t, k: Optional[int] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None):
        check_cuda_inputs(x=x, t=t, labels=labels)
        if return_provenance:
            raise ValueError("the Wiener filter is linear: it has no winning training key (return_provenance "
                             "must be False)")
        is_numpy = isinstance(x, np.ndarray)
        xt = self._query(x)
        B = xt.shape[0]
        self.effective_k(k, self.H, self.W)  # a given k must still be a patch size, as for IS
        self._check_backend(xt, backend)
        a, b2, t_check = self._a_b2(t, B, xt.device)
        checks.values(xt, "x", t_check, a, 0.5 / b2)
        lab = self._query_labels(labels, B)
        if lab is None:
            group_of_b = None
        else:
            group_of_b = ops.groups(lab, *self._label_tensors, self.N, B).group_of_b
        self.check_request(xt.shape, xt.dtype)

        y = xt.reshape(B, self.D).to(torch.float64)
        todo = [(None, None)] if group_of_b is None else \
            [(int(g), np.nonzero(group_of_b == g)[0]) for g in np.unique(group_of_b)]
        parts = []
        for g, rows in todo:
            mu, lam, U = self._stats_on(g, xt.device)
            sel = slice(None) if rows is None else torch.from_numpy(rows.astype(np.int64)).to(xt.device)
            ag, b2g = a[sel][:, None], b2[sel][:, None]
            gain = ag * lam / (ag * ag * lam + b2g)  # (n, D): the filter's gain on each eigendirection
            z = ((y[sel] - ag * mu) @ U) * gain
            parts.append((sel, mu + z @ U.T))
        if len(parts) == 1:  # one group: its rows are all B queries, in order
            res = parts[0][1]
        else:
            order = torch.cat([sel for sel, _ in parts])
            res = torch.cat([v for _, v in parts]).index_select(0, torch.argsort(order))
        res = res.to(xt.dtype).reshape(xt.shape)
        return res.detach().numpy() if is_numpy else res

    def check_request(self, shape, dtype=torch.float32, backend: str = "torch", provenance: bool = False,
                      k: Optional[int] = None) -> None:
        """Raise :class:`patchmosaic.ResourceError` if a call on a batch of ``shape`` would need more working
        memory than allowed (float64 copies of the batch, its per-image gains and the result), from the shape
        alone.

        Args:
            shape: the batch shape ``(B, C, H, W)``.
            dtype: the batch's dtype (default ``torch.float32``).
            backend: ignored (the filter runs in torch on the batch's device); kept for the machines' common
                signature.
            provenance: ignored (the filter has no provenance).
            k: ignored (the filter has no patch).
        """
        shape = tuple(int(v) for v in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"a batch shape is (B, C, H, W) with positive sizes, got {shape}")
        item = torch.empty((), dtype=dtype).element_size()
        n = int(np.prod(shape))
        need = 5 * n * 8 + n * item
        check_memory(need, f"Wiener.denoise on a batch of shape {shape}", self.max_memory)

    def _check_backend(self, xt: torch.Tensor, name: Optional[str]) -> None:
        if name is None or name in ("auto", "torch"):
            return
        if name not in ops.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {ops.BACKENDS}")
        want = "cpu" if name == "cpu" else "cuda"
        if xt.device.type != want:
            raise ValueError(f"backend={name!r} needs {want.upper()} inputs, got a tensor on {xt.device}; the "
                             "Wiener filter runs on x's device with any backend ('auto' or 'torch')")

    def _check_canvas(self, Hq: int, Wq: int) -> None:
        if (Hq, Wq) != (self.H, self.W):
            raise ValueError(f"Wiener needs queries of the training size {self.H}x{self.W}, got {Hq}x{Wq}: the "
                             "Wiener filter is not translation-equivariant (its covariance is over the pixels "
                             "of the training canvas)")

    def describe(self) -> dict:
        """Everything about the machine that changes its results: kind, training data (shape and content
        hash) and noise schedule."""
        d = super().describe()
        d["filter"] = "linear (Gaussian posterior mean)"
        return d

    def __repr__(self):
        lab = "" if self.labels is None else f", {len(self.label_index.values)} labels"
        return (f"Wiener({self.N} images {self.C}x{self.H}x{self.W}{lab}, D={self.D}, "
                f"schedule={self.schedule.name})")
