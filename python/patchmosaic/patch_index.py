"""FAISS patch index: approximate local machines with a stated error bound.

At low noise a local machine's softmax is dominated by a few nearest training patches. A
:class:`PatchIndex` holds, for one machine and one patch size ``k``, a FAISS index over the key patches
of every (label, padding-signature class) part of the key set. An approximate call then, per query
pixel, retrieves the ``m`` nearest keys (distances ``|P - a q|^2 = a^2 |P / a - q|^2``, so one index
serves every ``t``), re-scores them exactly in the compiled core from the original float patches, and
takes the softmax over them.

Identical key patches (MNIST's blank background: millions of them) are merged at build time into one
key with a multiplicity ``c``; a merged key enters the softmax with weight ``c exp(l)``, which is exact
because identical patches have identical centres.

Error bound (exact index). Let the retrieved logits be ``l_1 >= ... >= l_m``, ``c_i`` their
multiplicities and ``M`` the keys of the pixel's part (counted with multiplicity). Every key not
retrieved is at least as far as the m-th, so its weight is at most ``exp(l_m)``; with
``S = sum_i c_i exp(l_i - l_1)`` the left-out mass relative to the retrieved mass is
``eps <= (M - sum_i c_i) exp(l_m - l_1) / S``, and since ``x0_hat`` is a weighted mean of centre values in a
range of width ``R`` (the training data's range per part),

    |x0_hat - x0_hat_approx| <= R * eps / (1 + eps)     per pixel and channel.

With an inverted-file index (``ivf``, ``ivfpq``) the same number holds *conditional on retrieval* (if
the true m nearest were found); :func:`measure_recall` measures how often they are.

Indexes are saved with a JSON manifest (data fingerprint, machine, k, canvas, parts, index type) and
refused when the manifest does not match the machine they are loaded for.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .keysets import CIRCULAR
from .progress import Progress
from .runstate import write_json
from .validation import ResourceError, available_memory, check_k, check_t, to_labels, to_tensor

KINDS = ("auto", "flat", "ivf", "ivfpq")
FORMAT = "patchmosaic-index-1"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RuntimeError("the patch index needs FAISS: pip install faiss-cpu") from None
    return faiss


def patch_vectors(images, positions: np.ndarray, k: int, pad: int) -> np.ndarray:
    """Patches of ``images`` ``(n, C, H, W)`` centred at flat ``positions`` -> ``(n * len(positions), C k k)``
    float32, image-major: :func:`key_vectors` of every (image, position) pair."""
    n, _, H, W = images.shape
    ids = (np.arange(n, dtype=np.int64)[:, None] * (H * W) + np.asarray(positions, dtype=np.int64)[None, :]).ravel()
    return key_vectors(images, ids, H, W, k, pad)


def key_vectors(images, ids: np.ndarray, H: int, W: int, k: int, pad: int) -> np.ndarray:
    """Patches of ``images`` ``(N, C, H, W)`` for global key ids ``n * H * W + p`` -> ``(len(ids), C k k)``
    float32, elements in (channel, row, column) order; ``pad``: zeros or circular.

    Plain numpy (no thread pool): FAISS brings its own OpenMP runtime, and two runtimes spinning
    against each other made torch's unfold here 50x slower."""
    ids = np.asarray(ids, dtype=np.int64)
    n, p = np.divmod(ids, H * W)
    uimg, local = np.unique(n, return_inverse=True)
    x = images[torch.as_tensor(uimg)] if torch.is_tensor(images) else np.asarray(images)[uimg]
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else x
    x = x.astype(np.float32, copy=False)
    r = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="wrap" if pad == CIRCULAR else "constant")
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))  # (u, C, H, W, k, k)
    sel = win[local.ravel(), :, p // W, p % W]  # (L, C, k, k)
    return np.ascontiguousarray(sel.reshape(len(ids), -1))


def row_hashes(v: np.ndarray, seed: int = 0x9E3779B9) -> np.ndarray:
    """Two independent 64-bit hashes of each row's bytes (float32 rows) -> ``(n, 2)`` uint64. Rows
    with equal bytes hash equal; distinct rows collide with probability about 2^-128."""
    u = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rng = np.random.default_rng(seed)
    out = np.empty((len(u), 2), np.uint64)
    for h in range(2):
        mult = rng.integers(1, 2**63, size=u.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        with np.errstate(over="ignore"):
            x = u * mult[None, :]
            x ^= x >> np.uint64(29)
            out[:, h] = x.sum(1)
    return out


def _pad_to(v: np.ndarray, d: int) -> np.ndarray:
    """Rows of ``v`` zero-padded to ``d`` columns (an IVF-PQ index's padded vector size)."""
    return v if v.shape[1] == d else np.ascontiguousarray(np.pad(v, ((0, 0), (0, d - v.shape[1]))))


def fingerprint_data(images: torch.Tensor, labels: Optional[np.ndarray]) -> str:
    h = hashlib.sha256()
    arr = images.detach().cpu().contiguous().numpy()
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(arr.tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


@dataclass
class Part:
    """One (label, key class) part: its query pixels, its training images and key positions, and the
    keys the index holds (global ids ``n * H * W + p``, in index order). After merging duplicates a
    key stands for ``count`` identical patches; ``n_total`` is the part's number of keys before."""

    label: Optional[int]
    cls: int
    qpix: np.ndarray
    images: np.ndarray
    kpos: np.ndarray
    HW: int
    value_range: float
    index: object = None
    keys: np.ndarray = field(init=False)
    count: Optional[np.ndarray] = field(init=False, default=None)
    n_total: int = field(init=False)

    def __post_init__(self):
        self.keys = (self.images.astype(np.int64)[:, None] * self.HW + self.kpos.astype(np.int64)[None, :]).ravel()
        self.n_total = len(self.keys)


@dataclass
class ApproxResult:
    """``x0``: the approximate denoiser output (shape of the query); ``bound``: per pixel ``(B, Hq, Wq)``,
    an upper bound on ``|x0_exact - x0|`` (every channel), conditional on retrieval for IVF indexes;
    ``arg_key``: the winning candidate per pixel (``n * H * W + p``, provenance)."""

    x0: torch.Tensor
    bound: torch.Tensor
    arg_key: torch.Tensor
    seconds: float = 0.0


class PatchIndex:
    """A FAISS index over the key patches of ``machine`` at patch size ``k`` for ``canvas`` queries.

    ``kind``: ``"flat"`` (exact, ``IndexFlatL2``), ``"ivf"`` (``IndexIVFFlat``), ``"ivfpq"`` (``IndexIVFPQ``,
    for when raw patches would not fit in memory) or ``"auto"`` (flat while its vectors take at most
    ``flat_budget`` bytes, default a quarter of the available memory, else ivfpq). ``nlist``: inverted
    lists per part (default ~ sqrt(keys)); ``nprobe``: lists searched; ``pq_m``: PQ sub-quantisers.
    Parts with at most ``min_index_keys`` keys always use a flat index. ``merge``: store each distinct
    key patch once with its multiplicity (exact: identical patches have identical centres; on MNIST it
    removes the thousands of blank patches that tie at the top and would make the bound vacuous).
    """

    def __init__(self, machine, k: int, canvas: Optional[Tuple[int, int]] = None, *, kind: str = "auto",
                 nlist: Optional[int] = None, nprobe: int = 16, pq_m: int = 16, flat_budget: Optional[int] = None,
                 min_index_keys: int = 20000, merge: bool = True, progress: bool = True, _build: bool = True):
        if not machine.local:
            raise ValueError("a patch index serves the local machines (LS, ELS); IS has no patches")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.machine = machine
        self.k = check_k(k, machine.H, machine.W)
        self.canvas = tuple(canvas or (machine.H, machine.W))
        machine.check_canvas(*self.canvas, self.k)
        self.keyset = machine._keyset(self.canvas[0], self.canvas[1], self.k)
        self.d = machine.C * self.k * self.k
        self.nprobe, self.pq_m, self.nlist, self.min_index_keys = int(nprobe), int(pq_m), nlist, int(min_index_keys)
        self.fingerprint = fingerprint_data(machine.images, machine.labels)
        self.parts: List[Part] = self._parts()
        self.merge = bool(merge)
        self.build_seconds = 0.0
        t0 = time.perf_counter()
        if self.merge and _build:
            bar = Progress(len(self.parts), f"merge duplicates k={self.k}", enabled=progress)
            for part in self.parts:
                self._merge_duplicates(part)
                bar.update(postfix=f"{part.n_total} -> {len(part.keys)} keys")
            bar.close()
        n_keys = sum(len(p.keys) for p in self.parts)
        if kind == "auto":
            budget = available_memory() // 4 if flat_budget is None else int(flat_budget)
            kind = "flat" if n_keys * self.d * 4 <= budget else "ivfpq"
        self.kind = kind
        if _build:
            self._build_all(progress)
        self.build_seconds = time.perf_counter() - t0

    # ----- construction -------------------------------------------------------------------
    def _parts(self) -> List[Part]:
        m = self.machine
        HW = m.H * m.W
        groups = [(None, np.arange(m.N))] if m.labels is None else sorted(m._by_label.items())
        parts = []
        for label, imgs in groups:
            vals = m.images[torch.as_tensor(imgs, dtype=torch.long)]
            rng = float(vals.max() - vals.min())
            for c, (qpix, kpos) in enumerate(self.keyset.classes()):
                parts.append(Part(label, c, np.asarray(qpix, np.int64), np.asarray(imgs, np.int64),
                                  np.asarray(kpos, np.int64), HW, rng))
        return parts

    def _part_kind(self, part: Part) -> str:
        return "flat" if self.kind == "flat" or len(part.keys) <= self.min_index_keys else self.kind

    def _key_chunks(self, part: Part, chunk: int = 1 << 18):
        """Yield the part's key vectors in index order, ``chunk`` keys at a time."""
        m = self.machine
        for s in range(0, len(part.keys), chunk):
            yield key_vectors(m.images, part.keys[s : s + chunk], m.H, m.W, self.k, self.keyset.key_pad)

    def _merge_duplicates(self, part: Part) -> None:
        """Keep one key per distinct patch (the first in index order) with its multiplicity."""
        h = np.concatenate([row_hashes(v) for v in self._key_chunks(part)])
        _, first, counts = np.unique(h.view([("a", np.uint64), ("b", np.uint64)]).ravel(), return_index=True,
                                     return_counts=True)
        if len(first) == len(part.keys):
            return
        order = np.argsort(first)
        part.keys = part.keys[first[order]]
        part.count = counts[order].astype(np.float64)

    def _build_all(self, progress: bool):
        faiss = _faiss()
        need = max((len(p.keys) for p in self.parts), default=0) * self.d * 4
        if self.kind == "flat" and need > available_memory():
            raise ResourceError(f"a flat index of {need / 2**30:.1f} GiB does not fit; use kind='ivfpq'")
        bar = Progress(len(self.parts), f"index k={self.k}", enabled=progress)
        for part in self.parts:
            part.index = self._build_part(faiss, part)
            bar.update(postfix=f"{len(part.keys)} keys, {self._part_kind(part)}")
        bar.close()

    def _pq_dims(self) -> Tuple[int, int]:
        """(sub-quantisers, padded vector size) of an IVF-PQ part: vectors are zero-padded to a multiple
        of ``pq_m`` (distances unchanged), so every patch size gets ``pq_m`` sub-quantisers."""
        pq_m = max(1, min(self.pq_m, self.d))
        return pq_m, -(-self.d // pq_m) * pq_m

    def _build_part(self, faiss, part: Part):
        kind, d, n = self._part_kind(part), self.d, len(part.keys)
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        else:
            nlist = int(self.nlist or max(16, min(65536, int(np.sqrt(n)))))
            pq_m, d = self._pq_dims() if kind == "ivfpq" else (0, d)
            # many lists: an HNSW graph over the centroids assigns vectors in log time, not a scan of nlist
            quant = faiss.IndexHNSWFlat(d, 32) if nlist > 2048 else faiss.IndexFlatL2(d)
            if kind == "ivf":
                index = faiss.IndexIVFFlat(quant, d, nlist)
            else:
                index = faiss.IndexIVFPQ(quant, d, nlist, pq_m, 8)
            index.own_fields = True
            quant.this.disown()
            # k-means (10 iterations) on an evenly spread sample of >= 40 points per list
            index.cp.niter = 10
            want = min(n, max(40 * nlist, 10000))
            take = np.unique(np.linspace(0, n - 1, want).astype(np.int64))
            sample, seen = [], 0
            for chunk in self._key_chunks(part):
                sel = take[(take >= seen) & (take < seen + len(chunk))] - seen
                sample.append(chunk[sel])
                seen += len(chunk)
            index.train(_pad_to(np.concatenate(sample), d))
            index.nprobe = min(self.nprobe, nlist)
        for chunk in self._key_chunks(part):
            index.add(_pad_to(chunk, d))
        return index

    # ----- queries ------------------------------------------------------------------------
    def denoise(self, x, t, labels=None, m: int = 64, *, return_provenance: bool = False) -> ApproxResult:
        """Approximate ``machine.denoise(x, t, k, labels)`` from the ``m`` nearest keys per pixel, with
        the per-pixel error bound of the module docstring. ``x`` ``(B, C, Hq, Wq)`` float32."""
        from . import _core

        t0 = time.perf_counter()
        mach = self.machine
        xt = to_tensor(x, "x")
        if xt.dtype != torch.float32:
            raise TypeError(f"the patch index works in float32, got {xt.dtype}")
        B, C, Hq, Wq = xt.shape
        if (C, Hq, Wq) != (mach.C,) + self.canvas:
            raise ValueError(f"this index is for queries of shape (B, {mach.C}, {self.canvas[0]}, {self.canvas[1]}), "
                             f"got {tuple(xt.shape)}")
        if int(m) < 1:
            raise ValueError(f"m must be a positive number of candidates, got {m}")
        tt = check_t(t, B)
        mach.check_labels(labels, B)
        lab = None if labels is None else to_labels(labels, B)
        a, b2 = mach.schedule.coefficients(tt)
        inv_2b2 = 0.5 / b2
        xq = xt.cpu().contiguous()
        HWq = Hq * Wq
        m = min(int(m), max(len(p.keys) for p in self.parts))
        pix_all, cand_all, cnt_all, M_all, R_all = [], [], [], [], []
        allpix = np.arange(HWq)
        cols = {}  # query patches / a of each label group, once: (nb, Hq Wq, d)
        for part in self.parts:
            bs = np.arange(B) if part.label is None else np.nonzero(lab == part.label)[0]
            if len(bs) == 0:
                continue
            if part.label not in cols:
                v = patch_vectors(xq[torch.as_tensor(bs)], allpix, self.k, self.keyset.query_pad)
                v = v.reshape(len(bs), HWq, self.d) / a[bs].astype(np.float32)[:, None, None]
                cols[part.label] = v
            q = cols[part.label][:, part.qpix].reshape(-1, self.d)
            mm = min(m, len(part.keys))
            q = _pad_to(np.ascontiguousarray(q, dtype=np.float32), part.index.d)
            _, ids = part.index.search(q, mm)
            short = np.nonzero((ids < 0).any(1))[0]
            if len(short) and hasattr(part.index, "nprobe"):
                # the probed lists held fewer than mm keys (e.g. many identical patches all filed in one
                # list): search those rows again over every list
                probe = part.index.nprobe
                part.index.nprobe = part.index.nlist
                try:
                    ids[short] = part.index.search(q[short], mm)[1]
                finally:
                    part.index.nprobe = probe
            cand = np.where(ids >= 0, part.keys[np.clip(ids, 0, None)], -1)
            cnt = np.ones(ids.shape) if part.count is None else part.count[np.clip(ids, 0, None)]
            pix_all.append((bs[:, None] * HWq + part.qpix[None, :]).ravel())
            cand_all.append(np.pad(cand, ((0, 0), (0, m - mm)), constant_values=-1))
            cnt_all.append(np.pad(np.where(ids >= 0, cnt, 0.0), ((0, 0), (0, m - mm))))
            M_all.append(np.full(cand.shape[0], part.n_total, np.int64))
            R_all.append(np.full(cand.shape[0], part.value_range))
        pix = np.concatenate(pix_all).astype(np.int64)
        cand = np.ascontiguousarray(np.concatenate(cand_all), dtype=np.int64)
        out = np.zeros((B, C, Hq, Wq), np.float32)
        top, last, srel = (np.empty(len(pix)) for _ in range(3))
        arg = np.empty(len(pix), np.int64)
        cnt = np.ascontiguousarray(np.concatenate(cnt_all), dtype=np.float64)
        _core.candidate_softmax(mach._train_as(torch.float32, torch.device("cpu")).numpy(), xq.numpy(), self.k,
                                self.keyset.query_pad, self.keyset.key_pad, np.ascontiguousarray(a, np.float64),
                                np.ascontiguousarray(inv_2b2, np.float64), pix, cand, out, top, last, srel, arg, None,
                                cnt, mach.n_threads)
        used = cnt.sum(axis=1)
        left = np.maximum(np.concatenate(M_all) - used, 0)
        with np.errstate(over="ignore", invalid="ignore"):
            eps = np.where(left > 0, left * np.exp(last - top) / srel, 0.0)
            bnd = np.concatenate(R_all) * np.where(np.isinf(eps), 1.0, eps / (1.0 + eps))
        bound = np.zeros(B * HWq)
        bound[pix] = bnd
        key = np.full(B * HWq, -1, np.int64)
        key[pix] = arg
        res = torch.from_numpy(out)
        if isinstance(x, torch.Tensor):
            res = res.to(x.device)
        return ApproxResult(res, torch.from_numpy(bound.reshape(B, Hq, Wq)),
                            torch.from_numpy(key.reshape(B, Hq, Wq)), time.perf_counter() - t0)

    # ----- persistence --------------------------------------------------------------------
    def manifest(self) -> dict:
        m = self.machine
        return {"format": FORMAT, "fingerprint": self.fingerprint, "machine": type(m).__name__,
                "boundary": getattr(m, "boundary", None), "wrapped": getattr(m, "wrapped", None),
                "train_shape": list(m.images.shape), "k": self.k, "canvas": list(self.canvas), "kind": self.kind,
                "nprobe": self.nprobe, "pq_m": self.pq_m, "nlist": self.nlist, "merge": self.merge,
                "parts": [{"label": p.label, "cls": p.cls, "n_total": int(p.n_total), "n_keys": int(len(p.keys)),
                           "file": f"part_{i}.faiss", "keys": f"part_{i}.keys.npz", "index": self._part_kind(p)}
                          for i, p in enumerate(self.parts)],
                "build_seconds": round(self.build_seconds, 2)}

    def save(self, folder: str) -> None:
        """Write every part's FAISS index and ``manifest.json`` (last, so a partial save is never valid)."""
        faiss = _faiss()
        os.makedirs(folder, exist_ok=True)
        man = self.manifest()
        mpath = os.path.join(folder, "manifest.json")
        if os.path.exists(mpath):
            os.remove(mpath)
        for p, meta in zip(self.parts, man["parts"]):
            tmp = os.path.join(folder, meta["file"] + ".tmp")
            faiss.write_index(p.index, tmp)
            os.replace(tmp, os.path.join(folder, meta["file"]))
            tmp = os.path.join(folder, meta["keys"] + ".tmp.npz")
            np.savez(tmp, keys=p.keys, count=np.ones(0) if p.count is None else p.count)
            os.replace(tmp, os.path.join(folder, meta["keys"]))
        write_json(mpath, man)

    @classmethod
    def load(cls, folder: str, machine, k: int, canvas: Optional[Tuple[int, int]] = None) -> "PatchIndex":
        """Load an index saved by :meth:`save`; a ValueError if it was built for other data or settings."""
        faiss = _faiss()
        mpath = os.path.join(folder, "manifest.json")
        if not os.path.exists(mpath):
            raise ValueError(f"no patch index at {folder} (manifest.json missing)")
        try:
            with open(mpath) as f:
                man = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"unreadable index manifest {mpath}: {e}") from None
        self = cls(machine, k, canvas, kind=man.get("kind", "flat"), nprobe=man.get("nprobe", 16),
                   pq_m=man.get("pq_m", 16), nlist=man.get("nlist"), merge=bool(man.get("merge", False)), _build=False)
        want = self.manifest()
        for key in ("format", "fingerprint", "machine", "boundary", "wrapped", "train_shape", "k", "canvas"):
            if man.get(key) != want[key]:
                raise ValueError(f"the patch index at {folder} does not match this machine: {key} is "
                                 f"{man.get(key)!r} there but {want[key]!r} here; rebuild it")
        if [(p.get("label"), p.get("cls"), p.get("n_total")) for p in man.get("parts", [])] != \
                [(p["label"], p["cls"], p["n_total"]) for p in want["parts"]]:
            raise ValueError(f"the patch index at {folder} has other key classes than this machine; rebuild it")
        for p, meta in zip(self.parts, man["parts"]):
            path = os.path.join(folder, meta["file"])
            try:
                p.index = faiss.read_index(path)
            except RuntimeError as e:
                raise ValueError(f"corrupt or unreadable index file {path}: {str(e).splitlines()[0][:200]}") from None
            self._load_keys(p, os.path.join(folder, meta.get("keys", "")))
            want_d = self._pq_dims()[1] if meta.get("index") == "ivfpq" else self.d
            if p.index.ntotal != len(p.keys) or p.index.d != want_d:
                raise ValueError(f"index file {path} holds {p.index.ntotal} vectors of size {p.index.d}, "
                                 f"expected {len(p.keys)} of size {want_d}; rebuild it")
            if hasattr(p.index, "nprobe"):
                p.index.nprobe = min(self.nprobe, p.index.nlist)
        self.build_seconds = man.get("build_seconds", 0.0)
        return self

    def _load_keys(self, part: Part, path: str) -> None:
        """The part's key ids and multiplicities from ``path`` (npz, no pickles), checked against the part."""
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, count = np.asarray(z["keys"], np.int64), np.asarray(z["count"], np.float64)
        except Exception as e:  # zip / format errors of every kind: the file is not what save() wrote
            raise ValueError(f"corrupt or unreadable key file {path}: {type(e).__name__}: {e}") from None
        n, p = np.divmod(keys, part.HW)
        bad = keys.ndim != 1 or (len(count) not in (0, len(keys))) or \
            (len(count) and (not np.all(count >= 1) or int(count.sum()) != part.n_total)) or \
            (not len(count) and len(keys) != part.n_total) or \
            not np.all(np.isin(n, part.images)) or not np.all(np.isin(p, part.kpos))
        if bad:
            raise ValueError(f"key file {path} does not describe this part's {part.n_total} keys; rebuild the index")
        part.keys, part.count = keys, (count if len(count) else None)

    @classmethod
    def open(cls, folder: Optional[str], machine, k: int, canvas=None, **kw) -> "PatchIndex":
        """Load the index in ``folder`` if it matches, else build it (and save it there when ``folder``)."""
        if folder is not None and os.path.exists(os.path.join(folder, "manifest.json")):
            return cls.load(folder, machine, k, canvas)
        idx = cls(machine, k, canvas, **kw)
        if folder is not None:
            idx.save(folder)
        return idx

    def memory_bytes(self) -> int:
        """Approximate bytes the FAISS structures hold."""
        total = 0
        for p in self.parts:
            n = len(p.keys)
            total += 0 if p.count is None else n * 8  # multiplicities
            kind = self._part_kind(p)
            total += n * (self.d * 4 if kind in ("flat", "ivf") else self._pq_dims()[0]) + n * 8
        return total


def exact_topm_ids(index: PatchIndex, part: Part, queries: np.ndarray, m: int) -> np.ndarray:
    """The true ``m`` nearest keys (global ids) of ``queries`` (already divided by ``a``) in ``part``,
    by brute force over the key vectors (streamed; for measuring recall)."""
    q = np.asarray(queries, dtype=np.float64)
    best_d = np.full((len(q), 0), np.inf)
    best_i = np.zeros((len(q), 0), np.int64)
    qq = (q * q).sum(1, keepdims=True)
    off = 0
    for chunk in index._key_chunks(part, chunk=1 << 18):
        kc = chunk.astype(np.float64)
        d = qq - 2 * q @ kc.T + (kc * kc).sum(1)[None]
        alld = np.concatenate([best_d, d], 1)
        alli = np.concatenate([best_i, np.broadcast_to(np.arange(off, off + len(kc)), d.shape)], 1)
        keep = min(m, alld.shape[1])
        sel = np.argpartition(alld, keep - 1, axis=1)[:, :keep]
        best_d, best_i = np.take_along_axis(alld, sel, 1), np.take_along_axis(alli, sel, 1)
        off += len(kc)
    return part.keys[best_i]


def measure_recall(index: PatchIndex, x, t, labels=None, m: int = 64, n_pixels: int = 256, seed: int = 0) -> float:
    """Fraction of the true ``m`` nearest keys that ``index`` retrieves, over ``n_pixels`` random query
    pixels of ``x`` (brute-force ground truth)."""
    xt = to_tensor(x, "x").float().cpu()
    B = xt.shape[0]
    a, _ = index.machine.schedule.coefficients(check_t(t, B))
    lab = None if labels is None else to_labels(labels, B)
    rng = np.random.default_rng(seed)
    hits = total = 0
    for part in index.parts:
        bs = np.arange(B) if part.label is None else np.nonzero(lab == part.label)[0]
        if len(bs) == 0:
            continue
        share = max(1, int(round(n_pixels * len(part.qpix) * len(bs) / (B * index.canvas[0] * index.canvas[1]))))
        q = patch_vectors(xt[torch.as_tensor(bs)], part.qpix, index.k, index.keyset.query_pad)
        q = q / np.repeat(a[bs], len(part.qpix)).astype(np.float32)[:, None]
        rows = rng.choice(len(q), min(share, len(q)), replace=False)
        qs = np.ascontiguousarray(q[rows])
        mm = min(m, len(part.keys))
        truth = exact_topm_ids(index, part, qs, mm)
        _, ids = part.index.search(_pad_to(qs, part.index.d), mm)
        got = np.where(ids >= 0, part.keys[np.clip(ids, 0, None)], -2)
        for tr, g in zip(truth, got):
            hits += len(np.intersect1d(tr, g))
            total += mm
    return hits / max(total, 1)


class IndexedDenoiser:
    """A machine + k-schedule denoiser that uses patch indexes where they are provably accurate.

    Every call with ``t <= t_max`` first runs the approximate machine (``m`` nearest keys per pixel)
    and then, by ``mode``:

    - ``"pixel"`` (default): every pixel whose bound exceeds ``tol`` (data units) is recomputed by the
      exact engine (only those pixels, image by image: ``Machine.denoise(pixels=...)``); the others
      keep the index value, so every output pixel is within ``tol`` of the exact machine (conditional
      on retrieval for IVF indexes). When more than ``max_exact_fraction`` of the pixels need the
      exact engine, the whole call runs exactly (cheaper than image by image).
    - ``"step"``: the index result is used only if the largest bound of the whole call is within
      ``tol``; otherwise the exact engine reruns the whole call.
    - ``"measured"``: the index result is used at every ``t <= t_max`` whatever its bound (which is
      still recorded). For data where the worst-case bound is loose (on MNIST millions of near-blank
      patches are nearly tied, so it is vacuous), choose ``t_max`` by measured agreement with
      :func:`calibrate_t_max` on calibration seeds.

    Calls with ``t > t_max`` run exactly. ``record`` lists, per call, ``t``, ``k``, the path used
    (``index``, ``mixed`` or ``exact``), the fraction of pixels computed exactly, the bound of the kept
    index pixels (max, mean) and the seconds taken. Indexes are built once per ``k`` and cached in
    memory, and on disk under ``cache_dir`` (one folder per k) when given.
    """

    MODES = ("pixel", "step", "measured")

    def __init__(self, machine, k, *, tol: float = 1e-3, m: int = 64, t_max: float = 1.0, mode: str = "pixel",
                 max_exact_fraction: float = 0.5, cache_dir: Optional[str] = None, canvas=None, progress: bool = False, **index_kw):
        from .denoisers import MachineDenoiser

        if not tol >= 0:
            raise ValueError(f"tol must be non-negative, got {tol}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.exact = MachineDenoiser(machine, k)
        self.machine, self.schedule = machine, machine.schedule
        self.tol, self.m, self.t_max, self.mode = float(tol), int(m), float(t_max), mode
        self.max_exact_fraction = float(max_exact_fraction)
        self.cache_dir, self.canvas, self.progress, self.index_kw = cache_dir, canvas, progress, index_kw
        self.indexes: Dict[int, PatchIndex] = {}
        self.record: List[dict] = []

    def index(self, k: int) -> PatchIndex:
        if k not in self.indexes:
            folder = None if self.cache_dir is None else os.path.join(self.cache_dir, f"k{k}")
            self.indexes[k] = PatchIndex.open(folder, self.machine, k, self.canvas, progress=self.progress,
                                              **self.index_kw)
        return self.indexes[k]

    def __call__(self, x, t, labels=None):
        k = self.exact.k_at(float(t))
        t0 = time.perf_counter()
        entry = {"t": float(t), "k": k}
        if float(t) > self.t_max:
            return self._finish(entry, t0, self.exact(x, t, labels), "exact", 1.0)
        res = self.index(k).denoise(x, t, labels, self.m)
        bound = res.bound
        x0 = res.x0.to(x.dtype) if torch.is_tensor(x) else res.x0.numpy()
        if self.mode == "measured":
            entry.update(bound_max=float(bound.max()), bound_mean=float(bound.mean()))
            return self._finish(entry, t0, x0, "index", 0.0)
        bad = bound > self.tol
        if self.mode == "step" or not bool(bad.any()) or float(bad.float().mean()) > self.max_exact_fraction:
            entry.update(bound_max=float(bound.max()), bound_mean=float(bound.mean()))
            if not bool(bad.any()):
                return self._finish(entry, t0, x0, "index", 0.0)
            return self._finish(entry, t0, self.exact(x, t, labels), "exact", 1.0)
        kept = bound[~bad]
        entry.update(bound_max=float(kept.max()) if len(kept) else 0.0,
                     bound_mean=float(kept.mean()) if len(kept) else 0.0)
        xt = torch.as_tensor(x)
        out = torch.as_tensor(x0).clone()
        tt = np.broadcast_to(np.asarray(t, dtype=np.float64), (xt.shape[0],))
        for b in np.nonzero(bad.reshape(len(bad), -1).any(1).numpy())[0]:
            lab = None if labels is None else torch.as_tensor(np.asarray(labels))[b : b + 1]
            mask = bad[b]
            ex = self.machine.denoise(xt[b : b + 1], float(tt[b]), k, lab, pixels=mask)
            out[b][:, mask.to(out.device)] = ex[0][:, mask.to(ex.device)].to(out.dtype)
        frac = float(bad.float().mean())
        return self._finish(entry, t0, out if torch.is_tensor(x) else out.numpy(), "mixed", frac)

    def _finish(self, entry, t0, out, used, exact_fraction):
        entry.update(used=used, exact_fraction=exact_fraction, seconds=time.perf_counter() - t0)
        self.record.append(entry)
        return out


def calibrate_t_max(machine, k, x1, labels=None, *, target_r: float = 0.999, steps: int = 20, t_max: float = 0.5,
                    m: int = 64, states: Optional[List[torch.Tensor]] = None, indexes: Optional[Dict[int, PatchIndex]] = None,
                    progress: bool = False, **index_kw) -> Tuple[float, List[dict]]:
    """The largest switch time ``t_s <= t_max`` of the ``steps``-step DDIM grid such that running the
    patch index at every ``t <= t_s`` (exact above) keeps every calibration sample's Pearson r with the
    exact engine's sample at least ``target_r``; 0.0 when no switch time does.

    ``x1``: calibration noise ``(B, C, H, W)`` (use other seeds than the ones you evaluate on).
    ``states``: the exact trajectory ``[x_1, x_t1, ..., x_0]`` if already computed (else it is run
    here). Switch times are tried from the latest (fewest index steps) upwards and the search stops at
    the first one that fails. Returns ``(t_s, report)``, one report row per switch time tried.
    """
    from .denoisers import MachineDenoiser
    from .metrics import pearson_r
    from .sampling import ddim, time_grid, update

    grid = time_grid(steps)
    if states is None:
        states = []
        final = ddim(MachineDenoiser(machine, k), torch.as_tensor(x1).float(), labels, steps=steps,
                     schedule=machine.schedule, callback=lambda i, t, x, x0: states.append(x.clone()), progress=False)
        states.append(final)
    if len(states) != steps + 1:
        raise ValueError(f"states must hold the {steps + 1} states of the exact trajectory, got {len(states)}")
    pol = IndexedDenoiser(machine, k, m=m, t_max=1.0, mode="measured", progress=progress, **index_kw)
    if indexes:
        pol.indexes.update(indexes)
    report, best = [], 0.0
    for i in [i for i in range(steps - 1, -1, -1) if grid[i] <= t_max]:
        x = states[i].clone()
        for j in range(i, steps):
            t, t1 = float(grid[j]), float(grid[j + 1])
            x = update(machine.schedule, x, pol(x, t, labels), t, t1)
        r = pearson_r(states[-1], x)
        report.append({"t_switch": float(grid[i]), "index_steps": steps - i, "r_min": float(np.min(r)),
                       "r_median": float(np.median(r))})
        if float(np.min(r)) < target_r:
            break
        best = float(grid[i])
    return best, report
