"""Every machine by its name, for the CLI and the distributed layout: ``make_machine("els", images, ...)``."""

from __future__ import annotations

from typing import Optional

from ..schedules import ScheduleLike
from .base import Machine
from .ideal import IS
from .local import ELS, LS
from .locality import DataLocal
from .wiener import Wiener

MACHINE_NAMES = ("els", "ls", "is", "datalocal", "wiener")


def make_machine(name: str, images, labels=None, *, boundary: str = "zeros", schedule: ScheduleLike = "cosine_legacy",
                 backend: str = "auto", n_threads: int = 0, max_memory: Optional[int] = None) -> Machine:
    """The machine called ``name``.

    Args:
        name: ``"els"``, ``"ls"``, ``"is"``, ``"datalocal"`` (:class:`patchmosaic.DataLocal`, the data-driven
            locality machine) or ``"wiener"`` (:class:`patchmosaic.Wiener`, the optimal linear denoiser).
        boundary: ELS and DataLocal only: ``"zeros"`` (default) or ``"circular"``; ignored by the others.
        images, labels, schedule, backend, n_threads, max_memory: as for :class:`ELS` (same defaults; the Wiener
            filter takes only schedule and max_memory).
    """
    common = dict(schedule=schedule, backend=backend, n_threads=n_threads, max_memory=max_memory)
    if name == "datalocal":
        return DataLocal(images, labels, boundary=boundary, **common)
    if name == "wiener":
        return Wiener(images, labels, schedule=schedule, max_memory=max_memory)
    if name == "els":
        return ELS(images, labels, boundary=boundary, **common)
    if name == "ls":
        return LS(images, labels, **common)
    if name == "is":
        return IS(images, labels, **common)
    raise ValueError(f"machine must be one of {MACHINE_NAMES}, got {name!r}")
