"""The four exact score machines of spec section 2: IS, LS, ELS (periodic) and boundary-aware ELS.

Each machine holds a training set and computes, for a noisy batch ``x`` at time ``t``, the
posterior-mean estimate ``x0_hat`` (and from it ``eps`` and the ``score``). Inputs are validated
before any work; the arithmetic runs in a backend (``backends/``): the compiled CPU engine, the
plain PyTorch implementation (also the float64 oracle), or CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import keysets
from .backends import BACKENDS, Groups, get_backend
from .schedules import ScheduleLike, get_schedule
from .validation import check_k, check_memory, check_t, to_labels, to_tensor


@dataclass
class Provenance:
    """Which training key won each output pixel: the highest-weight key and its share of the weight.

    ``image``, ``row``, ``col`` and ``share`` have shape ``(B, Hq, Wq)`` for the local machines
    (``row``/``col``: the key's centre in its training image) and ``(B,)`` for IS (``row``/``col`` None).
    Arrays are of the same kind (numpy or torch) as the query.
    """

    image: object
    row: object
    col: object
    share: object


class Machine:
    """Common machinery: training set, labels, schedule, backend choice, validation."""

    local = True

    def __init__(self, images, labels=None, *, schedule: ScheduleLike = "cosine_legacy", backend: str = "auto",
                 n_threads: int = 0, max_memory: Optional[int] = None):
        self.images = to_tensor(images, "images").cpu().contiguous()
        self.N, self.C, self.H, self.W = self.images.shape
        self.labels = None if labels is None else to_labels(labels, self.N)
        self._by_label = {}
        if self.labels is not None:
            for y in np.unique(self.labels):
                self._by_label[int(y)] = np.nonzero(self.labels == y)[0].astype(np.int32)
        self.schedule = get_schedule(schedule)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend
        self.n_threads = int(n_threads)
        self.max_memory = max_memory
        self._train_cache = {}
        self._index_cache = {}  # (k, canvas, index settings) -> PatchIndex, for denoise_approx
        self._keyset_cache = {}

    # ----- what each machine defines -------------------------------------------------------
    def _keyset(self, Hq: int, Wq: int, k: int) -> keysets.KeySet:
        raise NotImplementedError

    def _check_canvas(self, Hq: int, Wq: int) -> None:
        if (Hq, Wq) != (self.H, self.W):
            raise ValueError(
                f"{type(self).__name__} needs queries of the training size {self.H}x{self.W}, got {Hq}x{Wq}"
            )

    # ----- public API ----------------------------------------------------------------------
    def denoise(self, x, t, k: Optional[int] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None, pixels=None):
        """Posterior-mean estimate ``x0_hat`` of the clean images.

        Args:
            x: noisy images ``(B, C, Hq, Wq)``, float32/float64, numpy or torch (any device for the
               torch backend).
            t: float or ``(B,)`` array of times in ``(0, 1]``.
            k: odd patch size (required by the local machines, ignored by IS).
            labels: ``(B,)`` integer labels: each query uses only the training images of its label.
            return_provenance: also return a :class:`Provenance` of the winning keys.
            backend: override the machine's backend for this call.
            pixels: local machines only: a boolean mask ``(Hq, Wq)`` or ``(B, Hq, Wq)``; only the pixels
               it marks (in any query image) are computed, every other output pixel is 0. The work
               shrinks in proportion (used by :class:`patchmosaic.IndexedDenoiser` for the pixels whose
               index bound is too loose).
        Returns:
            ``x0_hat`` with the shape, dtype and array type of ``x``; with provenance, a pair.
        """
        is_numpy = isinstance(x, np.ndarray)
        xt = to_tensor(x, "x")
        B, C, Hq, Wq = xt.shape
        if C != self.C:
            raise ValueError(f"x has {C} channels but the training images have {self.C} (x shape {tuple(xt.shape)})")
        self._check_canvas(Hq, Wq)
        tt = check_t(t, B)
        if self.local:
            k = check_k(k, self.H, self.W)
        elif k is not None:
            check_k(k, self.H, self.W)
        groups = self._groups(labels, B)
        a, b2 = self.schedule.coefficients(tt)
        if np.any(b2 <= 0):
            raise ValueError(f"the schedule gives alpha_bar(t) = 1 at t = {tt[b2 <= 0][0]}: no noise to remove")
        inv_2b2 = 0.5 / b2
        name = self._resolve_backend(xt, backend)
        keyset = self._keyset(Hq, Wq, k) if self.local else None
        mask = None
        if pixels is not None:
            if not self.local:
                raise ValueError("pixels= selects query pixels of a local machine; the IS machine has none")
            mask = torch.as_tensor(np.asarray(pixels.cpu() if torch.is_tensor(pixels) else pixels))
            if mask.dtype != torch.bool or mask.shape[-2:] != (Hq, Wq) or mask.dim() not in (2, 3) or \
                    (mask.dim() == 3 and mask.shape[0] != B):
                raise ValueError(f"pixels must be a boolean mask of shape ({Hq}, {Wq}) or ({B}, {Hq}, {Wq}), got "
                                 f"{tuple(mask.shape)} {mask.dtype}")
            mask = mask.reshape(-1, Hq, Wq).any(0)
            keyset = keyset.restricted(mask.numpy())
        self._check_request_memory(xt, name, return_provenance)
        engine = get_backend(name)
        train = self._train_as(xt.dtype, xt.device if name in ("torch", "cuda") else torch.device("cpu"))
        query = xt.contiguous() if name != "cpu" else xt.cpu().contiguous()
        if self.local:
            out, key, share = engine.local(train, query, k, keyset, a, inv_2b2, groups, return_provenance,
                                           self.n_threads)
        else:
            out, key, share = engine.ideal(train, query, a, inv_2b2, groups, return_provenance, self.n_threads)
        if mask is not None:
            out[:, :, ~mask.to(out.device)] = 0
            if key is not None:
                key[:, ~mask.to(key.device)] = -1
                share[:, ~mask.to(share.device)] = 0
        out = out.to(xt.device)
        result = out.numpy() if is_numpy else out
        if not return_provenance:
            return result
        return result, self._provenance(key, share, is_numpy, xt.device)

    def eps(self, x, t, k: Optional[int] = None, labels=None, **kw):
        """Noise estimate ``(x_t - a x0_hat) / b`` (spec section 1)."""
        return self._transform(x, t, k, labels, kw, lambda x, x0, a, b2: (x - a * x0) / np.sqrt(b2))

    def score(self, x, t, k: Optional[int] = None, labels=None, **kw):
        """Score ``(a x0_hat - x_t) / b^2`` (spec section 1)."""
        return self._transform(x, t, k, labels, kw, lambda x, x0, a, b2: (a * x0 - x) / b2)

    # ----- helpers -------------------------------------------------------------------------
    def _transform(self, x, t, k, labels, kw, fn):
        x0 = self.denoise(x, t, k, labels, **kw)
        B = x.shape[0]
        a, b2 = self.schedule.coefficients(check_t(t, B))
        if isinstance(x, np.ndarray):
            return fn(x, x0, a.reshape(B, 1, 1, 1).astype(x.dtype), b2.reshape(B, 1, 1, 1).astype(x.dtype))
        shape = (B, 1, 1, 1)
        at = torch.as_tensor(a, dtype=x.dtype, device=x.device).reshape(shape)
        bt = torch.as_tensor(b2, dtype=x.dtype, device=x.device).reshape(shape)
        return fn(x, x0, at, bt)

    def denoise_approx(self, x, t, k: int, labels=None, *, m: int = 64, **index_kw):
        """Approximate :meth:`denoise` through a FAISS patch index (built on first use per ``k`` and canvas,
        then cached): the softmax over the ``m`` nearest keys per pixel, re-scored exactly. Returns a
        :class:`patchmosaic.patch_index.ApproxResult` with ``x0`` and the per-pixel error ``bound``.
        ``index_kw`` go to :class:`patchmosaic.patch_index.PatchIndex` (``kind``, ``nprobe``, ...)."""
        from .patch_index import PatchIndex

        xt = to_tensor(x, "x")
        key = (int(k), tuple(xt.shape[-2:]), tuple(sorted(index_kw.items())))
        if key not in self._index_cache:
            self._index_cache[key] = PatchIndex(self, int(k), tuple(xt.shape[-2:]), progress=False, **index_kw)
        return self._index_cache[key].denoise(x, t, labels, m)

    def check_canvas(self, Hq: int, Wq: int, k: Optional[int] = None) -> None:
        """Raise a ValueError unless this machine can denoise ``Hq x Wq`` queries with patch size ``k``
        (e.g. a padding signature of the canvas that no training patch has). Cheap; cached."""
        self._check_canvas(int(Hq), int(Wq))
        if self.local:
            self._keyset(int(Hq), int(Wq), check_k(k, self.H, self.W))

    def check_labels(self, labels, B: int) -> None:
        """Raise a ValueError unless ``labels`` (None or B labels) can be served by this machine."""
        self._groups(labels, B)

    def _groups(self, labels, B: int) -> Groups:
        if labels is None:
            return Groups(np.array([0, self.N], np.int64), np.arange(self.N, dtype=np.int32), np.zeros(B, np.int32))
        if self.labels is None:
            raise ValueError("labels were given but this machine was built without training labels")
        lab = to_labels(labels, B)
        uniq, group_of_b = np.unique(lab, return_inverse=True)
        missing = [int(y) for y in uniq if int(y) not in self._by_label]
        if missing:
            raise ValueError(f"label {missing[0]} has no training images (known labels: {sorted(self._by_label)})")
        imgs = [self._by_label[int(y)] for y in uniq]
        ptr = np.zeros(len(imgs) + 1, np.int64)
        ptr[1:] = np.cumsum([len(i) for i in imgs])
        return Groups(ptr, np.concatenate(imgs).astype(np.int32), group_of_b.astype(np.int32))

    def _resolve_backend(self, xt: torch.Tensor, override: Optional[str]) -> str:
        name = override or self.backend
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
        if name == "auto":
            if xt.device.type == "cuda":
                from .backends import cuda

                fits = not self.local or self.C <= cuda.MAX_CHANNELS
                return "cuda" if cuda.available() and fits else "torch"
            return "cpu"
        if name == "cpu" and xt.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU inputs, got a tensor on {xt.device}; use 'auto' or 'torch'")
        if name == "cuda":
            from .backends import cuda

            cuda.require()  # a RuntimeError saying why, where the engine cannot run
            if xt.device.type != cuda.device_type():
                raise ValueError(f"backend='cuda' needs CUDA inputs, got a tensor on {xt.device}; move it with "
                                 ".cuda() or use 'auto'")
        return name

    def _train_as(self, dtype, device) -> torch.Tensor:
        key = (dtype, str(device))
        if key not in self._train_cache:
            self._train_cache[key] = self.images.to(device=device, dtype=dtype).contiguous()
        return self._train_cache[key]

    def _cached_keyset(self, key, build):
        if key not in self._keyset_cache:
            self._keyset_cache[key] = build()
        return self._keyset_cache[key]

    def _check_request_memory(self, xt: torch.Tensor, backend: str, provenance: bool) -> None:
        item = xt.element_size()
        need = 4 * xt.numel() * item  # query copy, output, conversions
        if provenance:
            need += xt.numel() // self.C * (8 + item)
        if self.images.dtype != xt.dtype:
            need += self.images.numel() * item
        if backend == "cpu" and self.local:  # the engine's per-row partial softmax states (double)
            need += 2 * (xt.numel() // self.C) * (self.C + 3) * 8
        if backend == "torch":
            from .backends.torch_ref import _BUDGET

            need += 8 * _BUDGET * item
        check_memory(need, f"{type(self).__name__}.denoise on a batch of shape {tuple(xt.shape)}", self.max_memory)

    def _provenance(self, key, share, is_numpy: bool, device) -> Provenance:
        key = key.to(device)
        share = share.to(device)
        if self.local:
            n, pos = key // (self.H * self.W), key % (self.H * self.W)
            fields = (n, pos // self.W, pos % self.W, share)
        else:
            fields = (key, None, None, share)
        if is_numpy:
            fields = tuple(None if f is None else f.cpu().numpy() for f in fields)
        return Provenance(*fields)

    def __repr__(self):
        lab = "" if self.labels is None else f", {len(self._by_label)} labels"
        return (f"{type(self).__name__}({self.N} images {self.C}x{self.H}x{self.W}{lab}, "
                f"schedule={self.schedule.name}, backend={self.backend})")


class IS(Machine):
    """Ideal score machine (eq. 3-4): a softmax over whole training images. Memorises."""

    local = False


class LS(Machine):
    """Local score machine (eq. 7-8): each pixel attends to the same location of every training image."""

    def _keyset(self, Hq, Wq, k):
        return self._cached_keyset(("ls", Hq, Wq), lambda: keysets.local_keyset(Hq, Wq, self.H, self.W))


class ELS(Machine):
    """Equivariant local score machine.

    ``boundary="zeros"`` (default): the boundary-aware machine (the paper's bbELS, eq. 41) matched to
    zero-padded CNNs; queries may be larger canvases than the training images (padding-signature rule).
    ``boundary="circular"``: the periodic ELS (eq. 9-10); ``wrapped=True`` also includes the wrapped
    training patches (the exact equivariant key set of a circularly padded network).
    """

    def __init__(self, images, labels=None, boundary: str = "zeros", *, wrapped: bool = False, **kw):
        if boundary not in ("zeros", "circular"):
            raise ValueError(f"boundary must be 'zeros' or 'circular', got {boundary!r}")
        if wrapped and boundary != "circular":
            raise ValueError("wrapped=True applies to boundary='circular' only")
        super().__init__(images, labels, **kw)
        self.boundary = boundary
        self.wrapped = bool(wrapped)

    def _check_canvas(self, Hq, Wq):
        pass  # any canvas: the key sets say which sizes work

    def _keyset(self, Hq, Wq, k):
        if self.boundary == "zeros":
            return self._cached_keyset(("zeros", Hq, Wq, k), lambda: keysets.boundary_keyset(Hq, Wq, self.H, self.W, k))
        return self._cached_keyset(
            ("circular", Hq, Wq, k, self.wrapped),
            lambda: keysets.periodic_keyset(Hq, Wq, self.H, self.W, k, self.wrapped),
        )


MACHINE_NAMES = ("els", "ls", "is")


def make_machine(name: str, images, labels=None, *, boundary: str = "zeros", **kw) -> Machine:
    """The machine called ``name`` (``"els"``, ``"ls"`` or ``"is"``; ``boundary`` applies to ELS)."""
    if name == "els":
        return ELS(images, labels, boundary=boundary, **kw)
    if name == "ls":
        return LS(images, labels, **kw)
    if name == "is":
        return IS(images, labels, **kw)
    raise ValueError(f"machine must be one of {MACHINE_NAMES}, got {name!r}")
