"""The same-position machines: every output row is a softmax over the training images at the query's own
positions (key set "same position"), computed on the same-position engine (ops/aligned.py: each training image's
squared residual once, summed over every row's neighbourhood). A machine of this kind only says what its rows are
-- their neighbourhoods and responses, as an element table -- in :meth:`SamePosition.rows`.

LS is the first: a row per pixel, its neighbourhood the square ``k x k`` patch (or a mask) inside the image, its
response the pixel's channels. PCA-locality (machines/pca_locality.py) has a row per element.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import DATA_ARGS, ENGINE_ARGS, SOURCE_ARGS, Machine


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
        resp_elem)`` tensors, and each row's pixel ``(n_rows,)`` (for provenance). ``t``: the call's time."""
        raise NotImplementedError

    def _local_forward(self, train, xt, a, inv_2b2, t_check, lab, k: int, weights, pixels, provenance: bool, name: str,
                       max_memory: int):
        if name == "triton" and self.rule is not None and type(self).rows is LS.rows:
            # the Triton engine computes LS through its key set (it has no same-position kernel)
            return super()._local_forward(train, xt, a, inv_2b2, t_check, lab, k, weights, pixels, provenance, name,
                                          max_memory)
        B, C, Hq, Wq = xt.shape
        if weights is not None and weights.dim() == 4 and tuple(weights.shape[:2]) != (Hq, Wq):
            raise ValueError(f"patch_mask holds one mask per pixel of a {weights.shape[0]}x{weights.shape[1]} canvas, "
                             f"but the queries are {Hq}x{Wq}")
        *table, row_pixel = self.rows(None, k, weights, pixels, C, Hq, Wq)
        lv, lp, li = self._label_tensors
        out_rows, _, img, share = ops.aligned_softmax(train, xt, a, inv_2b2, t_check, lab, lv, lp, li, *table,
                                                      provenance, name, self.n_threads, max_memory)
        D = C * Hq * Wq
        count = torch.zeros(D, dtype=xt.dtype).index_add_(0, table[4], torch.ones(len(table[4]), dtype=xt.dtype))
        out = ops.composite(out_rows, table[4], count, xt.shape)
        if not provenance:
            return out, img, share
        HW = Hq * Wq
        key = torch.full((B, HW), -1, dtype=torch.int64, device=img.device)
        keyshare = torch.zeros((B, HW), dtype=share.dtype, device=share.device)
        pix = row_pixel.to(img.device)
        key[:, pix] = torch.where(img >= 0, img * HW + pix[None, :], img)
        keyshare[:, pix] = share
        return out, key.reshape(B, Hq, Wq), keyshare.reshape(B, Hq, Wq)


class LS(SamePosition):
    __doc__ = """Local score machine (eq. 7-8): each pixel attends to the same location of every training image
    (zero-padded ``k x k`` patches). Queries have the training size. Computed on the same-position engine (each
    training image's squared residual once, summed over every pixel's patch as runs of elements).

    Args:
""" + DATA_ARGS + SOURCE_ARGS + ENGINE_ARGS

    def rows(self, t, k, weights, pixels, C, Hq, Wq):
        w = weights if weights is not None else torch.ones((k, k), dtype=torch.float64)
        hp, he, hw, rp, re = ops.patch_table(w, C, Hq, Wq, pixels)
        row_pixel = re.reshape(-1, C)[:, 0]
        return hp, he, hw, rp, re, row_pixel
