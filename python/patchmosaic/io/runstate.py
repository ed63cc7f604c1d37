"""Resumable runs: an npz state file written atomically, tied to a fingerprint of the run's settings."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Optional

import numpy as np


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


def save_state(path: str, fp: str, **arrays) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fp), **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state(path: Optional[str], fp: str) -> Optional[dict]:
    """The arrays saved at ``path`` (None if there is no file); a ValueError if it belongs to another run."""
    if path is None or not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != fp:
            raise ValueError(f"{path} is the state of a different run (other settings or seeds); "
                             "delete it or choose another state path")
        return {k: z[k] for k in z.files if k != "fingerprint"}


def write_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
