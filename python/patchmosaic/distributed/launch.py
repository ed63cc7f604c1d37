"""Starting and guarding a ``torch.distributed`` job: one process group from the environment ``torchrun``
sets, a timeout on every collective, and one clear error when a peer dies or stalls.

Every collective of this package goes through :func:`collective`: a failure (a peer closed its connection,
or did not answer within the timeout) becomes a :class:`DistributedError` naming this rank, the operation
and, where the gloo backend can tell (a monitored barrier), the rank that failed -- never a hang.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

TIMEOUT_ENV = "PATCHMOSAIC_DIST_TIMEOUT"  # seconds a collective waits for the slowest rank
DEFAULT_TIMEOUT = 300.0
_active_timeout = [None]  # the timeout the process group was started with
_broken = [False]  # a collective failed: the group must not be torn down (gloo may abort in its teardown)


class DistributedError(RuntimeError):
    """A collective failed: a peer rank died, stalled beyond the timeout, or disagreed on the call."""


def timeout_seconds(timeout: Optional[float] = None) -> float:
    """The collective timeout: ``timeout``, else ``$PATCHMOSAIC_DIST_TIMEOUT``, else 300 s.

    Args:
        timeout: seconds, or None for the environment's (or the default).
    """
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"the distributed timeout must be positive seconds, got {timeout}")
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
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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
        dist.destroy_process_group()


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


def _who_failed(group) -> str:
    """The gloo monitored barrier's account of a failed peer (rank 0 learns which rank did not answer)."""
    try:
        if dist.get_backend(group) != "gloo":
            return ""
        dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=2), wait_all_ranks=True)
    except Exception as e:  # its message names the rank(s) that did not reach it
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"; {text}" if "rank" in text.lower() else ""
    return ""


def collective(fn: Callable, what: str, group=None):
    """Run the collective ``fn()``; a failure becomes a :class:`DistributedError` with a clear message.

    Args:
        fn: a function running one or more collectives of ``group``.
        what: what the collective does, for the message (e.g. ``"merge of the ELS softmax states"``).
        group: the process group it runs in (None: the world).
    """
    try:
        return fn()
    except DistributedError:
        raise
    except Exception as e:  # gloo: RuntimeError / DistBackendError; NCCL: the watchdog's error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        who = _who_failed(group)
        _broken[0] = True
        raise DistributedError(
            f"rank {rank()} of {world()}: the {what} failed: a peer rank died or did not answer within the "
            f"timeout ({_active_timeout[0] or timeout_seconds():g} s; set {TIMEOUT_ENV} to change it){who}. Stopping. ({msg})") from None
