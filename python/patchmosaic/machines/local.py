"""The local machines of spec section 2: LS, and ELS with periodic or zero-padding (boundary-aware)
boundaries. Each names its key-set rule (ops/keysets.py); the rest is :class:`Machine`'s."""

from __future__ import annotations

from .base import Machine
from .ideal import IS


class LS(Machine):
    """Local score machine (eq. 7-8): each pixel attends to the same location of every training image
    (zero-padded patches). Arguments as :class:`Machine`."""

    rule = "ls"


class ELS(Machine):
    """Equivariant local score machine.

    ``boundary="zeros"`` (default): the boundary-aware machine (the paper's bbELS, eq. 41) matched to
    zero-padded CNNs; queries may be larger canvases than the training images (padding-signature rule).
    ``boundary="circular"``: the periodic ELS (eq. 9-10); ``wrapped=True`` also includes the wrapped
    training patches (the exact equivariant key set of a circularly padded network). Other arguments
    (``schedule``, ``backend``, ``n_threads``, ``max_memory``) as :class:`Machine`.
    """

    def __init__(self, images, labels=None, boundary: str = "zeros", *, wrapped: bool = False, **kw):
        if boundary not in ("zeros", "circular"):
            raise ValueError(f"boundary must be 'zeros' or 'circular', got {boundary!r}")
        if wrapped and boundary != "circular":
            raise ValueError("wrapped=True applies to boundary='circular' only")
        super().__init__(images, labels, **kw)
        self.boundary = boundary
        self.wrapped = bool(wrapped)
        self.rule = "els_zeros" if boundary == "zeros" else ("els_wrapped" if wrapped else "els_circular")

    def _check_canvas(self, Hq, Wq):
        pass  # any canvas: the key sets say which sizes work


MACHINE_NAMES = ("els", "ls", "is")


def make_machine(name: str, images, labels=None, *, boundary: str = "zeros", **kw) -> Machine:
    """The machine called ``name`` (``"els"``, ``"ls"`` or ``"is"``; ``boundary`` applies to ELS)."""
    if name == "els":
        return ELS(images, labels, boundary=boundary, **kw)
    if name == "ls":
        return LS(images, labels, **kw)
    if name == "is":
        return IS(images, labels, **kw)
    raise ValueError(f"machine must be one of {MACHINE_NAMES}, got {name!r}")
