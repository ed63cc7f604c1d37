"""Every machine by its name, for the CLI and the distributed layout: ``make_machine("els", images, ...)``.

:data:`MACHINES` is the registry: a machine's name, its class, the parameter a per-step schedule sets (``"k"``,
``"p"``, ``"threshold"`` or None) and how to build it from the CLI's common options. A machine added here is known to the
CLI (``--machine NAME``), the distributed layout and the comparison scripts without changes there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..schedules import ScheduleLike
from .base import Machine
from .ideal import IS
from .local import ELS
from .locality import DataLocal
from .pca_locality import PCALocality
from .pspc import PSPC
from .same_position import LS
from .smoothed import SmoothedCFDM
from .wiener import Wiener


@dataclass(frozen=True)
class MachineKind:
    """A machine of the registry: ``build(images, labels, boundary, common)`` makes one (``common``: schedule,
    backend, n_threads, max_memory); ``parameter``: what a per-step schedule sets; ``help``: one line for the CLI."""

    cls: type
    parameter: Optional[str]
    help: str
    build: Callable


MACHINES = {
    "els": MachineKind(ELS, "k", "equivariant local score (boundary-aware, or periodic with --boundary circular)",
                       lambda im, lab, boundary, c: ELS(im, lab, boundary=boundary, **c)),
    "ls": MachineKind(LS, "k", "local score: the same position of every training image",
                      lambda im, lab, boundary, c: LS(im, lab, **c)),
    "is": MachineKind(IS, None, "ideal score: whole training images (memorises)",
                      lambda im, lab, boundary, c: IS(im, lab, **c)),
    "datalocal": MachineKind(DataLocal, "k", "ELS over the data's Wiener-sensitivity neighbourhood of k^2 pixels",
                             lambda im, lab, boundary, c: DataLocal(im, lab, boundary=boundary, **c)),
    "wiener": MachineKind(Wiener, None, "the optimal linear (Gaussian) denoiser",
                          lambda im, lab, boundary, c: Wiener(im, lab, schedule=c["schedule"],
                                                              max_memory=c["max_memory"])),
    "pca": MachineKind(PCALocality, "threshold", "PCA-locality (Lukoianov et al.): each element a softmax over its "
                       "thresholded Wiener-matrix neighbourhood", lambda im, lab, boundary, c: PCALocality(im, lab, **c)),
    "pspc": MachineKind(PSPC, "p", "PSPC-Square (Niedoba et al.): each p x p crop's posterior mean over the same crop "
                        "of every training image, averaged where crops overlap",
                        lambda im, lab, boundary, c: PSPC(im, lab, **c)),
    "scfdm": MachineKind(SmoothedCFDM, None, "the smoothed closed-form denoiser (Scarvelis et al.): IS averaged over "
                         "seeded Gaussian perturbations of its input", lambda im, lab, boundary, c: SmoothedCFDM(im, lab, **c)),
}
MACHINE_NAMES = tuple(MACHINES)


def make_machine(name: str, images, labels=None, *, boundary: str = "zeros", schedule: ScheduleLike = "cosine_legacy",
                 backend: str = "auto", n_threads: int = 0, max_memory: Optional[int] = None) -> Machine:
    """The machine called ``name``.

    Args:
        name: one of :data:`MACHINE_NAMES` (``"els"``, ``"ls"``, ``"is"``, ``"datalocal"``, ``"wiener"``, ...).
        boundary: ELS and DataLocal only: ``"zeros"`` (default) or ``"circular"``; ignored by the others.
        images, labels, schedule, backend, n_threads, max_memory: as for :class:`ELS` (same defaults; the Wiener
            filter takes only schedule and max_memory).
    """
    if name not in MACHINES:
        raise ValueError(f"machine must be one of {MACHINE_NAMES}, got {name!r}")
    common = dict(schedule=schedule, backend=backend, n_threads=n_threads, max_memory=max_memory)
    return MACHINES[name].build(images, labels, boundary, common)
