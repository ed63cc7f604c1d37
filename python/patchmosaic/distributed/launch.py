"""Starting and guarding a ``torch.distributed`` job: one process group from the environment ``torchrun``
sets, a timeout on every collective, and one clear error when a peer dies or stalls.

Every collective of this package goes through :func:`collective`: a failure (a peer closed its connection,
or did not answer within the timeout) becomes a :class:`DistributedError` naming this rank, the operation
and the rank(s) that failed -- never a hang. To name them, each rank leaves its host and process id in the
job's store (the ``TCPStore`` of the process group) before its first collective; after a failure the
survivors say "here" through the store and wait a short while for each other, and a rank that does not
answer is looked up: on the same host its process is checked (ended: it died; stopped: it stalled), on
another host it is named as not answering.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import os
import socket
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

TIMEOUT_ENV = "PATCHMOSAIC_DIST_TIMEOUT"  # seconds a collective waits for the slowest rank
DEFAULT_TIMEOUT = 300.0
_active_timeout = [None]  # the timeout the process group was started with
_broken = [False]  # a collective failed: the group must not be torn down (gloo may abort in its teardown)
KEY_PREFIX = "patchmosaic/"  # this package's keys in the job's store: proc/<rank> (who), here/<rank> (alive)
_registered = [False]  # this rank's proc/<rank> key is written
_peers = {}  # global rank -> {"host", "pidns", "pid"}, read from the store once every rank has written it


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, stalled beyond the timeout, or disagreed on the call."""


class RanksDisagree(ValueError):
    """The ranks of a job were given different settings or data (:func:`agree`), or one of them failed before
    the run; raised on every rank, before any work."""


def timeout_seconds(timeout: Optional[float] = None) -> float:
    """The collective timeout: ``timeout``, else ``$PATCHMOSAIC_DIST_TIMEOUT``, else 300 s.

    Args:
        timeout: seconds, or None for the environment's (or the default).
    """
    where = "timeout"
    if timeout is None:
        where = f"${TIMEOUT_ENV}"
        timeout = os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: the distributed timeout is a number of seconds, got {timeout!r}") from None
    if not (timeout > 0 and timeout < float("inf")):
        raise ValueError(f"{where}: the distributed timeout must be positive seconds, got {timeout}")
    return timeout


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: Optional[str] = None, timeout: Optional[float] = None) -> bool:
    """Join the process group described by the environment (``torchrun`` sets ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``). A single process (no ``WORLD_SIZE`` above 1) joins nothing.

    Args:
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA); None (default): NCCL when CUDA is available,
            else gloo.
        timeout: seconds any collective may wait for a peer before the job stops with a
            :class:`DistributedError`; None (default): ``$PATCHMOSAIC_DIST_TIMEOUT`` or 300.

    Returns:
        True when a process group is (now) initialised, False for a single process.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise DistributedError("this torch has no torch.distributed; run a single process")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    seconds = timeout_seconds(timeout)
    if backend == "nccl":  # one device per local rank; more ranks than devices share them round-robin
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
        _active_timeout[0] = seconds
    except Exception as e:  # rendezvous failures: name them
        raise DistributedError(f"rank {os.environ.get('RANK', '?')}: could not join the process group "
                               f"({backend}, timeout {seconds:g} s): {e}") from None
    return True


def shutdown() -> None:
    """Leave the process group (if any). After a failed collective the group is left as it is: destroying
    a gloo group whose peer died can abort the process (``terminate called without an active exception``);
    use :func:`exit_now` to end such a process."""
    if dist.is_available() and dist.is_initialized() and not _broken[0]:
        # every rank reaches this point before any tears its connections down: a gloo rank whose peer closes
        # the pairs while it still finishes the last collective can abort the same way
        try:
            dist.barrier()
        except Exception:
            _broken[0] = True
            return
        dist.destroy_process_group()
        # free now, while the interpreter runs, what the exchanges left in reference cycles: freed by the last
        # garbage collection of the interpreter's exit instead, it aborted about 1 in 10 two-rank jobs in gloo's
        # run-loop thread ("terminate called without an active exception"); none in 40 with this collection
        gc.collect()


def broken() -> bool:
    """Whether a collective of this process has failed (a :class:`DistributedError` was raised)."""
    return _broken[0]


def exit_now(code: int) -> None:
    """End this process with ``code`` at once, output flushed, skipping the interpreter's teardown: the
    way out after a :class:`DistributedError`, whose broken process group could abort the teardown.

    Args:
        code: the exit status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 for a single process).

    Args:
        group: a process group, or None for the default (world) group.
    """
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world(group=None) -> int:
    """The number of ranks in ``group`` (1 for a single process).

    Args:
        group: a process group, or None for the default (world) group.
    """
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def comm_device(group=None) -> torch.device:
    """Where tensors exchanged in ``group`` must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_store_client = [None]  # this process's client of the job's TCPStore, connected on first use


def _store():
    """The job's key-value store, the ``TCPStore`` at ``MASTER_ADDR:MASTER_PORT`` that the process group was
    set up through (hosted by rank 0 or by torchrun's agent), as a client of its own; None where it cannot be
    had (a group set up another way): then failures are reported without naming the ranks."""
    if _store_client[0] is None:
        try:
            _store_client[0] = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                             is_master=False, timeout=datetime.timedelta(seconds=5),
                                             wait_for_workers=False)
        except Exception:
            return None
    return _store_client[0]


def _identity() -> dict:
    """Where this process lives: host name, pid namespace and pid (a rank on the same host can check on it)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: no process checks
        pidns = ""
    return {"host": socket.gethostname(), "pidns": pidns, "pid": os.getpid()}


def _register() -> None:
    """Leave this rank's identity in the store (once per process); then, until every rank's is there, try to
    read them all (one store query per collective until it succeeds)."""
    try:
        if not _registered[0]:
            _store().set(f"{KEY_PREFIX}proc/{dist.get_rank()}", json.dumps(_identity()))
            _registered[0] = True
        missing = [f"{KEY_PREFIX}proc/{r}" for r in range(dist.get_world_size()) if r not in _peers]
        if missing and _store().check(missing):
            for key, value in zip(missing, _store().multi_get(missing)):
                _peers[int(key.rsplit("/", 1)[1])] = json.loads(value)
    except Exception:  # naming the failed ranks is best effort; it never stops a call
        pass


def _process_state(info: dict) -> Optional[str]:
    """``"ended"``, ``"stopped"`` or ``"running"`` for a process on this host (same pid namespace); None for a
    process elsewhere."""
    me = _identity()
    if not me["pidns"] or info.get("host") != me["host"] or info.get("pidns") != me["pidns"]:
        return None
    try:
        with open(f"/proc/{int(info['pid'])}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # after "pid (comm)"
    except (OSError, IndexError, ValueError):
        return "ended"
    return "ended" if state in ("Z", "X", "x") else "stopped" if state in ("T", "t") else "running"


def _who_failed(group, error: str, seconds: float) -> str:
    """Which ranks of ``group`` failed, in words (empty when it cannot be told). This rank says "here" in the
    store and waits up to ``min(seconds, 5)`` s for the group's other ranks to say it too (they do once their
    own collective fails); a rank on this host whose process has ended or stopped is not waited for. The
    rank hosting the store (rank 0, unless torchrun's agent hosts it) then waits as long for the others to
    finish reading, so that its exit does not take the store away from them.

    Args:
        group: the process group of the failed collective (None: the world).
        error: the backend's error text (a timeout, a closed connection).
        seconds: the collective timeout.
    """
    try:
        me = dist.get_rank()
        ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
        others = [r for r in ranks if r != me]
    except Exception:
        return ""
    if not others:
        return ""
    grace = min(seconds, 5.0)
    hosted_by_rank0 = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    answered, fate, store_lost = set(), {}, False
    store = _store()
    if store is None:
        return ""

    def wait_for(prefix, ranks, seen):  # add to seen the ranks that set <prefix>/<rank>, till all or the grace
        deadline = time.monotonic() + grace
        while True:
            for r in ranks:
                if r not in seen and store.check([f"{KEY_PREFIX}{prefix}/{r}"]):
                    seen.add(r)
                elif r in _peers:
                    fate[r] = _process_state(_peers[r])
            if all(r in seen or fate.get(r) in ("ended", "stopped") for r in ranks) or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    try:
        store.set_timeout(datetime.timedelta(seconds=grace))  # a stopped store host must not hang us
        store.set(f"{KEY_PREFIX}here/{me}", "1")
        for r in others:
            if r not in _peers and store.check([f"{KEY_PREFIX}proc/{r}"]):
                _peers[r] = json.loads(store.get(f"{KEY_PREFIX}proc/{r}"))
        wait_for("here", others, answered)
        store.set(f"{KEY_PREFIX}done/{me}", "1")
        if hosted_by_rank0 and me == 0:  # keep the store up until the survivors have read it
            wait_for("done", sorted(answered), set())
    except Exception:  # the store is gone with the process that hosted it
        store_lost = True
        for r in others:
            if r not in answered and r in _peers:
                fate[r] = _process_state(_peers[r])
    failed = [r for r in others if r not in answered and fate.get(r) != "running"]
    if store_lost and hosted_by_rank0 and 0 in others and 0 not in answered and fate.get(0) is None:
        fate[0] = "store"
    busy = [r for r in others if r not in answered and fate.get(r) == "running"]
    words = [_describe(r, fate.get(r), error, seconds, grace, len(others)) for r in failed or busy]
    if failed and busy:
        words.append(f"rank{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} still running, not answering yet")
    return "; ".join(words)


def _describe(r: int, state: Optional[str], error: str, seconds: float, grace: float, peers: int) -> str:
    """What happened to rank ``r`` (see :func:`_who_failed`), in words."""
    low = error.lower()
    within = f" within {seconds:g} s" if "timed out" in low or "timeout" in low else ""
    if state == "ended":
        return f"rank {r} died (its process has ended)"
    if state == "stopped":
        return f"rank {r} did not answer{within} (its process is stopped)"
    if state == "running":
        return f"rank {r} did not answer (its process is running: busy, or still waiting on another rank)"
    if state == "store":
        return f"rank {r} died or stalled (the job's store, which it hosts, is unreachable)"
    if peers == 1 and ("closed" in low or "reset" in low or "broken pipe" in low):
        return f"rank {r} died (connection closed)"
    return f"rank {r} did not answer{within or f' within {grace:g} s of the failure'} (died or stalled)"


def collective(fn: Callable, what: str, group=None):
    """Run the collective ``fn()``; a failure becomes a :class:`DistributedError` with a clear message.

    Args:
        fn: a function running one or more collectives of ``group``.
        what: what the collective does, for the message (e.g. ``"merge of the ELS softmax states"``).
        group: the process group it runs in (None: the world).
    """
    _register()
    try:
        return fn()
    except DistributedError:
        raise
    except Exception as e:  # gloo: RuntimeError / DistBackendError; NCCL: the watchdog's error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        seconds = _active_timeout[0] or timeout_seconds()
        _broken[0] = True
        who = _who_failed(group, msg, seconds) or "a peer rank died or did not answer within the timeout"
        raise DistributedError(
            f"rank {rank()} of {world()}: the {what} failed: {who}. A rank that dies or does not answer within "
            f"the timeout ({seconds:g} s; set {TIMEOUT_ENV} to change it) stops the job. Stopping. ({msg})") from None


def _canonical(value):
    """``value`` as JSON-able data: arrays and tensors by dtype, shape and SHA-256 of their bytes, mappings with
    sorted keys, sequences as lists; anything else by ``str``."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().contiguous().numpy()
    if hasattr(value, "dtype") and hasattr(value, "tobytes") and hasattr(value, "shape"):
        import numpy as np

        v = np.ascontiguousarray(value)
        if v.ndim == 0:
            return v.item()
        return {"array": str(v.dtype), "shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _shown(value) -> str:
    """A field's value as a reader can compare it: the JSON when short, else a hash of it."""
    text = json.dumps(value, sort_keys=True)
    if len(text) <= 48:
        return text
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('array', '')}{value.get('shape', '')} sha256 {value['sha256'][:12]}"
    return f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def fingerprint_of(fields: dict) -> str:
    """SHA-256 of the canonical JSON of ``fields`` (see :func:`agree`)."""
    return hashlib.sha256(json.dumps(_canonical(fields), sort_keys=True).encode()).hexdigest()


def agree(fields: Optional[dict], what: str = "the run", *, error: Optional[str] = None, group=None) -> None:
    """Check, with one ``all_gather`` before any other collective of a run, that every rank of ``group`` was given
    the same ``fields`` (settings, shapes, seeds, labels, data digests: everything that must match), and that no
    rank failed before the run. A single process does nothing.

    Each rank sends the hash of the canonical JSON of its fields (arrays and tensors by their SHA-256), each field's
    own value in short, or the one-line ``error`` it met before the run. A rank that failed makes every rank raise
    :class:`RanksDisagree` naming it and its error; fields that differ make every rank raise it naming each field
    and which ranks hold which value -- instead of a run that mixes the ranks' inputs or kills one in a collective.

    Args:
        fields: name -> value (JSON-able data, arrays, tensors); None with ``error``.
        what: what the ranks agree on, for the message (e.g. ``"patchmosaic sample"``).
        error: this rank's error before the run (then it raises its own error after the exchange).
        group: the process group (None: the world).
    """
    if world(group) == 1:
        return
    canon = None if fields is None else _canonical(fields)
    mine = {"error": error, "hash": None if canon is None else fingerprint_of(fields),
            "fields": None if canon is None else {k: _shown(v) for k, v in canon.items()},
            "full": None if canon is None else {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()
                                                 for k, v in canon.items()}}
    out = [None] * world(group)
    collective(lambda: dist.all_gather_object(out, mine, group=group), f"agreement on {what}", group)
    me = rank(group)
    failed = [(r, o["error"]) for r, o in enumerate(out) if o["error"] is not None]
    if failed:
        if error is not None:
            return  # this rank raises its own error
        words = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise RanksDisagree(f"stopped before the run ({what}) because {'a rank' if len(failed) == 1 else 'ranks'} "
                            f"failed ({words})")
    if all(o["hash"] == out[0]["hash"] for o in out):
        return
    names = sorted(set().union(*(o["full"] for o in out)))
    parts = []
    for name in names:
        by_value = {}
        for r, o in enumerate(out):
            key = o["full"].get(name)
            by_value.setdefault(key, (o["fields"].get(name, "missing"), []))[1].append(r)
        if len(by_value) > 1:
            groups = [f"{shown} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                      for shown, rs in by_value.values()]
            parts.append(f"{name} ({'; '.join(groups)})")
    raise RanksDisagree(f"the ranks were given different inputs ({what}), so their results would not fit together: "
                        f"{', '.join(parts)}. Every rank must run the same command on the same data (this is rank "
                        f"{me})")
