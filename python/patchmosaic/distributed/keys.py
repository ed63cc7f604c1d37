"""Key sharding: a machine whose training images are spread over the ranks of a process group.

Each rank holds a slice of the training images (by image: any split, uneven, even empty), runs its partial
softmax with its own fastest engine (the ops' ``stats`` are the partial states' max and sum), and the ranks
exchange the partial states with one ``all_gather`` and merge them in rank order (merge.py). Every rank of the
group ends with the same result, equal to the single-process machine's up to the float32 rounding of the
partial states. Provenance is global: image index = the rank's offset + its local index.

With ``backend="index"`` a rank computes its partial states from a FAISS patch index over its own shard
(patchmosaic.index): the softmax over the ``m`` nearest keys per pixel, re-scored exactly, with a bound on the
weight of the keys it left out; pixels whose bound is too loose are computed exactly on that shard. The bounds
travel with the states and add up in the merge, so every rank ends with the merged result's error bound.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import ops
from ..machines.base import BACKEND_ARG, CALL_ARGS, DATA_ARGS, ENGINE_ARGS, PATCH_MASK_ARG, Machine, docstring
from ..machines.ideal import IS
from ..machines import ELS, LS
from ..ops.checks import check_cuda_inputs
from ..ops.masks import crop_patch_mask
from ..schedules import ScheduleLike, get_schedule
from ..validation import ResourceError, check_max_memory, check_sweep, to_labels
from ..index.bound import bound_from_mass
from ..index.patch_index import INDEX_OPTION_ARGS, KINDS as INDEX_KINDS, PatchIndex
from ..index.vectors import patch_sq_norms
from . import launch
from ..ops.state import SoftmaxState, merge, pack, unpack

KINDS = {"els": ELS, "ls": LS, "is": IS}

# backend="index": what index_options may hold, and the defaults (None: PatchIndex's own default)
INDEX_DEFAULTS = dict(m=64, tol=1e-3, check_pixels=64, max_exact_fraction=0.5, exact_backend="auto", cache_dir=None,
                      kind=None, nlist=None, nprobe=None, pq_m=None, flat_budget=None, min_index_keys=None,
                      merge=None)
_PATCH_INDEX_KEYS = ("kind", "nlist", "nprobe", "pq_m", "flat_budget", "min_index_keys", "merge")


def check_index_options(options) -> dict:
    """``index_options`` of a ``ShardedMachine(..., backend="index")`` checked and completed with the defaults
    (:data:`INDEX_DEFAULTS`); a ValueError or TypeError naming the option otherwise.

    Args:
        options: a dict of index options, or None (every default).
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"index_options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(INDEX_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown index option(s) {unknown}; index_options takes {sorted(INDEX_DEFAULTS)}")
    opts = dict(INDEX_DEFAULTS, **options)

    def whole(name, minimum=1):
        v = opts[name]
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ValueError(f"index option {name} must be an int >= {minimum}, got {v!r}")
        opts[name] = int(v)

    whole("m")
    whole("check_pixels", 0)
    for name in ("nlist", "nprobe", "pq_m", "flat_budget"):
        whole(name)
    whole("min_index_keys", 0)
    for name, hi in (("tol", float("inf")), ("max_exact_fraction", 1.0)):
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 <= v <= hi:
            raise ValueError(f"index option {name} must be a number in [0, {hi}], got {v!r}")
        opts[name] = float(v)
    if opts["kind"] is not None and opts["kind"] not in INDEX_KINDS:
        raise ValueError(f"index option kind must be one of {INDEX_KINDS}, got {opts['kind']!r}")
    if opts["merge"] is not None and not isinstance(opts["merge"], bool):
        raise ValueError(f"index option merge must be True or False, got {opts['merge']!r}")
    if opts["exact_backend"] not in ops.BACKENDS:
        raise ValueError(f"index option exact_backend must be one of {ops.BACKENDS} (the engine of the pixels "
                         f"computed exactly), got {opts['exact_backend']!r}")
    if opts["cache_dir"] is not None and not isinstance(opts["cache_dir"], (str, os.PathLike)):
        raise TypeError(f"index option cache_dir must be a folder path or None, got {opts['cache_dir']!r}")
    return opts


def _value_ranges(images: torch.Tensor, labels) -> dict:
    """``{label: (lo, hi)}`` of the images' values per label, and ``{None: (lo, hi)}`` over all of them."""
    if len(images) == 0:
        return {}
    flat = images.reshape(len(images), -1)
    lo, hi = flat.amin(1).double().numpy(), flat.amax(1).double().numpy()
    out = {None: (float(lo.min()), float(hi.max()))}
    if labels is not None:
        for v in np.unique(labels):
            sel = labels == v
            out[int(v)] = (float(lo[sel].min()), float(hi[sel].max()))
    return out


# the exceptions a rank's failure is raised as on the other ranks (others: RuntimeError), by name
_SHARED_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, IndexError, KeyError, MemoryError,
                                                RuntimeError, ResourceError)}


def error_of(error: Optional[BaseException]):
    """What a rank sends of its failure: None, or its type's name and message."""
    return None if error is None else (type(error).__name__, str(error))


def raise_shared(own: Optional[BaseException], errors: Sequence, what: str) -> None:
    """After an exchange: if any rank failed (``errors[r]`` not None), raise on every rank -- the failing rank
    its own exception, the others the first failing rank's, of the same type where it is a standard one (so a
    bad input is the same ValueError on every rank, not a wait for a rank that left the collectives)."""
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if own is not None:
        raise own
    r, (name, msg) = failed[0]
    cls = _SHARED_ERRORS.get(name, RuntimeError)
    raise cls(f"{msg} (rank {r}, {what}{'' if len(failed) == 1 else f'; also ranks {[f[0] for f in failed[1:]]}'})")


def shard_slice(N: int, rank: int, world: int) -> slice:
    """The contiguous slice of ``N`` items that rank ``rank`` of ``world`` holds: sizes differ by at most one,
    the first ``N % world`` ranks hold one more (a rank may hold none when ``N < world``).

    Args:
        N: number of items.
        rank: this rank, ``0 <= rank < world``.
        world: number of ranks.
    """
    base, extra = divmod(int(N), int(world))
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard(images, labels=None, group=None):
    """This rank's slice of the training images and labels (:func:`shard_slice` over ``group``).

    Args:
        images: all training images ``(N, C, H, W)`` (numpy or torch).
        labels: their ``(N,)`` labels or None (default).
        group: the process group that shares the keys; None (default): the world.

    Returns:
        ``(images[s], labels[s] or None)``.
    """
    sl = shard_slice(len(images), launch.rank(group), launch.world(group))
    return images[sl], (None if labels is None else labels[sl])


class ShardedMachine(Machine):
    __doc__ = """A machine (IS, LS or ELS) over training images spread across the ranks of ``group``.

    Every rank of the group builds it with its own slice of the training images (any split; uneven, and empty
    on some ranks, allowed; :func:`shard` gives an even one) and calls it with the *same* queries; each call
    computes the rank's partial softmax states with its own engine, exchanges them with one ``all_gather`` and
    merges them in rank order, so every rank returns the same result: the single-process machine's over all
    the images, up to float32 rounding of the partial states. Provenance indices are global (the images in
    rank order). Calls are collective: every rank of the group must make them, in the same order. Results
    are not differentiable (the merge runs outside autograd; ``sensitivity`` is refused).

    **The patch index backend** (``backend="index"``; LS and ELS, float32 images and queries on the CPU): each
    rank builds (or, with ``cache_dir``, opens) a :class:`patchmosaic.PatchIndex` over its own shard, one per
    patch size and canvas, retrieves the ``m`` nearest keys of each pixel, re-scores them exactly and leaves the
    softmax over them as its partial state, with the index's bound on the weight of the keys it left out
    (index/bound.py). A pixel whose bound on this shard, ``R eps_r / (1 + eps_r)`` with ``R`` the centres'
    range over *all* the shards (per label), is above ``tol`` is computed exactly on this shard (all of the
    shard's pixels when an inverted-file index fails its retrieval check, or when more than
    ``max_exact_fraction`` of them would be). The left-out masses add up in the merge, so the merged error
    bound of a pixel is ``R left / (s + left)`` over the merged state: at most the largest shard's, hence at
    most ``tol``. It is :attr:`last_bound` after every call, the same on every rank; :attr:`last_index` says
    what this rank did. With ``tol`` small the result is the exact sharded machine's up to float32 rounding.
    The bound is a guarantee for flat indexes and conditional on retrieval for inverted-file ones (as for
    :meth:`patchmosaic.PatchIndex.denoise`). Ranks may choose their engines independently (``"index"`` on
    some, ``"cpu"`` or ``"cuda"`` on others): the exact ones leave no key out. Provenance stays global; where
    identical patches tie across shards computed by different engines (the re-scoring is float64, the engines'
    logits float32), another of the tied keys (the same patch, so the same centre) may win.

    Args:
        machine: ``"els"``, ``"ls"`` or ``"is"``.
""" + DATA_ARGS.replace("training images ``(N, C, H, W)``", "this rank's training images ``(N_r, C, H, W)`` "
                        "(``N_r = 0`` allowed)") + """\
        group: the process group that shares the keys (its ranks hold the slices, in rank order); None
            (default): the world group, or a single process when torch.distributed is not initialised.
        boundary: ELS only: ``"zeros"`` (default) or ``"circular"``.
        wrapped: ELS with ``boundary="circular"`` only: also the wrapped training patches (default False).
""" + ENGINE_ARGS.replace("(the plain PyTorch reference, any device).", "(the plain PyTorch reference, any device), or\n"
                          "            ``\"index\"`` (LS and ELS: a patch index over this rank's shard, see above).") + """\
        index_options: with ``backend="index"`` only: a dict of (all optional) ``m``, the nearest keys retrieved
            per pixel (default 64); ``tol``, the largest error bound (data units, >= 0) of a pixel the index
            serves (default 1e-3); ``check_pixels``, pixels an inverted-file index computes exactly to check its
            retrieval (default 64; 0: no check); ``max_exact_fraction``, above this fraction of a shard's pixels
            to recompute the shard computes the whole call exactly (default 0.5); ``exact_backend``, the engine
            of the exact pixels (default ``"auto"``); ``cache_dir``, a folder for the indexes on disk (a
            subfolder per shard, machine rule, patch size and canvas), reused when they match (default None: in memory); and
            :class:`patchmosaic.PatchIndex`'s options, each None (default) for its own default:
""" + "".join("    " + line + "\n" for line in INDEX_OPTION_ARGS.rstrip("\n").split("\n")) + """\
            An unknown option or a bad value is a ValueError (TypeError) at construction, before any work.
        data_digest: the SHA-256 of all the training images and labels as one machine would compute it
            (``machine.data_digest``), when the caller knows it (e.g. every rank loaded the full data); None
            (default): computed once, collectively, on first use (``describe``).
    """

    def __init__(self, machine: str, images, labels=None, *, group=None, boundary: str = "zeros",
                 wrapped: bool = False, schedule: ScheduleLike = "cosine_legacy", backend: str = "auto",
                 n_threads: int = 0, max_memory: Optional[int] = None, index_options: Optional[dict] = None,
                 data_digest: Optional[str] = None):
        if machine not in KINDS:
            raise ValueError(f"machine must be one of {tuple(KINDS)}, got {machine!r}")
        max_memory = check_max_memory(max_memory)
        self.index_options = None
        engine = backend
        if backend == "index":
            if machine == "is":
                raise ValueError("backend='index' serves the local machines (LS, ELS); IS has no patches")
            self.index_options = check_index_options(index_options)
            engine = self.index_options["exact_backend"]
        elif index_options is not None:
            raise ValueError(f"index_options= configures backend='index', but backend={backend!r}")
        self.group = group
        self.rank, self.world = launch.rank(group), launch.world(group)
        self.kind = machine
        self.machine_type = KINDS[machine].__name__  # "ELS", "LS" or "IS": what describe() calls it
        sched = get_schedule(schedule)
        extra = dict(boundary=boundary, wrapped=wrapped) if machine == "els" else {}
        common = dict(schedule=schedule, backend=engine, n_threads=n_threads, max_memory=max_memory)
        self._inner_args = dict(extra, **common)
        # this rank's shard: its checks can fail on one rank only (a NaN in its slice, its labels), so a failure
        # is carried through the exchange below and raised on every rank, instead of leaving the others waiting
        error, shape, n_local, lab, dtype, ranges, self.inner = None, (), 0, None, "", {}, None
        try:
            check_cuda_inputs(images=images, labels=labels)
            shape = tuple(images.shape)
            if len(shape) != 4:
                raise ValueError(f"images must have shape (N, C, H, W), got {shape}")
            if backend == "index" and images.dtype not in (np.float32, torch.float32):
                raise TypeError(f"backend='index' works in float32; the training images are {images.dtype}")
            n_local = int(shape[0])
            lab = None if labels is None else to_labels(labels, n_local)
            self.inner = KINDS[machine](images, lab, **extra, **common) if n_local else None
            dtype = str(self.inner.images.dtype) if self.inner is not None else str(torch.as_tensor(
                np.asarray(images) if not torch.is_tensor(images) else images).dtype)
            ranges = {} if self.inner is None else _value_ranges(self.inner.images, lab)
        except Exception as e:
            error = e
        me = {"kind": machine, "shape": shape[1:], "dtype": dtype, "schedule": sched.describe(),
              "labelled": lab is not None, "boundary": boundary, "wrapped": bool(wrapped), "N": n_local,
              "labels": lab, "index": backend == "index", "ranges": ranges, "data": data_digest,
              "error": error_of(error)}
        infos = self._all_gather_object(me, "exchange of the shard descriptions")
        raise_shared(error, [i["error"] for i in infos], "building the machine")
        given = all(i["data"] is not None for i in infos)  # every rank sliced the same full data set (Layout)
        for key in ("kind", "shape", "dtype", "schedule", "labelled", "boundary", "wrapped") + (("data",) if given
                                                                                               else ()):
            vals = [i[key] for i in infos]
            if any(v != vals[0] for v in vals):
                if key == "data":
                    vals = [v[:12] for v in vals]
                    raise launch.RanksDisagree(
                        f"the ranks' shards were cut from different training sets (SHA-256 of all the images and "
                        f"labels per rank, in rank order: {vals}); every rank must load the same data")
                raise ValueError(f"the ranks' shards disagree on {key}: {vals} (rank order); every rank must build "
                                 "the same machine over its slice of the images")
        self.counts = [int(i["N"]) for i in infos]
        self.offsets = [int(v) for v in np.concatenate([[0], np.cumsum(self.counts)[:-1]])]
        if sum(self.counts) == 0:
            raise ValueError("no rank holds a training image")
        self.N = sum(self.counts)
        self.C, self.H, self.W = (int(v) for v in shape[1:])
        self.images = self.inner.images if self.inner is not None else torch.zeros(shape, dtype=getattr(
            torch, dtype.split(".")[-1]))
        self.labels = None if lab is None else np.concatenate([i["labels"] for i in infos]).astype(np.int64)
        self.label_index = ops.LabelIndex.from_labels(self.labels)
        self._label_tensors = self.label_index.tensors()
        self.schedule = sched
        self.backend, self.n_threads, self.max_memory = backend, int(n_threads), max_memory
        # the patch index: whether any rank uses it (then every call exchanges the left-out masses), the
        # centres' range per label over all the ranks (the bound's R), this rank's indexes
        self.bounded = any(i["index"] for i in infos)
        lo_hi = {}
        for i in infos:
            for label, (lo, hi) in i["ranges"].items():
                old = lo_hi.get(label, (lo, hi))
                lo_hi[label] = (min(old[0], lo), max(old[1], hi))
        self.value_range = {label: hi - lo for label, (lo, hi) in lo_hi.items()}
        self._indexes = {}
        self._inner_unlabelled = None
        self.last_bound = None
        self.last_index = None
        self.local = machine != "is"
        self.rule = KINDS[machine].rule if machine != "els" else (
            "els_zeros" if boundary == "zeros" else ("els_wrapped" if wrapped else "els_circular"))
        if machine == "els":
            self.boundary, self.wrapped = boundary, bool(wrapped)
        self._train_cache = {}
        self._digest = data_digest
        self.last_exchange = None  # (bytes sent, bytes received) by this rank in the latest call

    # ----- collectives ---------------------------------------------------------------------
    def _all_gather_object(self, obj, what: str) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        launch.collective(lambda: dist.all_gather_object(out, obj, group=self.group), what, self.group)
        return out

    def _exchange(self, st: SoftmaxState, D: int, dtype, provenance: bool, device,
                  error: Optional[BaseException] = None) -> SoftmaxState:
        """Every rank's partial state, merged in rank order. ``error``: this rank's failure computing its state
        (its last entry flags it): raised on every rank when any rank failed."""
        if self.world == 1:
            if error is not None:
                raise error
            return st
        cdev = launch.comm_device(self.group)
        packed = pack(st)
        flag = torch.tensor([0.0 if error is None else 1.0], dtype=packed.dtype, device=packed.device)
        buf = torch.cat([packed.reshape(-1), flag]).to(cdev).contiguous()
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        launch.collective(lambda: dist.all_gather(bufs, buf, group=self.group),
                          f"merge of the {self.kind.upper()} softmax states", self.group)
        nbytes = buf.numel() * buf.element_size()
        self.last_exchange = (nbytes, nbytes * (self.world - 1))
        if any(float(b[-1]) != 0.0 for b in bufs):  # (a second collective, only when some rank failed)
            errors = self._all_gather_object(error_of(error), "exchange of a rank's error")
            raise_shared(error, errors, "its part of the call")
        return merge([unpack(b[:-1].reshape(packed.shape).to(device), D, dtype, provenance, st.left is not None)
                      for b in bufs])

    # ----- what differs from a one-process machine -------------------------------------------------
    def _check_canvas(self, Hq: int, Wq: int) -> None:
        if self.kind != "els" and (Hq, Wq) != (self.H, self.W):
            raise ValueError(f"{self.kind.upper()} needs queries of the training size {self.H}x{self.W}, got "
                             f"{Hq}x{Wq}")

    @property
    def data_digest(self) -> str:
        """SHA-256 of all the training images' bytes and labels, as a one-process machine over them computes it
        (collective on its first use unless given at construction)."""
        if self._digest is None:
            self._digest = self._collective_digest()
        return self._digest

    def _collective_digest(self) -> str:
        h = hashlib.sha256()
        dtype = str(self.images.numpy().dtype)
        h.update(f"{dtype}{(self.N, self.C, self.H, self.W)}".encode())
        cdev = launch.comm_device(self.group) if self.world > 1 else torch.device("cpu")
        for r in range(self.world):
            n = self.counts[r]
            if n == 0:
                continue
            if r == self.rank:
                data = self.images.contiguous().view(torch.uint8).reshape(-1).to(cdev)
            else:
                data = torch.empty(n * self.C * self.H * self.W * self.images.element_size(), dtype=torch.uint8,
                                   device=cdev)
            if self.world > 1:
                src = dist.get_global_rank(self.group, r) if self.group is not None else r
                launch.collective(lambda: dist.broadcast(data, src, group=self.group),
                                  "exchange of the training images' digest", self.group)
            if self.rank == 0:
                h.update(data.cpu().numpy().tobytes())
        if self.labels is None:
            h.update(b"none")
        else:
            v = np.ascontiguousarray(self.labels)
            h.update(f"{v.dtype}{v.shape}".encode())
            h.update(v.tobytes())
        digest = [h.hexdigest() if self.rank == 0 else None]
        if self.world > 1:
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            launch.collective(lambda: dist.broadcast_object_list(digest, src, group=self.group),
                              "exchange of the training images' digest", self.group)
        return digest[0]

    def describe(self) -> dict:
        """What changes the results, as the one-process machine over all the images describes it (the same dict:
        a run resumes across any number of ranks); with ``backend="index"`` also the index's options that change
        the result (its retrieval size and tolerance: its results differ from the exact ones within ``tol``)."""
        d = {"type": self.machine_type, "rule": self.rule, "boundary": getattr(self, "boundary", None),
             "wrapped": getattr(self, "wrapped", None), "train_shape": [self.N, self.C, self.H, self.W],
             "data": self.data_digest, "schedule": self.schedule.describe()}
        if self.index_options is not None:
            d["index"] = {k: v for k, v in sorted(self.index_options.items()) if k not in ("cache_dir",)}
        return d

    def train_as(self, dtype, device) -> torch.Tensor:
        """This rank's training images in ``dtype`` on ``device``."""
        return self.images.to(device=device, dtype=dtype).contiguous()


    def denoise_ks(self, x, t, ks: Sequence[int], labels=None, *, backend: Optional[str] = None):
        """Estimates at several patch sizes, ``out[j] = denoise(x, t, ks[j], labels)``: one sharded call per
        size (the one-pass sweep of :meth:`patchmosaic.Machine.denoise_ks` is not sharded yet).

        Args:
            x: noisy images ``(B, C, Hq, Wq)``, float32 or float64, numpy or torch, the same on every rank.
            t: diffusion time in ``(0, 1]``: a float or one per image.
            ks: odd patch sizes in strictly increasing order.
            labels: ``(B,)`` class labels or None (default).
            backend: this call's local engine, or None (default) for the machine's.

        Returns:
            ``(K, B, C, Hq, Wq)``: a torch tensor for torch input, a numpy array for numpy input.
        """
        if not self.local:
            raise ValueError("denoise_ks sweeps the patch sizes of a local machine; the IS machine has none")
        ks = check_sweep(ks, self.H, self.W)
        outs = [self.denoise(x, t, k, labels=labels, backend=backend) for k in ks]
        return np.stack(outs) if isinstance(x, np.ndarray) else torch.stack(outs)
    @docstring("""Posterior-mean estimate ``x0_hat`` over all the ranks' training images (a collective call: every
        rank of the group calls it with the same queries; not differentiable).

        Args:
""" + CALL_ARGS + """\
            return_provenance: also return a :class:`patchmosaic.Provenance` whose image indices are global
                (default False).
""" + BACKEND_ARG + """\
            pixels: local machines only: a boolean mask ``(Hq, Wq)`` or ``(B, Hq, Wq)`` of the pixels to compute
                (others are 0); None (default): every pixel.
""" + PATCH_MASK_ARG + """                Exact engines only (not the index backend).

        A machine built with ``backend="index"`` also takes ``backend="index"`` here (and any engine: this rank
        then computes exactly); on a machine where some rank uses the index, :attr:`last_bound` holds the
        merged error bound of this call's pixels afterwards.

        Returns:
            ``x0_hat`` as :meth:`patchmosaic.Machine.denoise` returns it (with the provenance when asked), the
            same on every rank.
        """)
    def denoise(self, x, t, k: Optional[int] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None, pixels=None, patch_mask=None):
        check_cuda_inputs(x=x, t=t, labels=labels, pixels=pixels)
        is_numpy = isinstance(x, np.ndarray)
        weights, k = self._patch_mask(patch_mask, k)
        xt = self._query(x).detach()
        B, C, Hq, Wq = xt.shape
        k = self.effective_k(k, Hq, Wq)
        if weights is not None:
            if (backend or self.backend) == "index":
                raise ValueError("patch_mask= runs on the exact engines of the shards; the index backend takes no "
                                 "mask (call with backend='cpu' or 'cuda', or build the machine without the index)")
            weights = crop_patch_mask(weights, k)
        with torch.no_grad():
            a, inv_2b2, t_check = self.coefficients(t.detach() if torch.is_tensor(t) else t, B, xt.device)
        lab = self._query_labels(labels, B)
        if lab is not None:
            ops.groups(lab, *self._label_tensors, self.N, B)  # an unknown label: the same ValueError on every rank
        name = self._resolve_backend(xt, backend)
        if self.local:
            mask = self._pixel_mask(pixels, B, Hq, Wq)
            rows, D = (B, Hq, Wq), C
        else:
            if pixels is not None:
                raise ValueError("pixels= selects query pixels of a local machine; the IS machine has none")
            rows, D = (B,), C * Hq * Wq
        st = SoftmaxState.empty(rows, D, xt.dtype, xt.device, return_provenance, bounded=self.bounded)
        sel = self._served(lab, B)
        self.last_index = None
        error = None
        if len(sel):
            try:  # (the op's value checks run on the ranks that compute: a failure is shared by the exchange)
                if name == "index":
                    part = self._partial_index(xt, t, a, inv_2b2, t_check, lab, sel, k, mask, return_provenance)
                else:
                    part = self._partial(xt, a, inv_2b2, t_check, lab, sel, k, mask if self.local else None, name,
                                         return_provenance, weights)
                idx = torch.as_tensor(sel, device=xt.device)
                st.m[idx], st.s[idx], st.out[idx] = part.m, part.s, part.out
                if return_provenance:
                    st.key[idx] = part.key
                if self.bounded and part.left is not None:
                    st.left[idx] = part.left
            except Exception as e:
                error = e
        res = self._exchange(st, D, xt.dtype, return_provenance, xt.device, error)
        self.last_bound = self._bound(res, lab, B) if self.bounded else None
        if self.local:
            out = res.out.permute(0, 3, 1, 2).contiguous()
        else:
            out = res.out.reshape(B, C, Hq, Wq)
        result = out.numpy() if is_numpy else out
        if not return_provenance:
            return result
        return result, self._provenance(res.key, res.share(), is_numpy)

    # ----- the patch index backend ------------------------------------------------------------
    @property
    def last_bound(self) -> Optional[torch.Tensor]:
        """The merged error bound of the latest call, float64 ``(B, Hq, Wq)``, the same on every rank: per pixel
        an upper bound on ``|x0 - x0_exact|`` (every channel), ``R left / (s + left)`` over the merged state
        (0 where every rank was exact); None on a machine where no rank uses the patch index. Conditional on
        retrieval where a rank's index is an inverted-file one (see :attr:`last_index`)."""
        return self._last_bound

    @last_bound.setter
    def last_bound(self, value):
        self._last_bound = value

    @property
    def last_index(self) -> Optional[dict]:
        """What this rank's patch index did in the latest call (None when it did not use one): ``pixels`` (query
        pixels it served), ``exact_pixels`` (of them, computed exactly on this shard because their bound was
        above ``tol``, or all of them after a failed retrieval check or above ``max_exact_fraction``),
        ``shard_bound_max`` (the largest shard bound among the pixels the index kept), ``bound_conditional``,
        ``bound_valid`` (as :class:`patchmosaic.index.ApproxResult`'s) and ``seconds``."""
        return self._last_index

    @last_index.setter
    def last_index(self, value):
        self._last_index = value

    def _resolve_backend(self, xt: torch.Tensor, override: Optional[str]) -> str:
        name = override or self.backend
        if name != "index":
            return super()._resolve_backend(xt, name)
        if self.index_options is None:
            raise ValueError("backend='index' needs a machine built with backend='index' (every rank must know "
                             "that the states carry the index's error bounds)")
        if xt.dtype != torch.float32:
            raise TypeError(f"backend='index' works in float32, got queries of {xt.dtype}")
        if xt.device.type != "cpu":
            raise ValueError(f"backend='index' needs CPU queries, got a tensor on {xt.device}")
        return name

    def _value_range_of(self, lab, rows: np.ndarray) -> np.ndarray:
        """The centres' range over all the ranks (the bound's ``R``) for the query images ``rows``."""
        if lab is None:
            return np.full(len(rows), self.value_range[None])
        return np.array([self.value_range[int(v)] for v in lab.cpu().numpy()[rows]], dtype=np.float64)

    def _bound(self, res: SoftmaxState, lab, B: int) -> torch.Tensor:
        """The merged error bound per pixel of a merged state (see :attr:`last_bound`)."""
        R = self._value_range_of(lab, np.arange(B)).reshape((B,) + (1,) * (res.s.dim() - 1))
        return torch.from_numpy(bound_from_mass(res.left.cpu().numpy(), res.s.cpu().numpy(), R))

    def _index(self, k: int, canvas, conditional: bool) -> PatchIndex:
        """This rank's patch index at ``k`` for ``canvas`` queries (over its shard; by label when
        ``conditional``): built (or opened in ``cache_dir``) on first use, then kept."""
        key = (int(k), tuple(canvas), bool(conditional))
        if key not in self._indexes:
            mach = self.inner
            if not conditional and mach.labels is not None:  # an unconditional call: one index over every label
                if self._inner_unlabelled is None:
                    self._inner_unlabelled = KINDS[self.kind](mach.images, None, **self._inner_args)
                mach = self._inner_unlabelled
            opts = self.index_options
            kw = {name: opts[name] for name in _PATCH_INDEX_KEYS if opts[name] is not None}
            folder = None
            if opts["cache_dir"] is not None:
                start = self.offsets[self.rank]
                folder = os.path.join(os.fspath(opts["cache_dir"]),
                                      f"images{start}-{start + self.counts[self.rank]}of{self.N}",
                                      f"{self.rule}_{'by_label' if conditional else 'all'}_{canvas[0]}x{canvas[1]}"
                                      f"_k{k}")
            self._indexes[key] = PatchIndex.open(folder, mach, int(k), tuple(canvas), progress=False, **kw)
        return self._indexes[key]

    def _partial_index(self, xt, t, a, inv_2b2, t_check, lab, sel, k, mask, provenance) -> SoftmaxState:
        """This rank's partial state of the query images ``sel`` from its patch index: the softmax over the
        retrieved keys (patchmosaic.index.query), its logits shifted as the engines shift theirs, the left-out
        mass bound; the pixels whose shard bound is above ``tol`` computed exactly (:meth:`_partial`)."""
        t0 = time.perf_counter()
        opts = self.index_options
        B, C, Hq, Wq = xt.shape
        n = len(sel)
        idx = torch.as_tensor(sel)
        q = xt[idx].contiguous()
        tt = t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float64)
        tt = np.broadcast_to(tt.astype(np.float64), (B,))[sel]
        lb = None if lab is None else lab.cpu()[idx]
        index = self._index(k, (Hq, Wq), lab is not None)
        res = index.denoise(q, tt, None if lb is None else lb.numpy(), opts["m"], check_pixels=opts["check_pixels"])
        # the re-scoring's logits are the true ones; the engines' (and so every other shard's) are shifted by
        # |P|^2 / (2 b^2), the same for every key of a row
        shift = patch_sq_norms(q, k, index.keyset.query_pad) * inv_2b2.cpu()[idx].reshape(n, 1, 1)
        m, s, left = res.state.m + shift, res.state.s.clone(), res.state.left.clone()
        out = res.state.out.to(xt.dtype).contiguous()
        key = None
        if provenance:
            key = torch.where(res.arg_key >= 0, res.arg_key + self.offsets[self.rank] * self.H * self.W, res.arg_key)
        R = self._value_range_of(lab, sel).reshape(n, 1, 1)
        shard_bound = torch.from_numpy(bound_from_mass(left.numpy(), s.numpy(), R))
        served = torch.ones(n, Hq, Wq, dtype=torch.bool) if mask is None else mask.expand(n, Hq, Wq).clone()
        bad = (shard_bound > opts["tol"]) & served
        if res.bound_valid is False or float(bad.sum()) > opts["max_exact_fraction"] * float(served.sum()):
            bad = served.clone()
        if bool(bad.any()):
            rows = np.nonzero(bad.reshape(n, -1).any(1).numpy())[0]
            emask = bad[torch.as_tensor(rows)].any(0)  # one pixel mask for the images that need exact pixels
            engine = super()._resolve_backend(xt, opts["exact_backend"])
            ex = self._partial(xt, a, inv_2b2, t_check, lab, sel[rows], k, emask, engine, provenance)
            r = torch.as_tensor(rows)
            where = torch.zeros_like(bad)
            where[r] = emask
            sub = where[r]  # rows r in increasing order: where's pixels, in the order of sub's
            for name, mine in (("m", m), ("s", s), ("out", out)):
                mine[where] = getattr(ex, name).to(mine.dtype)[sub]
            if provenance:
                key[where] = ex.key.to(key.device)[sub]
            left[where] = 0.0
            exact_pixels = int(where.sum())
        else:
            exact_pixels = 0
        if mask is not None:  # the pixels not asked for: empty states
            off = ~served
            m[off], s[off], left[off], out[off] = -float("inf"), 0.0, 0.0, 0.0
            if provenance:
                key[off] = -1
        kept = shard_bound[served & (left > 0)]
        self.last_index = {"pixels": int(served.sum()), "exact_pixels": exact_pixels,
                           "shard_bound_max": float(kept.max()) if len(kept) else 0.0,
                           "bound_conditional": bool(res.bound_conditional), "bound_valid": res.bound_valid,
                           "seconds": time.perf_counter() - t0}
        dev = xt.device
        return SoftmaxState(m.to(dev), s.to(dev), out.to(dev), None if key is None else key.to(dev), left.to(dev))

    def _served(self, lab, B: int) -> np.ndarray:
        """The query images this rank has keys for (all of them without labels)."""
        if self.inner is None:
            return np.zeros(0, np.int64)
        if lab is None:
            return np.arange(B)
        mine = self.inner.label_index.values
        return np.nonzero(np.isin(lab.cpu().numpy(), mine))[0]

    def _partial(self, xt, a, inv_2b2, t_check, lab, sel, k, mask, name, provenance, weights=None) -> SoftmaxState:
        """This rank's partial state of the query images ``sel`` (``weights``: the call's neighbourhood mask)."""
        m = self.inner
        idx = torch.as_tensor(sel, device=xt.device)
        q, aa, ss = xt[idx], a[idx], inv_2b2[idx]
        tc = None if t_check is None else t_check[idx]
        lb = None if lab is None else lab[torch.as_tensor(sel)]
        train = m.train_as(xt.dtype, xt.device if name in ("torch", "cuda") else torch.device("cpu"))
        lv, lp, li = m.label_index.tensors()
        mem = 0 if m.max_memory is None else int(m.max_memory)
        with torch.no_grad():
            if self.local:
                classes = m.call_classes(q.shape[2], q.shape[3], k, mask)
                out, stats, key, _ = ops.local_softmax(train, q, aa, ss, tc, lb, lv, lp, li, *classes, k, provenance,
                                                      name, m.n_threads, mem, weights)
                per_image = self.H * self.W
            else:
                out, stats, key, _ = ops.ideal_softmax(train, q, aa, ss, tc, lb, lv, lp, li, provenance, name,
                                                      m.n_threads, mem)
                out = out.reshape(out.shape[0], -1)
                per_image = 1
        key = key.to(xt.device) + self.offsets[self.rank] * per_image if provenance else None
        if self.local:
            return SoftmaxState.of_local(out.to(xt.device), stats.to(xt.device), key)
        stats = stats.to(xt.device)  # (IS's maximum: the largest logit itself in every engine, so ranks may mix them)
        return SoftmaxState(stats[..., 0], stats[..., 1], out.to(xt.device), key)

    def sensitivity(self, x, t, k: Optional[int] = None, pixel=(0, 0), labels=None, *, backend: Optional[str] = None):
        """Not available on a sharded machine (its results are not differentiable); build a one-process machine.

        Args:
            x, t, k, pixel, labels, backend: as for :meth:`patchmosaic.Machine.sensitivity`.
        """
        raise NotImplementedError("a ShardedMachine is not differentiable (the merge of the ranks' softmax states "
                                  "runs outside autograd); use a one-process machine for sensitivity")

    def __repr__(self):
        return (f"ShardedMachine({self.kind.upper()}, {self.N} images {self.C}x{self.H}x{self.W} over {self.world} "
                f"rank(s), this rank {self.counts[self.rank]} from index {self.offsets[self.rank]})")
