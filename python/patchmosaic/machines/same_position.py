"""The same-position machines: every output row is a softmax over the training images at the query's own
positions (key set "same position"), computed on the same-position engine (ops/aligned.py: each training image's
squared residual once, summed over every row's neighbourhood). A machine of this kind only says what its rows are
-- their neighbourhoods and responses, as an element table -- in :meth:`SamePosition.rows`.

LS is the first: a row per pixel, its neighbourhood the square ``k x k`` patch (or a mask) inside the image, its
response the pixel's channels. PCA-locality (machines/pca_locality.py) has a row per element.
"""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch

from .. import ops
from ..validation import check_memory, check_sweep, outside_transforms
from .base import DATA_ARGS, ENGINE_ARGS, SOFT_ARG, SOURCE_ARGS, Machine


class SamePosition(Machine):
    __doc__ = """What the same-position machines share: the key set (the same position of every training image),
    the op call, the composite of the rows' responses into the output, and provenance per pixel. A machine of
    this kind defines :meth:`rows`. Use :class:`LS` or :class:`patchmosaic.PCALocality`.

    Args:
""" + DATA_ARGS + SOURCE_ARGS + ENGINE_ARGS

    rule = "ls"  # the key set, for what reads it as a table (the patch index, the sharded machines)

    def rows(self, t, k: int, weights: Optional[torch.Tensor], pixels: Optional[torch.Tensor], C: int, Hq: int,
             Wq: int):
        """The element table of a call (ops/aligned.py): ``(hood_ptr, hood_elem, hood_weight, resp_ptr,
        resp_elem, resp_weight)`` tensors (``resp_weight`` None: every response counts 1 in the composite), and each
        row's pixel ``(n_rows,)`` (for provenance). ``t``: the call's time."""
        raise NotImplementedError

    def _local_forward(self, train, xt, a, inv_2b2, t_check, lab, k: int, weights, pixels, provenance: bool, name: str,
                       max_memory: int):
        if name == "triton" and self.rule is not None and type(self).rows is LS.rows and self.centre_response:
            # the Triton engine computes LS through its key set (it has no same-position kernel)
            return super()._local_forward(train, xt, a, inv_2b2, t_check, lab, k, weights, pixels, provenance, name,
                                          max_memory)
        B, C, Hq, Wq = xt.shape
        if weights is not None and weights.dim() == 4 and tuple(weights.shape[:2]) != (Hq, Wq):
            raise ValueError(f"patch_mask holds one mask per pixel of a {weights.shape[0]}x{weights.shape[1]} canvas, "
                             f"but the queries are {Hq}x{Wq}")
        ops.checks.memory(ops.aligned.table_bytes(Hq * Wq, C * k * k), f"the element table of {Hq * Wq} rows of "
                          f"{C}x{k}x{k} patch elements", max_memory)  # (before it is made)
        *table, resp_weight, row_pixel = self.rows(None, k, weights, pixels, C, Hq, Wq)
        lv, lp, li = self._label_tensors
        out_rows, _, img, share = ops.aligned_softmax(train, xt, a, inv_2b2, t_check, lab, lv, lp, li, *table,
                                                      provenance, name, self.n_threads, max_memory)
        D = C * Hq * Wq
        count = ops.response_count(table[4], D, resp_weight, xt.dtype)
        out = ops.composite(out_rows, table[4], count, xt.shape, resp_weight)
        if not provenance:
            return out, img, share
        HW = Hq * Wq
        key = torch.full((B, HW), -1, dtype=torch.int64, device=img.device)
        keyshare = torch.zeros((B, HW), dtype=share.dtype, device=share.device)
        pix = row_pixel.to(img.device)
        key[:, pix] = torch.where(img >= 0, img * HW + pix[None, :], img)
        keyshare[:, pix] = share
        return out, key.reshape(B, Hq, Wq), keyshare.reshape(B, Hq, Wq)


    centre_response = True  # each row's response is its own pixel (LS(response=...) changes it)


RESPONSE_ARG = """\
        response: what each pixel's softmax averages (the response axis of the filtered posterior mean
            collections): ``"centre"`` (default, LS): the pixel's own channels; ``"patch"``: its whole ``k x k``
            patch (inside the image), each output element the mean of the patch means that cover it (PSPC's
            composite, on centred patches); a Gaussian width ``s > 0``: the patch means weighted by
            ``exp(-d^2 / (2 s^2))``, ``d`` the distance in pixels from the patch's centre. A non-centre response
            takes a patch mask shared by every pixel, runs on the same-position engine only (the patch index and the
            key-sharded machines serve the centre response), and sweeps patch sizes one call each.
"""


class KeptTables:
    """Element tables of a machine kept for its later calls, the most recently used last, within a budget of
    neighbourhood elements: a kept table also keeps the checked copy the op makes of it (ops.memo, while its tensors
    live) and the CPU engine's plan, about 40 bytes per element in all, so a sweep over many patch sizes keeps only
    the last few (a table above the budget is not kept). Safe to share between threads (a lost race makes a table
    twice)."""

    BUDGET = 1 << 22  # neighbourhood elements over all kept tables (about 170 MB)

    def __init__(self):
        self._tables = {}

    def get(self, key, make):
        """The table kept under ``key``, or ``make()`` (made outside any torch.func transform and inference mode),
        kept if it fits."""
        table = self._tables.pop(key, None)
        if table is None:
            with outside_transforms():  # a cached constant: no torch.func transform may wrap it
                table = make()
        size = int(table[1].numel())
        if size <= self.BUDGET:
            self._tables[key] = table  # (the most recent last)
            while sum(int(v[1].numel()) for v in list(self._tables.values())) > self.BUDGET:
                self._tables.pop(next(iter(self._tables), None), None)
        return table

    def keys(self):
        return list(self._tables)


class LS(SamePosition):
    __doc__ = """Local score machine (eq. 7-8): each pixel attends to the same location of every training image
    (zero-padded ``k x k`` patches). Queries have the training size. Computed on the same-position engine (each
    training image's squared residual once, summed over every pixel's patch as runs of elements).

    Args:
""" + DATA_ARGS + RESPONSE_ARG + SOFT_ARG + SOURCE_ARGS + ENGINE_ARGS

    def __init__(self, images, labels=None, *, response="centre", soft=None, xflip: bool = False,
                 schedule="cosine_legacy", backend: str = "auto", n_threads: int = 0, max_memory=None):
        self.soft = self._check_soft(soft)
        if isinstance(response, str):
            if response not in ("centre", "patch"):
                raise ValueError(f"response must be 'centre', 'patch' or a Gaussian width > 0, got {response!r}")
        elif isinstance(response, bool) or not isinstance(response, numbers.Real) or not 0 < float(response) < np.inf:
            raise ValueError(f"response must be 'centre', 'patch' or a Gaussian width > 0, got {response!r}")
        else:
            response = float(response)
        self.response = response
        self.centre_response = response == "centre"
        self._kept_rows = KeptTables()  # the plain patch's tables (rows)
        super().__init__(images, labels, xflip=xflip, schedule=schedule, backend=backend, n_threads=n_threads,
                         max_memory=max_memory)

    def rows(self, t, k, weights, pixels, C, Hq, Wq):
        if weights is None and pixels is None and not torch.compiler.is_compiling():
            # the plain patch: its table kept (and the engine's plan with it, ops/engines.py), not made per call
            key = (int(k), int(C), int(Hq), int(Wq), self.response)
            return self._kept_rows.get(key, lambda: self._rows(k, None, None, C, Hq, Wq))
        return self._rows(k, weights, pixels, C, Hq, Wq)

    def _rows(self, k, weights, pixels, C, Hq, Wq):
        w = weights if weights is not None else torch.ones((k, k), dtype=torch.float64)
        if self.centre_response:
            hp, he, hw, rp, re = ops.patch_table(w, C, Hq, Wq, pixels)
            row_pixel = re.reshape(-1, C)[:, 0]
            return hp, he, hw, rp, re, None, row_pixel
        if w.dim() != 2:
            raise ValueError("LS(response=...) takes a patch mask shared by every pixel, (k, k), not one per pixel")
        r = k // 2
        u = torch.arange(k, dtype=torch.float64) - r
        row_pixel = torch.arange(Hq * Wq) if pixels is None else torch.nonzero(pixels.reshape(-1)).reshape(-1)
        anchors = torch.stack([row_pixel // Wq - r, row_pixel % Wq - r], 1)
        if self.response == "patch":
            hp, he, hw, rp, re, rwt = ops.window_table(w, torch.ones((k, k), dtype=torch.float64), anchors, C, Hq, Wq)
        else:  # Gaussian responses formed per element (they underflow at small widths)
            log_rw = -(u[:, None] ** 2 + u[None, :] ** 2) / (2 * self.response ** 2)
            hp, he, hw, rp, re, rwt = ops.window_table_log_response(w, log_rw, anchors, C, Hq, Wq)
        return hp, he, hw, rp, re, None if self.response == "patch" else rwt, row_pixel

    def denoise_ks(self, x, t, ks, labels=None, *, backend=None):
        if self.centre_response or self.soft is not None:
            return super().denoise_ks(x, t, ks, labels, backend=backend)
        ks = check_sweep(ks, self.H, self.W)
        with torch.no_grad():
            outs = [torch.as_tensor(self.denoise(x, t, k, labels, backend=backend)) for k in ks]
        out = torch.stack(outs)
        return out.numpy() if isinstance(x, np.ndarray) else out

    denoise_ks.__doc__ = Machine.denoise_ks.__doc__

    def check_request(self, shape, dtype=torch.float32, backend: str = "cpu", provenance: bool = False,
                      k: Optional[int] = None) -> None:
        super().check_request(shape, dtype, backend, provenance, k)
        B, C, Hq, Wq = (int(v) for v in shape)
        kk = self.effective_k(3 if k is None else k, Hq, Wq)
        check_memory(ops.aligned.table_bytes(Hq * Wq, C * kk * kk), f"LS.denoise's element table of {Hq * Wq} rows "
                     f"of {C}x{kk}x{kk} patch elements", self.max_memory)

    check_request.__doc__ = Machine.check_request.__doc__

    def describe(self) -> dict:
        d = super().describe()
        if not self.centre_response:
            d["response"] = self.response
        return d
