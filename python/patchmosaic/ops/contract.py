"""The call structs of the compiled core (cpp/include/patchmosaic/contract.hpp), filled from tensors.

Every field of a struct is set here and only here: :func:`make` refuses a call that leaves a field out or
names one the struct does not have, so the Python and C++ sides cannot drift apart silently. Buffers are
passed by address (``data_ptr`` of a contiguous tensor, ``ctypes.data`` of a numpy array); whoever calls
keeps them alive for the duration of the call.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .tables import KeySet
from .labels import Groups

DTYPES = {torch.float32: 0, torch.float64: 1}


def address(x) -> int:
    """The address of a contiguous buffer (0 for None)."""
    if x is None:
        return 0
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise ValueError("internal: a non-contiguous index array reached the compiled core")
        return int(x.ctypes.data)
    if not x.is_contiguous():
        raise ValueError("internal: a non-contiguous tensor reached the compiled core")
    return int(x.data_ptr())


def make(cls, **fields):
    """An instance of the bound struct ``cls`` with every one of its fields set."""
    want = set(cls.FIELDS)
    missing, unknown = want - set(fields), set(fields) - want
    if missing or unknown:
        raise RuntimeError(f"internal: {cls.__name__} call with missing fields {sorted(missing)} "
                           f"and unknown fields {sorted(unknown)}")
    call = cls()
    for name, value in fields.items():
        setattr(call, name, value if isinstance(value, int) else address(value))
    return call


def local_call(module, *, train: torch.Tensor, query: torch.Tensor, k: int, keyset: KeySet, a: torch.Tensor,
               inv_2b2: torch.Tensor, groups: Groups, out: torch.Tensor, stats: torch.Tensor,
               arg_key: Optional[torch.Tensor] = None, arg_share: Optional[torch.Tensor] = None,
               grad_out: Optional[torch.Tensor] = None, grad_query: Optional[torch.Tensor] = None,
               grad_a: Optional[torch.Tensor] = None, grad_inv_2b2: Optional[torch.Tensor] = None,
               n_threads: int = 0, elements=None):
    """The LocalCall of a local machine; ``elements``: a masked patch's element table (masks.PatchElements), or
    None for the square patch."""
    N, C, H, W = train.shape
    B, _, Hq, Wq = query.shape
    return make(module.LocalCall, dtype=DTYPES[query.dtype], train=train, N=N, C=C, H=H, W=W, query=query, B=B,
                Hq=Hq, Wq=Wq, k=int(k), query_pad=int(keyset.query_pad), key_pad=int(keyset.key_pad),
                n_elem=0 if elements is None else len(elements.codes),
                elem=None if elements is None else elements.codes,
                elem_scale=None if elements is None else elements.scale,
                cls_elem_ptr=None if elements is None else elements.cls_ptr, a=a,
                inv_2b2=inv_2b2, n_classes=keyset.n_classes, cls_qpix_ptr=keyset.cls_qpix_ptr,
                cls_qpix=keyset.cls_qpix, n_cls_qpix=len(keyset.cls_qpix), cls_kpos_ptr=keyset.cls_kpos_ptr,
                cls_kpos=keyset.cls_kpos, n_cls_kpos=len(keyset.cls_kpos), n_groups=len(groups.grp_img_ptr) - 1,
                grp_img_ptr=groups.grp_img_ptr, grp_img=groups.grp_img, n_grp_img=len(groups.grp_img),
                group_of_b=groups.group_of_b, out=out, stats=stats, arg_key=arg_key, arg_share=arg_share,
                grad_out=grad_out, grad_query=grad_query, grad_a=grad_a, grad_inv_2b2=grad_inv_2b2,
                n_threads=int(n_threads))


def local_multi_call(module, *, train: torch.Tensor, query: torch.Tensor, multi, a: torch.Tensor, inv_2b2: torch.Tensor,
                     groups: Groups, out: torch.Tensor, n_threads: int = 0):
    """The call of the multi-size forward pass; ``multi`` is a tables.MultiKeySet, ``out`` (K, B, C, Hq, Wq)."""
    N, C, H, W = train.shape
    B, _, Hq, Wq = query.shape
    ks = np.ascontiguousarray(np.asarray(multi.ks, np.int32))
    keyset = multi.keyset
    return make(module.LocalMultiCall, dtype=DTYPES[query.dtype], train=train, N=N, C=C, H=H, W=W, query=query, B=B,
                Hq=Hq, Wq=Wq, n_ks=len(multi.ks), ks=ks, query_pad=int(keyset.query_pad),
                key_pad=int(keyset.key_pad), a=a, inv_2b2=inv_2b2, n_classes=keyset.n_classes,
                cls_qpix_ptr=keyset.cls_qpix_ptr, cls_qpix=keyset.cls_qpix, n_cls_qpix=len(keyset.cls_qpix),
                cls_kpos_ptr=keyset.cls_kpos_ptr, cls_kpos=keyset.cls_kpos, n_cls_kpos=len(keyset.cls_kpos),
                cls_kmask=multi.kmask, n_groups=len(groups.grp_img_ptr) - 1, grp_img_ptr=groups.grp_img_ptr,
                grp_img=groups.grp_img, n_grp_img=len(groups.grp_img), group_of_b=groups.group_of_b, out=out,
                n_threads=int(n_threads)), ks


def ideal_call(module, *, train: torch.Tensor, query: torch.Tensor, a: torch.Tensor, inv_2b2: torch.Tensor,
               groups: Groups, out: torch.Tensor, stats: torch.Tensor, arg_key=None, arg_share=None, grad_out=None,
               grad_query=None, grad_a=None, grad_inv_2b2=None, n_threads: int = 0):
    N, B = train.shape[0], query.shape[0]
    D = train[0].numel()
    return make(module.IdealCall, dtype=DTYPES[query.dtype], train=train, N=N, D=D, query=query, B=B, a=a,
                inv_2b2=inv_2b2, n_groups=len(groups.grp_img_ptr) - 1, grp_img_ptr=groups.grp_img_ptr,
                grp_img=groups.grp_img, n_grp_img=len(groups.grp_img), group_of_b=groups.group_of_b, out=out,
                stats=stats, arg_key=arg_key, arg_share=arg_share, grad_out=grad_out, grad_query=grad_query,
                grad_a=grad_a, grad_inv_2b2=grad_inv_2b2, n_threads=int(n_threads))


def candidate_call(module, *, train, query, k, query_pad, key_pad, a, inv_2b2, pix, cand, count, out, top_logit,
                   last_logit, sum_rel, arg_key=None, arg_share=None, n_threads: int = 0, elements=None):
    N, C, H, W = train.shape
    B, _, Hq, Wq = query.shape
    P, m = cand.shape
    return make(module.CandidateCall, dtype=DTYPES[query.dtype], train=train, N=N, C=C, H=H, W=W, query=query, B=B,
                Hq=Hq, Wq=Wq, k=int(k), query_pad=int(query_pad), key_pad=int(key_pad),
                n_elem=0 if elements is None else len(elements.codes),
                elem=None if elements is None else elements.codes,
                elem_scale=None if elements is None else elements.scale, a=a, inv_2b2=inv_2b2,
                P=int(P), pix=pix, m=int(m), cand=cand, count=count, out=out, top_logit=top_logit,
                last_logit=last_logit, sum_rel=sum_rel, arg_key=arg_key, arg_share=arg_share,
                n_threads=int(n_threads))


def aligned_call(module, *, train: torch.Tensor, query: torch.Tensor, table, a: torch.Tensor, inv_2b2: torch.Tensor,
                 groups: Groups, out: torch.Tensor, stats: torch.Tensor, arg_key=None, arg_share=None, grad_out=None,
                 grad_query=None, grad_a=None, grad_inv_2b2=None, transposed=None, n_threads: int = 0):
    """The AlignedCall of a same-position machine; ``table`` a tables.ElementTable, ``transposed`` its transpose
    ``(ptr, row, weight)`` (the CUDA engine's backward pass) or None."""
    N, B = train.shape[0], query.shape[0]
    D = train[0].numel()
    tp, tr, tw = transposed if transposed is not None else (None, None, None)
    return make(module.AlignedCall, dtype=DTYPES[query.dtype], train=train, N=N, D=D, query=query, B=B, a=a,
                inv_2b2=inv_2b2, n_rows=table.n_rows, hood_ptr=table.hood_ptr, hood_elem=table.hood_elem,
                n_hood=len(table.hood_elem), hood_weight=table.hood_weight, resp_ptr=table.resp_ptr,
                resp_elem=table.resp_elem, n_resp=len(table.resp_elem), n_groups=len(groups.grp_img_ptr) - 1,
                grp_img_ptr=groups.grp_img_ptr, grp_img=groups.grp_img, n_grp_img=len(groups.grp_img),
                group_of_b=groups.group_of_b, out=out, stats=stats, arg_key=arg_key, arg_share=arg_share,
                grad_out=grad_out, grad_query=grad_query, grad_a=grad_a, grad_inv_2b2=grad_inv_2b2, hoodT_ptr=tp,
                hoodT_row=tr, hoodT_weight=tw, n_threads=int(n_threads))
