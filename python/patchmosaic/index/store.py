"""Patch indexes on disk: one FAISS file and one key file (npz, no pickles) per part, and a JSON manifest
(data fingerprint, machine, k, canvas, parts, index type) written last, so a partial save is never valid.
An index is refused when its manifest does not match the machine it is loaded for."""

from __future__ import annotations

import json
import os

import numpy as np

from ..io.files import write_with
from ..io.runstate import file_digest, write_json
from .vectors import faiss_module

FORMAT = "patchmosaic-index-2"  # 2: SHA-256 of every part file in the manifest


def manifest(index) -> dict:
    m = index.machine
    return {"format": FORMAT, "fingerprint": index.fingerprint, "machine": type(m).__name__,
            "boundary": getattr(m, "boundary", None), "wrapped": getattr(m, "wrapped", None),
            "train_shape": list(m.images.shape), "k": index.k, "canvas": list(index.canvas), "kind": index.kind,
            "patch_mask": None if index.patch_mask is None else index.patch_mask.tolist(),
            "nprobe": index.nprobe, "pq_m": index.pq_m, "nlist": index.nlist, "merge": index.merge,
            "min_index_keys": index.min_index_keys,
            "parts": [{"label": p.label, "cls": p.cls, "n_total": int(p.n_total), "n_keys": int(len(p.keys)),
                       "file": f"part_{i}.faiss", "keys": f"part_{i}.keys.npz", "index": index.part_kind(p)}
                      for i, p in enumerate(index.parts)],
            "build_seconds": round(index.build_seconds, 2)}


def exists(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "manifest.json"))


def write(index, folder: str) -> None:
    faiss = faiss_module()
    os.makedirs(folder, exist_ok=True)
    man = manifest(index)
    mpath = os.path.join(folder, "manifest.json")
    if os.path.exists(mpath):
        os.remove(mpath)
    for p, meta in zip(index.parts, man["parts"]):
        path, keys = os.path.join(folder, meta["file"]), os.path.join(folder, meta["keys"])
        write_with(path, lambda tmp: faiss.write_index(p.index, tmp))
        write_with(keys, lambda tmp: np.savez(tmp, keys=p.keys, count=np.ones(0) if p.count is None else p.count),
                   suffix=".npz")
        meta["sha256"], meta["keys_sha256"] = file_digest(path), file_digest(keys)
    write_json(mpath, man)


def read_manifest(folder: str) -> dict:
    mpath = os.path.join(folder, "manifest.json")
    if not os.path.exists(mpath):
        raise ValueError(f"no patch index at {folder} (manifest.json missing)")
    try:
        with open(mpath) as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable index manifest {mpath}: {e}") from None
    check_manifest(man, mpath)
    return man


# the manifest's entries and their JSON types (None allowed where the value may be null)
_TYPES = {"format": (str,), "fingerprint": (str,), "machine": (str,), "k": (int,), "kind": (str,),
          "train_shape": (list,), "canvas": (list,), "parts": (list,), "nprobe": (int,), "pq_m": (int,),
          "nlist": (int, type(None)), "merge": (bool,), "build_seconds": (int, float), "min_index_keys": (int,)}
_PART_TYPES = {"file": (str,), "keys": (str,), "n_total": (int,), "n_keys": (int,), "index": (str,),
               "sha256": (str,), "keys_sha256": (str,)}


def check_manifest(man, mpath: str) -> None:
    """A ValueError naming ``mpath`` unless ``man`` is a manifest this package writes: a JSON object with entries
    of the right types, ``parts`` a list of objects whose files are plain names inside the index folder."""
    def bad(what):
        raise ValueError(f"index manifest {mpath} is not a patch index manifest: {what}; rebuild the index")

    if not isinstance(man, dict):
        bad(f"it holds a JSON {type(man).__name__}, not an object")
    for key, types in _TYPES.items():
        if key in man and (not isinstance(man[key], types) or (isinstance(man[key], bool) and bool not in types)):
            bad(f"{key!r} is {man[key]!r}")
    for i, part in enumerate(man.get("parts", [])):
        if not isinstance(part, dict):
            bad(f"part {i} is not an object")
        for key, types in _PART_TYPES.items():
            if key in part and (not isinstance(part[key], types) or isinstance(part[key], bool)):
                bad(f"part {i}'s {key!r} is {part[key]!r}")
        for key in ("file", "keys"):
            name = part.get(key, "")
            if os.path.basename(name) != name or name in ("", ".", ".."):
                bad(f"part {i}'s {key!r} {name!r} is not a file name inside the index folder")


def read_into(index, folder: str, man: dict) -> None:
    """Fill ``index`` (constructed for the machine, not built) with the parts saved in ``folder``."""
    faiss = faiss_module()
    want = manifest(index)
    for key in ("format", "fingerprint", "machine", "boundary", "wrapped", "train_shape", "k", "canvas",
                "patch_mask"):
        if man.get(key) != want[key]:
            raise ValueError(f"the patch index at {folder} does not match this machine: {key} is "
                             f"{man.get(key)!r} there but {want[key]!r} here; rebuild it")
    if [(p.get("label"), p.get("cls"), p.get("n_total")) for p in man.get("parts", [])] != \
            [(p["label"], p["cls"], p["n_total"]) for p in want["parts"]]:
        raise ValueError(f"the patch index at {folder} has other key classes than this machine; rebuild it")
    for p, meta in zip(index.parts, man["parts"]):
        path = os.path.join(folder, meta["file"])
        for name, key in ((meta["file"], "sha256"), (meta.get("keys", ""), "keys_sha256")):
            f = os.path.join(folder, name)
            if not os.path.exists(f) or key not in meta or file_digest(f) != meta[key]:
                raise ValueError(f"index file {f} is missing or is not the file this index saved (its SHA-256 "
                                 "differs from the manifest's); rebuild the index")
        try:
            p.index = faiss.read_index(path)
        except RuntimeError as e:
            raise ValueError(f"corrupt or unreadable index file {path}: {str(e).splitlines()[0][:200]}") from None
        # the part's kind is the index the file holds (whether its bound is exact or conditional on retrieval
        # depends on it), checked against the manifest's
        p.kind = faiss_kind(faiss, p.index)
        if p.kind != meta.get("index"):
            raise ValueError(f"index file {path} holds {p.kind!r} index but the manifest says "
                             f"{meta.get('index')!r}; rebuild the index")
        load_keys(p, os.path.join(folder, meta.get("keys", "")))
        want_d = index.pq_dims()[1] if p.kind == "ivfpq" else index.d
        if p.index.ntotal != len(p.keys) or p.index.d != want_d:
            raise ValueError(f"index file {path} holds {p.index.ntotal} vectors of size {p.index.d}, "
                             f"expected {len(p.keys)} of size {want_d}; rebuild it")
        if hasattr(p.index, "nprobe"):
            p.index.nprobe = min(index.nprobe, p.index.nlist)
    index.build_seconds = man.get("build_seconds", 0.0)


def faiss_kind(faiss, index) -> str:
    """``"flat"``, ``"ivf"`` or ``"ivfpq"``: the kind of a FAISS index this package builds (a ValueError for any
    other)."""
    for cls, kind in ((faiss.IndexFlat, "flat"), (faiss.IndexIVFPQ, "ivfpq"), (faiss.IndexIVFFlat, "ivf")):
        if isinstance(index, cls):
            return kind
    raise ValueError(f"a patch index part holds a FAISS {type(index).__name__}, which this package does not build")


def load_keys(part, path: str) -> None:
    """The part's key ids and multiplicities from ``path`` (npz, no pickles), checked against the part."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, count = np.asarray(z["keys"], np.int64), np.asarray(z["count"], np.float64)
    except Exception as e:  # zip / format errors of every kind: the file is not what write() wrote
        raise ValueError(f"corrupt or unreadable key file {path}: {type(e).__name__}: {e}") from None
    n, p = np.divmod(keys, part.HW)
    bad = keys.ndim != 1 or (len(count) not in (0, len(keys))) or \
        (len(count) and (not np.all(count >= 1) or int(count.sum()) != part.n_total)) or \
        (not len(count) and len(keys) != part.n_total) or \
        not np.all(np.isin(n, part.images)) or not np.all(np.isin(p, part.kpos))
    if bad:
        raise ValueError(f"key file {path} does not describe this part's {part.n_total} keys; rebuild the index")
    part.keys, part.count = keys, (count if len(count) else None)
