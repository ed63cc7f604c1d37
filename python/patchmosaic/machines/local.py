"""The local machines of spec section 2 that compare a pixel with training patches anywhere: ELS with periodic or
zero-padding (boundary-aware) boundaries. Each names its key-set rule (machines/keysets.py); the rest is
:class:`Machine`'s. LS, which compares a pixel with the same position only, is a same-position machine
(machines/same_position.py)."""

from __future__ import annotations

from typing import Optional

from ..schedules import ScheduleLike
from .base import DATA_ARGS, ENGINE_ARGS, SOFT_ARG, SOURCE_ARGS, Machine


class ELS(Machine):
    __doc__ = """Equivariant local score machine: each pixel attends to every ``k x k`` patch of every training
    image, wherever it lies.

    Args:
""" + DATA_ARGS + """\
        boundary: ``"zeros"`` (default): the boundary-aware machine (the paper's bbELS, eq. 41) matched to
            zero-padded CNNs; queries may be larger canvases than the training images (padding-signature
            rule). ``"circular"``: the periodic ELS (eq. 9-10), matched to circularly padded CNNs.
        wrapped: with ``boundary="circular"`` only: also include the training patches that wrap around the
            image edges (the exact equivariant key set of a circularly padded network). Default False.
""" + SOFT_ARG + SOURCE_ARGS + ENGINE_ARGS

    def __init__(self, images, labels=None, boundary: str = "zeros", *, wrapped: bool = False, soft=None,
                 xflip: bool = False, schedule: ScheduleLike = "cosine_legacy", backend: str = "auto",
                 n_threads: int = 0, max_memory: Optional[int] = None):
        self.soft = self._check_soft(soft)
        if boundary not in ("zeros", "circular"):
            raise ValueError(f"boundary must be 'zeros' or 'circular', got {boundary!r}")
        if wrapped and boundary != "circular":
            raise ValueError("wrapped=True applies to boundary='circular' only")
        super().__init__(images, labels, xflip=xflip, schedule=schedule, backend=backend, n_threads=n_threads,
                         max_memory=max_memory)
        self.boundary = boundary
        self.wrapped = bool(wrapped)
        self.rule = "els_zeros" if boundary == "zeros" else ("els_wrapped" if wrapped else "els_circular")

    def _check_canvas(self, Hq, Wq):
        pass  # any canvas: the key sets say which sizes work
