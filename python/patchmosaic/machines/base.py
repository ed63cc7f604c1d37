"""What every machine shares: a training set, labels, a noise schedule, an engine choice, and the
conversion of a call (``denoise``, ``eps``, ``score``, ``sensitivity``) into one custom op call.

The checks here look at shapes and types only (so a machine runs inside ``torch.compile(fullgraph=True)``
without a graph break); the checks that need the values (NaN, ``t`` in range, known labels) run once,
inside the op (ops/library.py).
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from .. import ops
from . import keysets
from ..ops.checks import check_cuda_inputs
from ..ops.masks import check_patch_mask, crop_patch_mask, gaussian_mask
from ..schedules import ScheduleLike, get_schedule
from ..validation import (ResourceError, as_batch, check_k, check_max_memory, check_memory, check_sweep, check_time,
                          concrete, constant, outside_transforms, to_labels, to_tensor)


@dataclass
class Provenance:
    """Which training key won each output pixel: the highest-weight key and its share of the weight.

    Returned by ``denoise(..., return_provenance=True)``. Each field has shape ``(B, Hq, Wq)`` for the local
    machines and ``(B,)`` for IS, and is of the same kind (numpy or torch) as the query.

    Args:
        image: index (into the training images) of the winning key's image.
        row: row of the winning key's centre in its training image (None for IS).
        col: column of the winning key's centre in its training image (None for IS).
        share: the winning key's softmax weight, in ``(0, 1]``.
    """

    image: object
    row: object
    col: object
    share: object


# The arguments every machine takes (the class docstrings of IS, LS and ELS repeat them, so that ``help()``
# of each shows them all).
DATA_ARGS = """\
        images: training images ``(N, C, H, W)``, float32 or float64, numpy or torch (CPU; a copy is kept on
            the CPU), finite, in the data scale (e.g. ``[-1, 1]``).
        labels: ``(N,)`` integer class labels of the training images, or None (default). A machine built
            with labels serves class-conditional calls (``denoise(..., labels=y)``: each query uses only the
            training images of its own label) and, with ``labels=None`` at call time, unconditional ones over
            all its training images whatever their label. A machine built without labels refuses labels at
            call time (ValueError).
"""
SOURCE_ARGS = """\
        xflip: also use every training image mirrored left-right (the source doubled, the labels with it; a
            provenance image index ``n >= N`` is the mirror of image ``n - N``, :meth:`source_image`). Default False.
"""
SOFT_ARG = """\
        soft: None (default): the square ``k x k`` patch. A number ``c > 0``: a soft patch, every element of the
            ``k x k`` window weighted by ``exp(-d^2 / (2 (c k)^2))``, ``d`` its distance in pixels from the centre
            (the soft query precision of the filtered posterior mean collections), at every ``k`` of a call or a
            k-schedule; a call's own ``patch_mask`` is then refused. Patch sizes are swept one call each, and the
            patch index does not serve it.
"""
ENGINE_ARGS = """\
        schedule: the noise schedule ``alpha_bar(t)``: ``"cosine_legacy"`` (the paper's, default),
            ``"cosine"``, ``"linear"``, a :class:`patchmosaic.schedules.Schedule` or any callable
            ``t -> alpha_bar(t)`` on ``(0, 1]``.
        backend: the engine: ``"auto"`` (default: the CPU engine for CPU tensors, the CUDA engine for CUDA
            tensors, or the faster of it and the Triton engine where a measured table has the call's shape),
            ``"cpu"``, ``"cuda"`` (needs a CUDA build of patchmosaic and torch), ``"triton"`` (float32 on tensor
            cores in split precision; needs ``pip install "patchmosaic[gpu]"``; CPU tensors only under Triton's
            interpreter, ``TRITON_INTERPRET=1``), or ``"torch"`` (the plain PyTorch reference, any device).
        n_threads: CPU engine threads; 0 (default) uses all available cores.
        max_memory: bytes a call may use for its working memory; None (default) means the memory this
            machine has available. A larger request raises :class:`patchmosaic.ResourceError` before any work.
"""

# The arguments of a call (denoise, eps, score, sensitivity).
CALL_ARGS = """\
            x: noisy images ``x_t`` ``(B, C, Hq, Wq)``, float32 or float64, numpy or torch (CPU, or CUDA with
                the ``"cuda"`` or ``"torch"`` backend); ``Hq x Wq`` is the training size for IS and LS, and any
                canvas the key sets allow for ELS.
            t: diffusion time in ``(0, 1]`` (1: pure noise): a float, or one per image as a ``(B,)`` array or
                tensor (a tensor ``t`` is differentiable).
            k: odd patch size in pixels, required by LS and ELS, ignored by IS (default None).
            labels: ``(B,)`` integer class labels (numpy, torch, a list, or one int for all), or None
                (default). With labels each query uses only the training images of its own label (the machine
                must have been built with labels, else a ValueError); None uses all training images.
"""
PATCH_MASK_ARG = """\
            patch_mask: local machines only: the neighbourhood of each pixel instead of the square ``k x k``
                patch: a ``(k, k)`` array or tensor (``k`` odd) shared by every pixel (equivariant), or
                ``(Hq, Wq, k, k)``, one per query pixel (position-dependent); boolean (True: the element counts)
                or real non-negative weights (the squared distance becomes ``sum w (x - a q)^2`` over the
                elements and channels; 0 leaves an element out); every mask's centre must count. ``k`` may then
                be None (the mask's size) or must equal it. The key set stays that of the ``k x k`` frame (for
                boundary-aware ELS, the padding signature at size ``k``), so a mask of ones is the square machine.
                None (default): the square patch.
"""
BACKEND_ARG = """\
            backend: this call's engine, overriding the machine's: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``
                or ``"torch"``; None (default) keeps the machine's.
"""


class _Call(NamedTuple):
    """One call's inputs, made ready alike for :meth:`Machine.denoise` and :meth:`Machine.denoise_ks` (see
    :meth:`Machine._prepare_call`)."""

    is_numpy: bool  # the query came as numpy (the result goes back as numpy)
    xt: torch.Tensor  # the query, (B, C, Hq, Wq)
    ks: list  # the effective patch sizes, one per size asked for
    a: torch.Tensor  # the coefficients of the call's times (Machine.coefficients)
    inv_2b2: torch.Tensor
    t_check: object
    lab: object  # the query labels as a tensor, or None
    name: str  # the resolved engine
    train: torch.Tensor  # the training images in the query's dtype, on the engine's device
    max_memory: int  # the op's byte limit (0: none)


def traced_name(t: float, key) -> str:
    """The attribute through which a graph being traced by ``torch.compile`` reads a machine's constant of time
    ``t`` and ``key`` (a mask, a table), set while tracing: one name per constant, as dynamo reads an attribute it
    has not seen from the object itself (a dict it has seen would be its own copy, without the new entry)."""
    return "_traced_" + float(t).hex().replace(".", "_").replace("-", "m").replace("+", "p") + f"_{key}".replace(
        ".", "_").replace("-", "m")


def docstring(text: str):
    """Decorator: ``text`` as the function's docstring (for docstrings built from shared argument text)."""

    def set_doc(fn):
        fn.__doc__ = text
        return fn

    return set_doc


class Machine:
    __doc__ = """Common machinery of the machines: training set, labels, schedule, backend choice.

    Use :class:`IS`, :class:`LS` or :class:`ELS`; they take the same arguments (ELS two more).

    Args:
""" + DATA_ARGS + SOURCE_ARGS + ENGINE_ARGS

    local = True
    rule: Optional[str] = None  # the key-set rule of a local machine (machines/keysets.py)
    soft: Optional[float] = None  # LS and ELS: a Gaussian window of width soft * k instead of the square patch
    # whether a call takes the training images in the query's dtype on the engine's device (train_as, made once);
    # False for a machine that reads them as stored (SmoothedCFDM): a call's `train` is then None
    converts_images = True
    has_provenance = True  # whether denoise(..., return_provenance=True) has an answer (SmoothedCFDM: no)

    @property
    def parameter(self) -> Optional[str]:
        """The per-call parameter a per-step schedule sets (MachineDenoiser, calibrate): ``"k"``, the (odd) patch
        size, for the local machines; None for a machine without one (IS, Wiener); PCA-locality and PSPC-Flex:
        ``"threshold"``; PSPC-Square: ``"p"``, a patch size that may be even."""
        return "k" if self.local else None

    @staticmethod
    def _check_soft(soft) -> Optional[float]:
        if soft is None:
            return None
        if isinstance(soft, bool) or not isinstance(soft, numbers.Real) or not 0 < float(soft) < np.inf:
            raise ValueError(f"soft must be None or a finite number > 0 (the Gaussian's width over the patch size), "
                             f"got {soft!r}")
        return float(soft)

    def __init__(self, images, labels=None, *, xflip: bool = False, schedule: ScheduleLike = "cosine_legacy",
                 backend: str = "auto", n_threads: int = 0, max_memory: Optional[int] = None):
        check_cuda_inputs(images=images, labels=labels)
        self.images = to_tensor(images, "images").contiguous()
        if self.images.device.type != "cpu":
            self.images = self.images.cpu()
        elif not xflip:  # a copy of its own: a caller changing its array later must not change this machine
            # (its engines keep converted copies: they would disagree)
            self.images = self.images.clone()
        if not isinstance(xflip, bool):
            raise TypeError(f"xflip must be True or False, got {xflip!r}")
        n_given = int(self.images.shape[0])
        labels = None if labels is None else to_labels(labels, n_given)
        self.xflip = xflip
        if xflip:  # the source: the images, then their mirrors
            self.images = torch.cat([self.images, self.images.flip(-1)]).contiguous()
            labels = None if labels is None else np.concatenate([labels, labels])
        self.N, self.C, self.H, self.W = self.images.shape
        self.labels = labels
        self.label_index = ops.LabelIndex.from_labels(self.labels)
        self._label_tensors = self.label_index.tensors()
        self.schedule = get_schedule(schedule)
        if backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
        self.backend = backend
        self.n_threads = int(n_threads)
        self.max_memory = check_max_memory(max_memory)
        self._train_cache = {}
        self._digest = None

    # ----- public API ----------------------------------------------------------------------
    @docstring("""Posterior-mean estimate ``x0_hat`` of the clean images (differentiable in ``x`` and ``t``).

        Args:
""" + CALL_ARGS + """\
            return_provenance: also return a :class:`Provenance` of the winning keys (default False).
""" + BACKEND_ARG + PATCH_MASK_ARG + """\
            pixels: local machines only: a boolean mask ``(Hq, Wq)`` or ``(B, Hq, Wq)``, numpy or torch; only
                the pixels it marks (in any query image) are computed, every other output pixel is 0. The
                work shrinks in proportion (used by :class:`patchmosaic.IndexedDenoiser` for the pixels whose
                index bound is too loose). None (default): every pixel.

        Returns:
            ``x0_hat`` with the shape and dtype of ``x``: a torch tensor on ``x``'s device for torch input, a
            numpy array for numpy input; with ``return_provenance``, the pair ``(x0_hat, provenance)``.

        Raises:
            ValueError or TypeError naming a bad argument, :class:`patchmosaic.ResourceError` for a call that
            would need more than ``max_memory``, RuntimeError for CUDA input on a torch without CUDA: all
            before any work.
        """)
    def denoise(self, x, t, k: Optional[int] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None, pixels=None, patch_mask=None):
        check_cuda_inputs(x=x, t=t, labels=labels, pixels=pixels)
        weights, k = self._patch_mask(patch_mask, k)
        asked = k
        is_numpy, xt, (k,), a, inv_2b2, t_check, lab, name, train, max_memory = \
            self._prepare_call(x, t, [k], labels, backend)
        B, C, Hq, Wq = xt.shape
        lv, lp, li = self._label_tensors
        if self.local:
            if weights is not None:
                weights = crop_patch_mask(weights, k)
            elif self.soft is not None:
                # the width from the size asked for: a k cut to its equivalent size (effective_k) keeps its
                # Gaussian, cropped (the elements cut off lie outside every image)
                weights = gaussian_mask(k, self.soft * check_k(asked, self.H, self.W))
            out, key, share = self._local_forward(train, xt, a, inv_2b2, t_check, lab, k, weights,
                                                  self._pixel_mask(pixels, B, Hq, Wq), return_provenance, name,
                                                  max_memory)
        else:
            if pixels is not None:
                raise ValueError("pixels= selects query pixels of a local machine; the IS machine has none")
            out, _, key, share = ops.ideal_softmax(train, xt, a, inv_2b2, t_check, lab, lv, lp, li, return_provenance,
                                                   name, self.n_threads, max_memory)
        result = out.detach().numpy() if is_numpy else out
        if not return_provenance:
            return result
        return result, self._provenance(key, share, is_numpy)

    def _local_forward(self, train, xt, a, inv_2b2, t_check, lab, k: int, weights, pixels, provenance: bool, name: str,
                       max_memory: int):
        """A local machine's op call: ``(out, arg_key, arg_share)`` with provenance per pixel ``(B, Hq, Wq)`` (empty
        without). Here the softmax over the machine's key set (local_softmax); same-position machines compute
        theirs on the same-position engine (machines/same_position.py)."""
        classes = self.call_classes(xt.shape[2], xt.shape[3], k, pixels)
        lv, lp, li = self._label_tensors
        out, _, key, share = ops.local_softmax(train, xt, a, inv_2b2, t_check, lab, lv, lp, li, *classes, k, provenance,
                                               name, self.n_threads, max_memory, weights)
        return out, key, share

    def denoise_ks(self, x, t, ks: Sequence[int], labels=None, *, backend: Optional[str] = None):
        """Posterior-mean estimates ``x0_hat`` at several patch sizes on the same noisy images, in one pass on
        the compiled engines, CPU and CUDA (a local machine's calibration sweep). ``out[j]`` equals ``denoise(x, t, ks[j], labels)``
        to float rounding. Forward only: not differentiable, no provenance.

        Args:
            x: noisy images ``x_t`` ``(B, C, Hq, Wq)``, float32 or float64, numpy or torch, as for
                :meth:`denoise`.
            t: diffusion time in ``(0, 1]``: a float, or one per image as a ``(B,)`` array or tensor.
            ks: the patch sizes, odd positive integers in strictly increasing order (1 to 32 of them).
            labels: ``(B,)`` integer class labels, one int for all, or None (default), as for :meth:`denoise`.
            backend: this call's engine, overriding the machine's: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``
                or ``"torch"``; None (default) keeps the machine's. The CPU and CUDA engines compute all sizes in one
                pass; the torch reference runs one :meth:`denoise` per size.

        Returns:
            ``(K, B, C, Hq, Wq)`` with the dtype of ``x``, ``K = len(ks)``: a torch tensor for torch input, a
            numpy array for numpy input.

        Raises:
            ValueError or TypeError naming a bad argument (an empty, unsorted or repeated ``ks``, an even size,
            an IS machine), :class:`patchmosaic.ResourceError` for a call that would need more than
            ``max_memory``: all before any work.
        """
        check_cuda_inputs(x=x, t=t, labels=labels)
        if not self.local:
            raise ValueError("denoise_ks sweeps patch sizes; the IS machine has none (use denoise)")
        ks = check_sweep(ks, self.H, self.W)
        if self.soft is not None:  # a soft window: one call per size (the one-pass sweep takes square patches)
            with torch.no_grad():
                outs = [torch.as_tensor(self.denoise(x, t, k, labels, backend=backend)) for k in ks]
            return torch.stack(outs).numpy() if isinstance(x, np.ndarray) else torch.stack(outs)
        is_numpy, xt, eff, a, inv_2b2, t_check, lab, name, train, max_memory = \
            self._prepare_call(x, t, ks, labels, backend)
        distinct = sorted(set(eff))  # eff: sizes past the zero-padding limit compute as the limit
        lv, lp, li = self._label_tensors
        multi = self.multi_keyset(xt.shape[2], xt.shape[3], distinct)
        with torch.no_grad():
            out = ops.local_softmax_ks(train, xt.detach(), a.detach(), inv_2b2.detach(),
                                       None if t_check is None else t_check.detach(), lab, lv, lp, li, multi, name,
                                       self.n_threads, max_memory)
        if distinct != eff:
            out = out[torch.as_tensor([distinct.index(k) for k in eff])]
        return out.numpy() if is_numpy else out

    @docstring("""Noise estimate ``eps = (x - a x0_hat) / b`` (spec section 1; ``a = sqrt(alpha_bar(t))``,
        ``b = sqrt(1 - alpha_bar(t))``), differentiable in ``x`` and ``t``.

        Args:
""" + CALL_ARGS + BACKEND_ARG + PATCH_MASK_ARG + """
        Returns:
            ``eps`` with the shape, dtype and array type (numpy or torch) of ``x``.
        """)
    def eps(self, x, t, k: Optional[int] = None, labels=None, *, backend: Optional[str] = None, patch_mask=None):
        return self._transform(x, t, k, labels, backend, lambda x, x0, a, b2: (x - a * x0) / torch.sqrt(b2),
                               patch_mask)

    @docstring("""Score ``(a x0_hat - x) / b^2 = -eps / b`` (spec section 1), the gradient of the log-density
        of the noised data at ``x``; differentiable in ``x`` and ``t``.

        Args:
""" + CALL_ARGS + BACKEND_ARG + PATCH_MASK_ARG + """
        Returns:
            the score with the shape, dtype and array type (numpy or torch) of ``x``.
        """)
    def score(self, x, t, k: Optional[int] = None, labels=None, *, backend: Optional[str] = None, patch_mask=None):
        return self._transform(x, t, k, labels, backend, lambda x, x0, a, b2: (a * x0 - x) / b2, patch_mask)

    @docstring("""The machine's Jacobian at one output pixel: ``J[b, c_out, c_in, i, j] = d x0_hat[b, c_out,
        pixel] / d x[b, c_in, i, j]`` (each output depends on its own query image only). For a local machine it
        is zero outside the ``k x k`` patch around ``pixel`` (its locality): the field a locality study plots
        for a trained network. One backward pass per output channel.

        Args:
""" + CALL_ARGS + """\
            pixel: ``(row, col)`` of the output pixel, inside the ``Hq x Wq`` query (default ``(0, 0)``).
""" + BACKEND_ARG + PATCH_MASK_ARG + """
        Returns:
            ``J`` of shape ``(B, C, C, Hq, Wq)``, numpy for numpy ``x``, else a torch tensor.
        """)
    def sensitivity(self, x, t, k: Optional[int] = None, pixel: Sequence[int] = (0, 0), labels=None, *,
                    backend: Optional[str] = None, patch_mask=None):
        check_cuda_inputs(x=x, t=t, labels=labels)
        is_numpy = isinstance(x, np.ndarray)
        xt = self._query(x).detach().requires_grad_(True)
        i, j = (int(v) for v in pixel)
        B, C, Hq, Wq = xt.shape
        if not (0 <= i < Hq and 0 <= j < Wq):
            raise ValueError(f"pixel {tuple(pixel)} lies outside the {Hq}x{Wq} query")
        with torch.enable_grad():
            kw = {} if patch_mask is None else {"patch_mask": patch_mask}
            out = self.denoise(xt, t, k, labels, backend=backend, **kw)
            rows = []
            for c in range(C):
                g = torch.zeros_like(out)
                g[:, c, i, j] = 1
                (gx,) = torch.autograd.grad(out, xt, g, retain_graph=c < C - 1)
                rows.append(gx)
        jac = torch.stack(rows, 1)
        return jac.numpy() if is_numpy else jac

    def coefficients(self, t, B: int, device=None):
        """``(a, inv_2b2, t_check)`` of a call: ``a = sqrt(alpha_bar(t))`` and ``1 / (2 (1 - alpha_bar))`` as
        float64 ``(B,)`` tensors, differentiable in ``t`` when ``t`` is a tensor; ``t_check`` is the time
        tensor whose range the op still has to check (None when ``t`` was a float, checked here)."""
        a, b2, t_check = self._a_b2(t, B, device)
        return a, 0.5 / b2, t_check

    @staticmethod
    def call_times(t, B: int) -> list:
        """Every query image's time of a call as a Python float (one per image; ``t`` a float, or an array or tensor
        of one or ``B`` times), for machines that need the times themselves (a mask or a seed per time); each checked
        to lie in (0, 1] (a NaN among a tensor's times would otherwise match no time of its own)."""
        if isinstance(t, numbers.Real) and not isinstance(t, (bool, np.ndarray)):
            return [concrete(t)] * B
        if torch.compiler.is_compiling():
            raise TypeError("this machine under torch.compile takes t as a Python float: it chooses its "
                            "neighbourhood (or draws) by the value of t, which a compiled graph cannot read from a "
                            "tensor or an array (pass the float; a graph is compiled per time)")
        if torch.is_tensor(t):
            v = torch.from_numpy(constant(t).astype(np.float64).reshape(-1))
        else:
            v = torch.as_tensor(np.asarray(t, dtype=np.float64).reshape(-1))
        return [check_time(float(x)) for x in (v.expand(B) if v.numel() == 1 else v)]

    def _a_b2(self, t, B: int, device=None):
        device = torch.device("cpu") if device is None else device
        if isinstance(t, numbers.Real) and not isinstance(t, bool) and not isinstance(t, np.ndarray):
            tf = check_time(t)
            a, b2 = self.schedule.scalar_coefficients(tf)
            if not b2 > 0:
                raise ValueError(f"the schedule gives alpha_bar(t) = 1 at t = {tf}: no noise to remove")
            full = dict(dtype=torch.float64, device=device)
            return torch.full((B,), a, **full), torch.full((B,), b2, **full), None
        if isinstance(t, (bool, str)) or (torch.is_tensor(t) and t.dtype == torch.bool):
            raise TypeError(f"t must be a float in (0, 1] or an array of them, got {t!r}")
        if torch.is_tensor(t):
            if t.is_complex() or (not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64)):
                raise TypeError(f"t must be a real float tensor, got {t.dtype}")
            tt = t.to(device=device, dtype=torch.float64)
        else:
            arr = np.asarray(t)
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"t must be a float in (0, 1] or an array of them, got dtype {arr.dtype}")
            tt = torch.as_tensor(arr.astype(np.float64), device=device)
        if tt.dim() == 0:
            tt = tt.expand(B)
        if tt.shape != (B,):
            raise ValueError(f"t must be a float or have shape ({B},), got shape {tuple(tt.shape)}")
        a, b2 = self.schedule.torch_coefficients(tt)
        return a, b2, tt

    def check_canvas(self, Hq: int, Wq: int, k: Optional[int] = None) -> None:
        """Raise a ValueError unless this machine can denoise ``Hq x Wq`` queries with patch size ``k``
        (e.g. a padding signature of the canvas that no training patch has). Cheap; cached."""
        self._check_canvas(int(Hq), int(Wq))
        if self.local:
            self.keyset(int(Hq), int(Wq), k)

    def check_labels(self, labels, B: int) -> None:
        """Raise a ValueError unless ``labels`` (None or B labels) can be served by this machine."""
        lab = self._query_labels(labels, B)
        if lab is not None:
            ops.groups(lab, *self._label_tensors, self.N, B)

    def check_request(self, shape, dtype=torch.float32, backend: str = "cpu", provenance: bool = False,
                      k: Optional[int] = None) -> None:
        """Raise :class:`patchmosaic.ResourceError` if a call on a batch of ``shape`` with patch size ``k``
        would need more working memory than allowed -- from the shape alone, before anything is allocated."""
        from ..ops.checks import local_bytes

        shape = tuple(int(v) for v in shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"a batch shape is (B, C, H, W) with positive sizes, got {shape}")
        item = torch.empty((), dtype=dtype).element_size()
        if self.local:
            kk = self.effective_k(3 if k is None else k, shape[2], shape[3])
            need = local_bytes(shape, dtype, self.images, kk, backend, provenance, self.n_threads)
        else:
            need = 3 * int(np.prod(shape)) * item + shape[0] * self.N * 8
        check_memory(need, f"{type(self).__name__}.denoise on a batch of shape {shape}", self.max_memory)

    def keyset(self, Hq: int, Wq: int, k: int) -> "ops.KeySet":
        """The key set of a local machine for ``Hq x Wq`` queries and patch size ``k`` (classes of query
        pixels and their key positions: the table its op takes, built by the machine's rule, machines/keysets.py)."""
        if not self.local:
            raise ValueError("the IS machine has no key set of patches")
        self._check_canvas(Hq, Wq)
        return keysets.keyset(self.rule, int(Hq), int(Wq), self.H, self.W, self.effective_k(k, Hq, Wq))

    def multi_keyset(self, Hq: int, Wq: int, ks: Sequence[int]) -> "ops.MultiKeySet":
        """The key sets of a local machine at the patch sizes ``ks`` (strictly increasing, as
        :meth:`effective_k` gives them) as one table, for the one-pass calibration sweep (:meth:`denoise_ks`)."""
        if not self.local:
            raise ValueError("the IS machine has no key set of patches")
        return keysets.multi_keyset(self.rule, int(Hq), int(Wq), self.H, self.W, tuple(int(k) for k in ks))

    def call_classes(self, Hq, Wq, k: int, pixels: Optional[torch.Tensor] = None):
        """The key set of a call on ``Hq x Wq`` queries at the effective patch size ``k`` as the op takes it:
        ``(query_class, key_class, query_pad, key_pad)`` (machines/keysets.py, ``class_maps``), computed with torch
        operations (inside the graph under ``torch.compile``); the pixels where the boolean ``(Hq, Wq)`` tensor
        ``pixels`` is false get class -1 (not computed). Outside ``torch.compile`` the rule is checked first, so a
        canvas it cannot serve is named in its terms (e.g. the padding signature no training patch has)."""
        Hq, Wq = operator.index(Hq), operator.index(Wq)
        if not torch.compiler.is_compiling():
            self.keyset(Hq, Wq, k)  # cached; raises the rule's own message
        qc, kc, qpad, kpad = keysets.class_maps(self.rule, Hq, Wq, self.H, self.W, k)
        if pixels is not None:
            qc = torch.where(pixels.reshape(-1), qc, torch.full_like(qc, -1))
        return qc, kc, qpad, kpad

    @property
    def data_digest(self) -> str:
        """SHA-256 of the training images' bytes and labels (computed once, then cached)."""
        if self._digest is None:
            from ..io.runstate import array_digest

            self._digest = array_digest(self.images, self.labels)
        return self._digest

    def describe(self) -> dict:
        """Everything about the machine that changes its results: kind, key-set rule, boundary, training
        data (shape and content hash, mirrors included) and noise schedule."""
        return {"type": type(self).__name__, "rule": self.rule, "boundary": getattr(self, "boundary", None),
                "wrapped": getattr(self, "wrapped", None), "train_shape": list(self.images.shape),
                "data": self.data_digest, "schedule": self.schedule.describe(),
                **({"xflip": True} if getattr(self, "xflip", False) else {}),
                **({} if self.soft is None else {"soft": self.soft})}

    def source_image(self, n):
        """``(index, mirrored)`` of source image ``n`` (a provenance image index; int or array): the training
        image it comes from and whether it is that image's mirror (``xflip=True``)."""
        n = np.asarray(n)
        half = self.N // 2 if getattr(self, "xflip", False) else self.N
        return np.where(n >= half, n - half, n), n >= half

    def images_by_label(self) -> dict:
        """``{label: training image indices}`` (``{None: all}`` for a machine without labels)."""
        if self.labels is None:
            return {None: np.arange(self.N)}
        return self.label_index.by_label()

    def train_as(self, dtype, device) -> torch.Tensor:
        """The training images in ``dtype`` on ``device`` (converted once, then cached)."""
        key = (dtype, str(device))
        if key not in self._train_cache:
            with outside_transforms():  # a cached constant: no torch.func transform may wrap it
                self._train_cache[key] = self.images.to(device=device, dtype=dtype).contiguous()
        return self._train_cache[key]

    # ----- what each machine defines --------------------------------------------------------
    def _check_canvas(self, Hq: int, Wq: int) -> None:
        if (Hq, Wq) != (self.H, self.W):
            raise ValueError(
                f"{type(self).__name__} needs queries of the training size {self.H}x{self.W}, got {Hq}x{Wq}"
            )

    # ----- helpers -------------------------------------------------------------------------
    def _prepare_call(self, x, t, ks: Sequence, labels, backend: Optional[str]) -> _Call:
        """The preparation :meth:`denoise` and :meth:`denoise_ks` share, with its checks in their order: the
        query, the effective patch sizes of ``ks`` (an entry None: the machine's), the coefficients of ``t``, the
        labels, the engine, the training images as that engine takes them, and the memory limit."""
        is_numpy = isinstance(x, np.ndarray)
        xt = self._query(x)
        B, C, Hq, Wq = xt.shape
        eff = [self.effective_k(k, Hq, Wq) for k in ks]
        a, inv_2b2, t_check = self.coefficients(t, B, xt.device)
        lab = self._query_labels(labels, B)
        name = self._resolve_backend(xt, backend)
        train = None
        if self.converts_images:
            train = self.train_as(xt.dtype, xt.device if name in ("torch", "cuda", "triton") else torch.device("cpu"))
        max_memory = 0 if self.max_memory is None else int(self.max_memory)
        return _Call(is_numpy, xt, eff, a, inv_2b2, t_check, lab, name, train, max_memory)

    def _query(self, x) -> torch.Tensor:
        xt = as_batch(x, "x")
        if xt.shape[1] != self.C:
            raise ValueError(f"x has {xt.shape[1]} channels but the training images have {self.C} "
                             f"(x shape {tuple(xt.shape)})")
        self._check_canvas(xt.shape[2], xt.shape[3])
        return xt

    def effective_k(self, k, Hq: int, Wq: int) -> int:
        """The patch size a call computes with (0 for IS). With zero padding on query and key patches (LS,
        boundary-aware ELS) a patch larger than ``2 max(H, W, Hq, Wq) - 1`` only adds padding zeros to both,
        so such a ``k`` is computed as that size (the same result, exactly); a circular patch larger than
        ``2 max(...) + 1`` would wrap around the image more than once and is refused."""
        if not self.local:
            if k is not None:
                check_k(k, self.H, self.W)
            return 0
        k = check_k(k, self.H, self.W)
        size = max(int(Hq), int(Wq), self.H, self.W)
        if self.rule in ("ls", "els_zeros"):
            return min(k, 2 * size - 1)
        if k > 2 * size + 1:
            raise ValueError(f"patch size k={k} wraps around the images more than once ({Hq}x{Wq} queries, "
                             f"{self.H}x{self.W} training images): use k <= {2 * size + 1}")
        return k

    def _query_labels(self, labels, B: int) -> Optional[torch.Tensor]:
        if labels is None:
            return None
        if self.labels is None:
            raise ValueError("labels were given but this machine was built without training labels")
        if isinstance(labels, np.ndarray) and (torch.compiler.is_compiling() or labels.dtype.kind in "iu"):
            labels = torch.from_numpy(labels)  # (as a tensor: torch.compile traces it without a break)
        elif isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
            return torch.full((B,), int(labels), dtype=torch.int64)
        elif isinstance(labels, (list, tuple)) and len(labels) == B and \
                all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in labels):
            return torch.tensor([int(v) for v in labels], dtype=torch.int64)
        if torch.is_tensor(labels):
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
            if labels.dim() == 0:
                labels = labels.expand(B)
            if labels.shape != (B,):
                raise ValueError(f"labels must have shape ({B},), got {tuple(labels.shape)}")
            return labels.to(torch.int64)
        return torch.from_numpy(to_labels(labels, B))

    def _pixel_mask(self, pixels, B: int, Hq: int, Wq: int) -> Optional[torch.Tensor]:
        if pixels is None:
            return None
        mask = torch.as_tensor(pixels.detach().cpu() if torch.is_tensor(pixels) else np.asarray(pixels))
        if mask.dtype != torch.bool or mask.shape[-2:] != (Hq, Wq) or mask.dim() not in (2, 3) or \
                (mask.dim() == 3 and mask.shape[0] != B):
            raise ValueError(f"pixels must be a boolean mask of shape ({Hq}, {Wq}) or ({B}, {Hq}, {Wq}), got "
                             f"{tuple(mask.shape)} {mask.dtype}")
        return mask.reshape(-1, Hq, Wq).any(0)

    def _resolve_backend(self, xt: torch.Tensor, override: Optional[str]) -> str:
        name = override or self.backend
        if name not in ops.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {ops.BACKENDS}")
        if name == "cpu" and xt.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU inputs, got a tensor on {xt.device}; use 'auto' or 'torch'")
        if name == "cuda":
            from ..ops import engines

            if not engines.cuda_available():
                raise RuntimeError(engines.cuda_unavailable_reason())
            if xt.device.type != engines.cuda_device_type():
                raise ValueError(f"backend='cuda' needs CUDA inputs, got a tensor on {xt.device}; move it with "
                                 ".cuda() or use 'auto'")
        return name

    def _patch_mask(self, patch_mask, k):
        """``(weights, k)``: the checked neighbourhood mask of a call (float64 ``(K, K)``, or None) and its
        patch size (``k``, or the mask's size K when ``k`` is None); a ValueError when they disagree."""
        if patch_mask is None:
            return None, k
        if not self.local:
            raise ValueError("patch_mask= is a local machine's neighbourhood; the IS machine has none")
        if self.soft is not None:
            raise ValueError(f"patch_mask= and a soft machine (soft={self.soft}): its neighbourhood is its Gaussian "
                             "window; build it without soft to give a mask of your own")
        weights = check_patch_mask(patch_mask)
        K = int(weights.shape[-1])
        if k is None:
            return weights, K
        if check_k(k, self.H, self.W) != K:
            raise ValueError(f"patch_mask is {K}x{K} but k={k}: give k={K} or k=None (the mask's size)")
        return weights, K

    def _transform(self, x, t, k, labels, backend, fn, patch_mask=None):
        check_cuda_inputs(x=x, t=t, labels=labels)
        is_numpy = isinstance(x, np.ndarray)
        xt = self._query(x)
        kw = {} if patch_mask is None else {"patch_mask": patch_mask}
        x0 = self.denoise(xt, t, k, labels, backend=backend, **kw)
        B = xt.shape[0]
        a, b2, _ = self._a_b2(t, B, xt.device)
        shape = (B, 1, 1, 1)
        a = a.to(xt.dtype).reshape(shape)
        b2 = b2.to(xt.dtype).reshape(shape)
        out = fn(xt, x0, a, b2)
        return out.detach().numpy() if is_numpy else out

    def _provenance(self, key, share, is_numpy: bool) -> Provenance:
        if self.local:
            n, pos = key // (self.H * self.W), key % (self.H * self.W)
            fields = (n, pos // self.W, pos % self.W, share)
        else:
            fields = (key, None, None, share)
        if is_numpy:
            fields = tuple(None if f is None else f.detach().cpu().numpy() for f in fields)
        return Provenance(*fields)

    def __repr__(self):
        lab = "" if self.labels is None else f", {len(self.label_index.values)} labels"
        return (f"{type(self).__name__}({self.N} images {self.C}x{self.H}x{self.W}{lab}, "
                f"schedule={self.schedule.name}, backend={self.backend})")


__all__ = ["Machine", "Provenance", "ResourceError"]
