"""Writing output files safely: the one atomic-write helper every writer of the package uses.

A file is written to a temporary file beside its target and renamed onto it, so a reader (or a resumed
run) never sees half a file. What ``path`` names decides what happens:

- a new path or a regular file: replaced atomically; a new file gets the mode the user's umask allows
  (an existing file keeps its mode);
- a symbolic link: written through, to the file it points to (the link stays a link);
- a directory, FIFO, device or socket: refused with a ValueError naming it (replacing ``/dev/full`` or a
  named pipe with a regular file would be a silent surprise).

:func:`check_output` makes the same checks before a run starts (with the suffix the writer will use and a
trial file in the target's folder), so that a long run is not refused at its end; :func:`read_npz` is the one
reader of ``.npz`` files: named arrays only, never a pickle, every failure a ValueError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Union

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a regular file" if stat.S_ISREG(mode) else "not a regular file")


def target_of(path: str) -> str:
    """The file a write to ``path`` replaces (symbolic links followed), or a ValueError if it is not a
    regular file."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):  # (a path under a regular file: check_output names that file)
        return target
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ValueError(f"cannot write {path}: its name is longer than the file system allows "
                             f"({e.strerror})") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"cannot write {path}: it is {_kind(st.st_mode)}; give the path of a regular file")
    return target


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """``with atomic_path(path) as tmp: <write the file at tmp>`` -- then ``tmp`` replaces ``path``'s target
    (see the module docstring); on an exception the temporary file is removed and ``path`` is untouched."""
    target = target_of(path)
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    # the temporary name starts with at most 64 bytes of the target's: a target name near the file system's
    # limit (255 bytes) must not make a temporary name over it
    head = os.path.basename(target).encode()[:64].decode(errors="ignore")  # (64 bytes: a name's limit is in bytes)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + head + ".", suffix=suffix)
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


def _member_bytes(z, name: str) -> int:
    """The bytes array ``name`` of the open ``.npz`` ``z`` says it holds, from its ``.npy`` header alone (0 where the
    header cannot be read here: reading the array then names the problem)."""
    fmt = np.lib.format
    try:
        with z.zip.open(name + ".npy") as f:
            version = fmt.read_magic(f)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read is None:
                return 0
            shape, _, dtype = read(f)
        return int(np.prod(shape, dtype=object)) * dtype.itemsize
    except Exception:
        return 0


def write_npz(path: str, **arrays) -> None:
    """numpy arrays to an ``.npz`` (no object arrays, refused by a ValueError before anything is written: the file
    stays readable with ``allow_pickle=False``)."""
    for name, a in arrays.items():
        if np.asarray(a).dtype.hasobject:
            raise ValueError(f"write_npz({path!r}): array {name!r} holds Python objects (dtype object); an .npz of this "
                             "package holds numbers and strings only, read back without pickles")
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_with(path: str, writer: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Atomic write by a library that takes a file name: ``writer(tmp)`` writes the file."""
    with atomic_path(path, suffix) as tmp:
        writer(tmp)


def check_output(path: str, *, suffixes: Optional[Sequence[str]] = None, option: str = "--out",
                 what: str = "the output", folder: bool = False) -> str:
    """Check, before any work, that ``path`` can be written as ``what``; returns the path.

    Refused with a ValueError naming ``option``: a suffix other than ``suffixes`` (e.g. ``(".png",)``:
    the format the writer produces), a directory, device, FIFO or socket where a file is written (or a
    file where a folder is, ``folder=True``), and a place where no file can be created (a trial file is
    created and removed in the folder that will hold the output, or in its nearest existing parent).
    """
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{option} is empty: give the path of {what}")
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            kind = _kind(os.stat(path).st_mode)
            raise ValueError(f"{option} {path}: it is {kind}, but {what} must be a folder; give a folder path")
        where = path
    else:
        try:
            target = target_of(path)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None
        if suffixes is not None:
            ext = os.path.splitext(path)[1].lower()
            if ext not in [s.lower() for s in suffixes]:
                want = " or ".join(suffixes)
                raise ValueError(f"{option} {path}: {what} is written in the {want} format, but the path has "
                                 f"{'the suffix ' + ext if ext else 'no suffix'}; give a path ending in {want}")
        where = os.path.dirname(target) or "."
    probe = where
    while not os.path.exists(probe):  # the folder is created by the writer: check its nearest parent
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{option} {path}: {probe} is not a folder, so {what} cannot be written there")
    # the trial file's name is as long as the output's (a name over the file system's limit fails here, not at
    # the end of the run)
    name = "" if folder else os.path.basename(target)
    head = ".patchmosaic-write-check."
    try:
        fd, trial = tempfile.mkstemp(dir=probe, prefix=head + "x" * max(0, len(name.encode()) - len(head) - 8))
        os.close(fd)
        os.remove(trial)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write "
                         f"{'a file named ' + repr(name) + ' ' if len(name) > 64 else ''}in {probe} "
                         f"({e.strerror or e})") from None
    return path


def read_npz(path: str, what: str = "an .npz file",
             keys: Union[None, Iterable[str], Callable[[list], Iterable[str]]] = None) -> Dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` file (all of them, the names ``keys``, or those ``keys(names)``
    picks), read without pickles. Anything else -- a missing, truncated or foreign file, a single ``.npy``
    array, an object array -- is a ValueError that names ``path`` and says it is not ``what``."""
    try:
        z = np.load(path, allow_pickle=False)
    except MemoryError:
        raise
    except Exception as e:  # OSError, zip and deflate errors, format errors: all mean "not this kind of file"
        raise ValueError(f"{path} is not {what}: {type(e).__name__}: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not {what}: it holds a single array of shape {getattr(z, 'shape', '?')} "
                         "(an .npy file), not named arrays")
    with z:
        names = list(z.files)
        pick = names if keys is None else list(keys(names) if callable(keys) else keys)
        nbytes = sum(_member_bytes(z, k) for k in pick if k in names)  # from the headers, before any is read
        from ..validation import check_memory

        check_memory(nbytes, f"reading {path}", advice="use a smaller data file")
        try:
            return {k: z[k] for k in pick if k in names}
        except MemoryError:
            raise
        except Exception as e:  # a member that does not decompress or parse (an object array: a pickle)
            raise ValueError(f"{path} is not {what}: {type(e).__name__}: {e}") from None
