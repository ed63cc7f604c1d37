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

The error bound of the approximation is bound.py's; the query path is query.py's.

Indexes are saved with a JSON manifest (store.py: data fingerprint, machine, k, canvas, parts, index type)
and refused when the manifest does not match the machine they are loaded for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..io.progress import Progress
from ..ops.masks import check_patch_mask
from ..validation import ResourceError, available_memory, check_k
from . import query, store
from .vectors import faiss_module, fingerprint_data, key_vectors, masked_columns, pad_to, row_hashes

KINDS = ("auto", "flat", "ivf", "ivfpq")


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
    kind: Optional[str] = None  # the FAISS index the part holds ("flat", "ivf", "ivfpq"), once built or loaded
    absmax: float = float("inf")  # the largest |value| of the part's images (bounds its key vectors' norms)
    keys: np.ndarray = field(init=False)
    count: Optional[np.ndarray] = field(init=False, default=None)
    n_total: int = field(init=False)

    def __post_init__(self):
        self.keys = (self.images.astype(np.int64)[:, None] * self.HW + self.kpos.astype(np.int64)[None, :]).ravel()
        self.n_total = len(self.keys)


# The Args entries of the index options that IndexedDenoiser and calibrate_t_max pass on to PatchIndex
# (None: PatchIndex's own default), written once for their docstrings.
INDEX_OPTION_ARGS = '''        kind: the FAISS index: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"ivfpq"``.
        nlist: inverted lists per index part (IVF kinds).
        nprobe: inverted lists searched per query (IVF kinds).
        pq_m: product-quantiser sub-vectors (``"ivfpq"``).
        flat_budget: bytes of index vectors up to which ``"auto"`` chooses a flat index.
        min_index_keys: parts with at most this many keys always use a flat index.
        merge: store each distinct key patch once, with its multiplicity.
            For each of ``kind`` to ``merge``, None (default) keeps :class:`patchmosaic.PatchIndex`'s own
            default (``"auto"``, about sqrt(keys) lists, 16, 16, a quarter of the available memory, 20000,
            True).
'''


def check_canvas_size(canvas, machine) -> Tuple[int, int]:
    """``(Hq, Wq)`` of the queries an index serves: the training size for None, else two integers in 1..65536 (a
    ValueError naming ``canvas`` otherwise)."""
    if canvas is None:
        return int(machine.H), int(machine.W)
    if not (isinstance(canvas, (tuple, list)) and len(canvas) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= 1 << 16 for v in canvas)):
        raise ValueError(f"canvas must be None or (Hq, Wq), two integers in 1..65536, got {canvas!r}")
    return int(canvas[0]), int(canvas[1])


class PatchIndex:
    """A FAISS index over the key patches of ``machine`` at patch size ``k`` for ``canvas`` queries.

    Construction merges duplicate key patches (with ``merge``) and builds one FAISS index per (label, key
    class) part; :meth:`load` reads a saved one instead, and :meth:`open` does whichever applies.

    Args:
        machine: a local machine (:class:`patchmosaic.LS` or :class:`patchmosaic.ELS`; IS has no patches: a
            ValueError).
        k: the patch size, an odd positive int no larger than the machine's useful size for ``canvas``.
        canvas: ``(Hq, Wq)`` of the queries the index serves; None (default): the training size ``(H, W)``.
        kind: ``"flat"`` (exact, ``IndexFlatL2``), ``"ivf"`` (``IndexIVFFlat``), ``"ivfpq"`` (``IndexIVFPQ``,
            for when raw patches would not fit in memory) or ``"auto"`` (default: flat while its vectors take
            at most ``flat_budget`` bytes, else ivfpq).
        nlist: inverted lists per part (IVF kinds), a positive int; None (default): about sqrt(keys), at
            least 16 and at most 65536.
        nprobe: inverted lists searched per query (IVF kinds), a positive int (default 16; at most ``nlist``
            are searched).
        pq_m: product-quantiser sub-vectors (``"ivfpq"``), a positive int (default 16; vectors are zero-padded
            to a multiple of it).
        flat_budget: bytes of index vectors up to which ``"auto"`` chooses a flat index; None (default): a
            quarter of the available memory.
        min_index_keys: parts with at most this many keys always use a flat index (default 20000).
        merge: store each distinct key patch once with its multiplicity (default True; exact, since identical
            patches have identical centres; on MNIST it removes the thousands of blank patches that tie at the
            top and would make the bound vacuous at low noise; at high noise the bound stays loose there).
        progress: progress bars on stderr while duplicates are merged and parts are built (default True;
            shown only on a terminal).
        patch_mask: a ``(k, k)`` neighbourhood mask shared by every pixel, boolean or non-negative weights, as
            for :meth:`patchmosaic.Machine.denoise` (the index then holds the masked patch vectors: the mask's
            elements times ``sqrt`` of their weights, and serves ``denoise(..., patch_mask=...)``); None
            (default): the square patch. A mask per pixel is not supported by the index (ValueError).
    """

    def __init__(self, machine, k: int, canvas: Optional[Tuple[int, int]] = None, *, kind: str = "auto",
                 nlist: Optional[int] = None, nprobe: int = 16, pq_m: int = 16, flat_budget: Optional[int] = None,
                 min_index_keys: int = 20000, merge: bool = True, progress: bool = True, patch_mask=None):
        if flat_budget is not None and (isinstance(flat_budget, bool) or not isinstance(
                flat_budget, (int, np.integer)) or flat_budget < 0):
            raise ValueError(f"flat_budget must be a non-negative integer number of bytes or None, got {flat_budget!r}")
        self._setup(machine, k, canvas, kind, nlist, nprobe, pq_m, min_index_keys, merge, patch_mask)
        self.check_memory(kind)  # from the shapes (and a sample of keys), before any key is hashed or indexed
        t0 = time.perf_counter()
        if self.merge:
            bar = Progress(len(self.parts), f"merge duplicates k={self.k}", enabled=progress)
            for part in self.parts:
                self._merge_duplicates(part)
                bar.update(postfix=f"{part.n_total} -> {len(part.keys)} keys")
            bar.close()
        if kind == "auto":
            n_keys = sum(len(p.keys) for p in self.parts)
            budget = available_memory() // 4 if flat_budget is None else int(flat_budget)
            kind = "flat" if n_keys * self.d * 4 <= budget else "ivfpq"
        self.kind = kind
        self._build_all(progress)
        self.build_seconds = time.perf_counter() - t0

    # ----- construction -------------------------------------------------------------------
    def _setup(self, machine, k, canvas, kind, nlist, nprobe, pq_m, min_index_keys, merge, patch_mask=None) -> None:
        """Check the arguments and set up the parts (their keys not yet merged or indexed): what a built
        and a loaded index share. ``kind`` is checked, not stored (``"auto"`` is resolved by the caller)."""
        if not all(hasattr(machine, a) for a in ("local", "keyset", "schedule")):
            raise TypeError(f"a patch index is built over a machine (pm.ELS, pm.LS), got {type(machine).__name__}")
        if not machine.local:
            raise ValueError("a patch index serves the local machines (LS, ELS); IS has no patches")
        if machine.rule is None:
            raise ValueError(f"a patch index serves the machines with a key set of patches (LS, ELS); "
                             f"{type(machine).__name__} has no key set of patches")
        if getattr(machine, "soft", None) is not None:
            raise ValueError(f"a patch index serves square patches or a mask given to it; this machine is soft "
                             f"(soft={machine.soft}): build the index with patch_mask=, or use the exact machine")
        if not getattr(machine, "centre_response", True):
            raise ValueError("a patch index serves the centre response (each pixel's own value); this LS averages "
                             f"patches (response={machine.response!r}): use the exact machine")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, v, least in (("nprobe", nprobe, 1), ("pq_m", pq_m, 1), ("nlist", nlist, 1),
                               ("min_index_keys", min_index_keys, 0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least):
                raise ValueError(f"{name} must be an integer >= {least}{' or None' if name == 'nlist' else ''}, "
                                 f"got {v!r}")
        if not isinstance(merge, (bool, np.bool_)):
            raise ValueError(f"merge must be True or False, got {merge!r}")
        self.machine = machine
        self.k = check_k(k, machine.H, machine.W)
        self.canvas = check_canvas_size(canvas, machine)
        if machine.effective_k(self.k, *self.canvas) != self.k:
            raise ValueError(f"patch size k={self.k} is larger than any useful one for this machine and canvas "
                             f"(at most {machine.effective_k(self.k, *self.canvas)}: a larger patch only adds zero "
                             "padding); build the index at that size")
        machine.check_canvas(*self.canvas, self.k)
        self.keyset = machine.keyset(self.canvas[0], self.canvas[1], self.k)
        self._set_mask(patch_mask, machine.C)
        self.nprobe, self.pq_m, self.nlist, self.min_index_keys = int(nprobe), int(pq_m), nlist, int(min_index_keys)
        self.fingerprint = fingerprint_data(machine.images, machine.labels)
        self.parts: List[Part] = self._parts()
        self.merge = bool(merge)
        self.build_seconds = 0.0

    def _set_mask(self, patch_mask, C: int) -> None:
        """The index's neighbourhood: ``patch_mask`` (float64 ``(k, k)`` numpy, or None), the columns of the
        square patch vectors it keeps and their scales (None: all, 1), and the vector size ``d``."""
        self.patch_mask, self.mask_columns, self.mask_scale = None, None, None
        self.d = C * self.k * self.k
        if patch_mask is None:
            return
        w = check_patch_mask(patch_mask)
        if w.dim() != 2:
            raise ValueError("a patch index takes one (k, k) mask shared by every pixel; a mask per pixel is not "
                             "supported (use the exact machine)")
        if w.shape[0] != self.k:
            raise ValueError(f"patch_mask is {w.shape[0]}x{w.shape[1]} but the index's patch size is k={self.k}")
        self.patch_mask = w.numpy().copy()  # (never a view of the caller's mask: it may change it later)
        flat = np.tile(self.patch_mask.ravel(), C)  # the weight of every column, (channel, row, column) order
        cols = np.nonzero(flat > 0)[0]
        if len(cols) == len(flat) and bool(np.all(flat == 1.0)):
            return  # a full mask of ones: the square patch
        self.mask_columns = cols
        self.mask_scale = None if bool(np.all(flat[cols] == 1.0)) else np.sqrt(flat[cols]).astype(np.float32)
        self.d = len(cols)

    def _parts(self) -> List[Part]:
        m = self.machine
        HW = m.H * m.W
        groups = list(m.images_by_label().items())
        parts = []
        for label, imgs in groups:
            vals = m.images[torch.as_tensor(imgs, dtype=torch.long)]
            rng = float(vals.max() - vals.min())
            absmax = float(vals.abs().max())
            for c, (qpix, kpos) in enumerate(self.keyset.classes()):
                parts.append(Part(label, c, np.asarray(qpix, np.int64), np.asarray(imgs, np.int64),
                                  np.asarray(kpos, np.int64), HW, rng, absmax=absmax))
        return parts

    SAMPLE_KEYS = 1 << 16  # keys hashed to estimate how many distinct ones merging leaves

    def key_norm_bound(self, part: Part) -> float:
        """An upper bound on the Euclidean norm of every key vector of ``part`` (its values at most ``absmax`` in
        size, times the mask's square-root weights; zero padding only lowers it)."""
        weight = self.d if self.mask_scale is None else float(np.sum(self.mask_scale.astype(np.float64) ** 2))
        return part.absmax * float(np.sqrt(weight * (1 + 1e-6)))

    def bytes_per_key(self, kind: str) -> int:
        """Bytes an index of ``kind`` holds per key: its vector (or PQ code), its id and multiplicity."""
        return (self.pq_dims()[0] if kind == "ivfpq" else self.d * 4) + 16

    def check_memory(self, kind: str) -> None:
        """Refuse (:class:`patchmosaic.ResourceError`) an index whose parts together would not fit in the available
        memory, before any key is hashed or indexed: the merge's working memory (hashes and their sort for the
        largest part), and the index of every part. Without merging that is exact; with merging (only a flat or
        IVF index can be too large) the keys left are estimated from a sample of :data:`SAMPLE_KEYS` keys, on the
        low side (the smaller of a collision count's and the sample's singletons' estimate), so that only a request
        that would not fit is refused."""
        totals = [p.n_total for p in self.parts]
        n_total, largest = sum(totals), max(totals, default=0)
        avail = available_memory()
        size = f"{n_total:,} keys of {self.d} values (k = {self.k}, {len(self.parts)} parts)"
        if self.merge:
            need = largest * 64 + min(largest, 1 << 18) * self.d * 12
            if need > avail:
                raise ResourceError(f"merging the duplicate patches of the largest part ({largest:,} keys) needs about "
                                    f"{need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB available; use "
                                    "fewer training images or merge=False")
        kinds = {"auto": "ivfpq"}.get(kind, kind)  # auto falls back to IVF-PQ when flat does not fit
        per = self.bytes_per_key(kinds)
        if n_total * per <= avail:
            return
        keys, how = n_total, "without merging"
        if self.merge and kinds != "ivfpq":
            keys, share = self._estimate_distinct(n_total)
            how = f"after merging duplicates: about {share:.0%} of them distinct, estimated from a sample"
        if keys * per > avail:
            article = "an" if kinds[0] in "aeiou" else "a"
            raise ResourceError(
                f"{article} {kinds} patch index of {size} needs about {keys * per / 2**30:.1f} GiB {how}, more than "
                f"the {avail / 2**30:.1f} GiB available; use kind='ivfpq' (compressed) or 'auto', fewer training "
                "images or a smaller k")

    def _estimate_distinct(self, n_total: int):
        """``(keys, fraction)``: a low estimate of the keys merging would leave, from the hashes of a random sample
        of keys (duplicates merge within a part only)."""
        s = min(n_total, self.SAMPLE_KEYS)
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(n_total, size=s, replace=False))
        starts = np.cumsum([0] + [p.n_total for p in self.parts])
        hashes = []
        m = self.machine
        for i, part in enumerate(self.parts):
            mine = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
            for c in range(0, len(mine), 8192):
                v = key_vectors(m.images, part.keys[mine[c : c + 8192]], m.H, m.W, self.k, self.keyset.key_pad)
                h = row_hashes(masked_columns(v, self.mask_columns, self.mask_scale))
                h[:, 0] ^= np.uint64(i)  # keys of different parts never merge
                hashes.append(h)
        h = np.concatenate(hashes)
        _, counts = np.unique(h.view([("a", np.uint64), ("b", np.uint64)]).ravel(), return_counts=True)
        if s == n_total:
            return len(counts), len(counts) / n_total
        singles = int((counts == 1).sum())
        by_singles = (len(counts) - singles) + singles * n_total / s  # repeated values once, singletons scaled up
        pairs = float((counts * (counts - 1) / 2).sum())
        by_pairs = s * (s - 1) / 2 / pairs if pairs else float(n_total)  # equally likely values: E[pairs] = C(s,2)/D
        keys = int(min(by_singles, by_pairs, n_total))
        return keys, keys / n_total

    PQ_CODES = 256  # an IVF-PQ part trains 2^8 centroids per sub-quantiser: it needs at least this many keys

    def part_kind(self, part: Part) -> str:
        """The index of one part: the one it holds once built or loaded; before that, flat for a flat index, for a
        part of at most ``min_index_keys`` keys, and for an IVF-PQ part too small to train its codebooks (fewer
        than :data:`PQ_CODES` keys)."""
        if part.kind is not None:
            return part.kind
        n = len(part.keys)
        if self.kind == "flat" or n <= self.min_index_keys or (self.kind == "ivfpq" and n < self.PQ_CODES):
            return "flat"
        return self.kind

    def key_chunks(self, part: Part, chunk: int = 1 << 18):
        """Yield the part's key vectors in index order, ``chunk`` keys at a time."""
        m = self.machine
        for s in range(0, len(part.keys), chunk):
            v = key_vectors(m.images, part.keys[s : s + chunk], m.H, m.W, self.k, self.keyset.key_pad)
            yield masked_columns(v, self.mask_columns, self.mask_scale)

    def _merge_duplicates(self, part: Part) -> None:
        """Keep one key per distinct patch (the first in index order) with its multiplicity."""
        h = np.concatenate([row_hashes(v) for v in self.key_chunks(part)])
        _, first, counts = np.unique(h.view([("a", np.uint64), ("b", np.uint64)]).ravel(), return_index=True,
                                     return_counts=True)
        if len(first) == len(part.keys):
            return
        order = np.argsort(first)
        part.keys = part.keys[first[order]]
        part.count = counts[order].astype(np.float64)

    def _build_all(self, progress: bool):
        faiss = faiss_module()
        need = sum(len(p.keys) for p in self.parts) * self.bytes_per_key(self.kind)
        if self.kind in ("flat", "ivf") and need > available_memory():  # exact now: the keys left after merging
            article = "an" if self.kind[0] in "aeiou" else "a"
            keys = sum(len(p.keys) for p in self.parts)
            raise ResourceError(f"{article} {self.kind} patch index of {keys:,} distinct keys of {self.d} values needs "
                                f"{need / 2**30:.1f} GiB, more than the {available_memory() / 2**30:.1f} GiB available; "
                                "use kind='ivfpq' or 'auto'")
        bar = Progress(len(self.parts), f"index k={self.k}", enabled=progress)
        for part in self.parts:
            kind = self.part_kind(part)
            part.index = self._build_part(faiss, part)
            part.kind = kind
            bar.update(postfix=f"{len(part.keys)} keys, {self.part_kind(part)}")
        bar.close()

    def pq_dims(self) -> Tuple[int, int]:
        """(sub-quantisers, padded vector size) of an IVF-PQ part: vectors are zero-padded to a multiple
        of ``pq_m`` (distances unchanged), so every patch size gets ``pq_m`` sub-quantisers."""
        pq_m = max(1, min(self.pq_m, self.d))
        return pq_m, -(-self.d // pq_m) * pq_m

    def _build_part(self, faiss, part: Part):
        kind, d, n = self.part_kind(part), self.d, len(part.keys)
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        else:
            # k-means needs at least one key per list: a part with fewer keys than lists gets one list per key
            nlist = min(n, int(self.nlist or max(16, min(65536, int(np.sqrt(n))))))
            pq_m, d = self.pq_dims() if kind == "ivfpq" else (0, d)
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
            for chunk in self.key_chunks(part):
                sel = take[(take >= seen) & (take < seen + len(chunk))] - seen
                sample.append(chunk[sel])
                seen += len(chunk)
            index.train(pad_to(np.concatenate(sample), d))
            index.nprobe = min(self.nprobe, nlist)
        for chunk in self.key_chunks(part):
            index.add(pad_to(chunk, d))
        return index

    # ----- queries and persistence -----------------------------------------------------------
    def denoise(self, x, t, labels=None, m: int = 64, *, check_pixels: int = 64) -> "query.ApproxResult":
        """Approximate ``machine.denoise(x, t, k, labels)`` from the ``m`` nearest keys per pixel, with the
        per-pixel error bound of index/bound.py.

        Args:
            x: query ``(B, C, Hq, Wq)`` float32 on the CPU, numpy or torch; ``(Hq, Wq)`` the index's canvas.
            t: noise level in ``(0, 1]``, a float or ``(B,)``.
            labels: ``(B,)`` class per query image for a conditional machine, else None.
            m: candidates retrieved per pixel (default 64).
            check_pixels: for an inverted-file index (whose bound is conditional on retrieval), this many
                random pixels are computed exactly to check the bound (default 64; 0 skips the check and
                leaves ``bound_valid`` None). A failed check sets ``bound_valid=False`` and warns.

        Returns:
            an :class:`patchmosaic.index.ApproxResult` (``x0``, ``bound``, ``arg_key``, the retrieval fields).
        """
        if torch._C._functorch.maybe_current_level() is not None:
            raise NotImplementedError("the patch index's approximate machine has no gradient and runs under no "
                                      "torch.func transform (grad, jvp, vmap, ...); use the exact machine "
                                      "(Machine.denoise) where you need one")
        return query.approx_denoise(self, x, t, labels, m, check_pixels)

    def manifest(self) -> dict:
        """The JSON description saved beside the index (index/store.py)."""
        return store.manifest(self)

    def save(self, folder: str) -> None:
        """Write every part's FAISS index, key ids and ``manifest.json`` (last, so a partial save is never valid)."""
        store.write(self, folder)

    @classmethod
    def load(cls, folder: str, machine, k: int, canvas: Optional[Tuple[int, int]] = None, *,
             patch_mask=None, nprobe: Optional[int] = None) -> "PatchIndex":
        """Load an index saved by :meth:`save`; a ValueError if it was built for other data or settings (the
        neighbourhood mask ``patch_mask`` included). ``nprobe`` (a search setting, not a build one): the inverted
        lists searched per query; None (default): the saved index's."""
        man = store.read_manifest(folder)
        kind = man.get("kind", "flat")  # as built: never "auto"
        self = cls.__new__(cls)  # set up for the machine, then filled from the folder: nothing merged or built
        self._setup(machine, k, canvas, kind, man.get("nlist"), man.get("nprobe", 16) if nprobe is None else nprobe,
                    man.get("pq_m", 16), man.get("min_index_keys", 20000), bool(man.get("merge", False)), patch_mask)
        self.kind = kind
        store.read_into(self, folder, man)  # (each part's kind from the FAISS index its file holds)
        # the build settings the manifest records (an index saved before min_index_keys was recorded lacks it)
        self.saved_settings = {name: man[name] for name in cls.BUILD_SETTINGS if name in man}
        return self

    # the build settings a saved index must match when :meth:`open` is asked for them
    BUILD_SETTINGS = ("kind", "nlist", "pq_m", "min_index_keys", "merge")

    @classmethod
    def open(cls, folder: Optional[str], machine, k: int, canvas=None, **kw) -> "PatchIndex":
        """The index saved in ``folder`` if it holds one, else a new one, built with ``kw`` (saved there when
        ``folder`` is given).

        A saved index is checked against the machine, ``k``, the canvas and ``patch_mask`` (as :meth:`load`), and
        against every build setting in ``kw`` that its manifest records (``kind``: any for ``"auto"``; ``nlist``,
        ``pq_m``, ``min_index_keys``, ``merge``): a ValueError names a difference (remove the folder, or use another, to build
        one with the new settings). ``nprobe`` is a search setting: the loaded index takes the one asked for.
        ``flat_budget`` and ``progress`` concern building only."""
        if folder is not None and store.exists(folder):
            kind = kw.get("kind", "auto")
            if kind not in KINDS:
                raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
            idx = cls.load(folder, machine, k, canvas, patch_mask=kw.get("patch_mask"), nprobe=kw.get("nprobe"))
            for name in cls.BUILD_SETTINGS:
                want, have = kw.get(name), idx.saved_settings.get(name)
                if want is None or have is None or (name == "kind" and want == "auto"):
                    continue
                if (bool(want) if name == "merge" else want) != have:
                    raise ValueError(f"the patch index at {folder} was built with {name}={have!r}, not the "
                                     f"{name}={want!r} asked for; remove that folder (or use another) to build one "
                                     "with these settings")
            return idx
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
            kind = self.part_kind(p)
            total += n * (self.d * 4 if kind in ("flat", "ivf") else self.pq_dims()[0]) + n * 8
        return total
