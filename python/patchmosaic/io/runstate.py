"""Resumable runs: an npz state file written atomically, tied to a fingerprint of everything that changes
the run's results (settings, seeds, the training images' bytes, the network's weights)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from . import files


def fingerprint(**settings) -> str:
    """A stable hash of JSON-able settings and arrays (arrays hashed by dtype, shape and bytes)."""
    h = hashlib.sha256()
    for k in sorted(settings):
        v = settings[k]
        h.update(k.encode())
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        if isinstance(v, np.ndarray):
            v = np.ascontiguousarray(v)
            h.update(f"{v.dtype}{v.shape}".encode())
            h.update(v.tobytes())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def array_digest(*arrays) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes (numpy or torch; None allowed)."""
    h = hashlib.sha256()
    for v in arrays:
        if v is None:
            h.update(b"none")
            continue
        if hasattr(v, "detach"):
            v = v.detach().cpu().contiguous().numpy()
        v = np.ascontiguousarray(v)
        h.update(f"{v.dtype}{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def module_digest(net) -> str:
    """SHA-256 of a network's weights and buffers (``state_dict``), by name; for a plain callable, of its
    qualified name (all that identifies it)."""
    state = getattr(net, "state_dict", None)
    if state is None:
        return hashlib.sha256(f"callable:{getattr(net, '__qualname__', type(net).__name__)}".encode()).hexdigest()
    h = hashlib.sha256(b"state_dict")
    for name, t in sorted(state().items()):
        h.update(name.encode())
        h.update(array_digest(t).encode())
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_state(path: str, fp: str, **arrays) -> None:
    files.write_npz(path, fingerprint=np.array(fp), **arrays)


def load_state(path: Optional[str], fp: str) -> Optional[dict]:
    """The arrays saved at ``path`` (None if there is no file); a ValueError if it belongs to another run or
    is not a state file, or, when there is no file yet, if ``path`` cannot be written (the run will save its state
    there: refused before any work, :func:`patchmosaic.io.files.check_output`; a caller that finds an unfinished
    state checks with :func:`check_writable`)."""
    if path is None:
        return None
    if not os.path.exists(path):
        check_writable(path)
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            saved = str(z["fingerprint"])
            arrays = {k: z[k] for k in z.files if k != "fingerprint"}
    except Exception as e:  # zip, format and missing-key errors: not a state file this package wrote
        raise ValueError(f"{path} is not a readable state file ({type(e).__name__}: {e}); delete it") from None
    if saved != fp:
        raise ValueError(f"{path} is the state of a different run (other settings, seeds, data or network); "
                         "delete it or choose another state path")
    return arrays


def check_writable(path: Optional[str]) -> None:
    """A ValueError before any work if the state file ``path`` (None: none) cannot be written."""
    if path is not None:
        files.check_output(path, option="state file", what="the run's state")


def write_json(path: str, obj) -> None:
    files.write_json(path, obj)
