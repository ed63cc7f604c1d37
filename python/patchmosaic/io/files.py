"""Writing output files safely: the one atomic-write helper every writer of the package uses.

A file is written to a temporary file beside its target and renamed onto it, so a reader (or a resumed
run) never sees half a file. What ``path`` names decides what happens:

- a new path or a regular file: replaced atomically; a new file gets the mode the user's umask allows
  (an existing file keeps its mode);
- a symbolic link: written through, to the file it points to (the link stays a link);
- a directory, FIFO, device or socket: refused with a ValueError naming it (replacing ``/dev/full`` or a
  named pipe with a regular file would be a silent surprise).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from typing import Callable, Iterator

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def target_of(path: str) -> str:
    """The file a write to ``path`` replaces (symbolic links followed), or a ValueError if it is not a
    regular file."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ValueError(f"cannot write {path}: it is {kind}; give the path of a regular file")
    return target


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """``with atomic_path(path) as tmp: <write the file at tmp>`` -- then ``tmp`` replaces ``path``'s target
    (see the module docstring); on an exception the temporary file is removed and ``path`` is untouched."""
    target = target_of(path)
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(target) + ".", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))


def write_npz(path: str, **arrays) -> None:
    """numpy arrays to an ``.npz`` (no object arrays: readable with ``allow_pickle=False``)."""
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_with(path: str, writer: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Atomic write by a library that takes a file name: ``writer(tmp)`` writes the file."""
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
