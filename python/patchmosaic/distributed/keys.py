"""Key sharding: a machine whose training images are spread over the ranks of a process group.

Each rank holds a slice of the training images (by image: any split, uneven, even empty), runs its partial
softmax with its own fastest engine (the ops' ``stats`` are the partial states' max and sum), and the ranks
exchange the partial states with one ``all_gather`` and merge them in rank order (merge.py). Every rank of the
group ends with the same result, equal to the single-process machine's up to the float32 rounding of the
partial states. Provenance is global: image index = the rank's offset + its local index.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import ops
from ..machines.base import BACKEND_ARG, CALL_ARGS, DATA_ARGS, ENGINE_ARGS, Machine, docstring
from ..machines.ideal import IS
from ..machines.local import ELS, LS
from ..ops.checks import check_cuda_inputs
from ..schedules import ScheduleLike, get_schedule
from ..validation import to_labels
from . import launch
from .merge import PartialState, merge, pack, unpack

KINDS = {"els": ELS, "ls": LS, "is": IS}


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

    Args:
        machine: ``"els"``, ``"ls"`` or ``"is"``.
""" + DATA_ARGS.replace("training images ``(N, C, H, W)``", "this rank's training images ``(N_r, C, H, W)`` "
                        "(``N_r = 0`` allowed)") + """\
        group: the process group that shares the keys (its ranks hold the slices, in rank order); None
            (default): the world group, or a single process when torch.distributed is not initialised.
        boundary: ELS only: ``"zeros"`` (default) or ``"circular"``.
        wrapped: ELS with ``boundary="circular"`` only: also the wrapped training patches (default False).
""" + ENGINE_ARGS + """\
        data_digest: the SHA-256 of all the training images and labels as one machine would compute it
            (``machine.data_digest``), when the caller knows it (e.g. every rank loaded the full data); None
            (default): computed once, collectively, on first use (``describe``).
    """

    def __init__(self, machine: str, images, labels=None, *, group=None, boundary: str = "zeros",
                 wrapped: bool = False, schedule: ScheduleLike = "cosine_legacy", backend: str = "auto",
                 n_threads: int = 0, max_memory: Optional[int] = None, data_digest: Optional[str] = None):
        if machine not in KINDS:
            raise ValueError(f"machine must be one of {tuple(KINDS)}, got {machine!r}")
        check_cuda_inputs(images=images, labels=labels)
        self.group = group
        self.rank, self.world = launch.rank(group), launch.world(group)
        self.kind = machine
        self.machine_type = KINDS[machine].__name__  # "ELS", "LS" or "IS": what describe() calls it
        shape = tuple(images.shape)
        if len(shape) != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {shape}")
        n_local = int(shape[0])
        lab = None if labels is None else to_labels(labels, n_local)
        extra = dict(boundary=boundary, wrapped=wrapped) if machine == "els" else {}
        common = dict(schedule=schedule, backend=backend, n_threads=n_threads, max_memory=max_memory)
        self.inner = KINDS[machine](images, lab, **extra, **common) if n_local else None
        dtype = str(self.inner.images.dtype) if self.inner is not None else str(torch.as_tensor(
            np.asarray(images) if not torch.is_tensor(images) else images).dtype)
        sched = get_schedule(schedule)
        me = {"kind": machine, "shape": shape[1:], "dtype": dtype, "schedule": sched.describe(),
              "labelled": lab is not None, "boundary": boundary, "wrapped": bool(wrapped), "N": n_local,
              "labels": lab}
        infos = self._all_gather_object(me, "exchange of the shard descriptions")
        for key in ("kind", "shape", "dtype", "schedule", "labelled", "boundary", "wrapped"):
            vals = [i[key] for i in infos]
            if any(v != vals[0] for v in vals):
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

    def _exchange(self, st: PartialState, D: int, dtype, provenance: bool, device) -> PartialState:
        if self.world == 1:
            return st
        cdev = launch.comm_device(self.group)
        buf = pack(st).to(cdev).contiguous()
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        launch.collective(lambda: dist.all_gather(bufs, buf, group=self.group),
                          f"merge of the {self.kind.upper()} softmax states", self.group)
        nbytes = buf.numel() * buf.element_size()
        self.last_exchange = (nbytes, nbytes * (self.world - 1))
        return merge([unpack(b.to(device), D, dtype, provenance) for b in bufs])

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
        a run resumes across any number of ranks)."""
        return {"type": self.machine_type, "rule": self.rule, "boundary": getattr(self, "boundary", None),
                "wrapped": getattr(self, "wrapped", None), "train_shape": [self.N, self.C, self.H, self.W],
                "data": self.data_digest, "schedule": self.schedule.describe()}

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
        ks = [int(k) for k in ks]
        if not ks or any(k1 <= k0 for k0, k1 in zip(ks, ks[1:])):
            raise ValueError(f"ks must be a non-empty, strictly increasing list of odd patch sizes, got {ks}")
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

        Returns:
            ``x0_hat`` as :meth:`patchmosaic.Machine.denoise` returns it (with the provenance when asked), the
            same on every rank.
        """)
    def denoise(self, x, t, k: Optional[int] = None, labels=None, *, return_provenance: bool = False,
                backend: Optional[str] = None, pixels=None):
        check_cuda_inputs(x=x, t=t, labels=labels, pixels=pixels)
        is_numpy = isinstance(x, np.ndarray)
        xt = self._query(x).detach()
        B, C, Hq, Wq = xt.shape
        k = self.effective_k(k, Hq, Wq)
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
        st = PartialState.empty(rows, D, xt.dtype, xt.device, return_provenance)
        sel = self._served(lab, B)
        if len(sel):
            part = self._partial(xt, a, inv_2b2, t_check, lab, sel, k, mask if self.local else None, name,
                                 return_provenance)
            idx = torch.as_tensor(sel, device=xt.device)
            st.m[idx], st.s[idx], st.out[idx] = part.m, part.s, part.out
            if return_provenance:
                st.key[idx] = part.key
        res = self._exchange(st, D, xt.dtype, return_provenance, xt.device)
        if self.local:
            out = res.out.permute(0, 3, 1, 2).contiguous()
        else:
            out = res.out.reshape(B, C, Hq, Wq)
        result = out.numpy() if is_numpy else out
        if not return_provenance:
            return result
        return result, self._provenance(res.key, res.share(), is_numpy)

    def _served(self, lab, B: int) -> np.ndarray:
        """The query images this rank has keys for (all of them without labels)."""
        if self.inner is None:
            return np.zeros(0, np.int64)
        if lab is None:
            return np.arange(B)
        mine = self.inner.label_index.values
        return np.nonzero(np.isin(lab.cpu().numpy(), mine))[0]

    def _partial(self, xt, a, inv_2b2, t_check, lab, sel, k, mask, name, provenance) -> PartialState:
        """This rank's partial state of the query images ``sel``."""
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
                out, stats, key, _ = ops.local_softmax(train, q, aa, ss, tc, lb, lv, lp, li, mask, k, self.rule,
                                                      provenance, name, m.n_threads, mem)
                out = out.permute(0, 2, 3, 1)
                per_image = self.H * self.W
            else:
                out, stats, key, _ = ops.ideal_softmax(train, q, aa, ss, tc, lb, lv, lp, li, provenance, name,
                                                      m.n_threads, mem)
                out = out.reshape(out.shape[0], -1)
                per_image = 1
        stats = stats.to(xt.device)
        key = key.to(xt.device) + self.offsets[self.rank] * per_image if provenance else None
        return PartialState(stats[..., 0], stats[..., 1], out.to(xt.device), key)

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
