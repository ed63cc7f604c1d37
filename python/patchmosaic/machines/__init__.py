"""The exact machines of spec section 2: IS, LS, ELS (periodic) and boundary-aware ELS; beside them the linear
baseline (Wiener) and the data-driven locality machine (DataLocal: ELS over the Wiener filter's most sensitive
pixels). Each holds a training set and calls one op of :mod:`patchmosaic.ops`; the key-set rules live in
machines/keysets.py; ``make_machine`` builds any of them by name."""

from .base import Machine, Provenance
from .ideal import IS
from .local import ELS
from .same_position import LS, SamePosition
from .wiener import Wiener
from .locality import DataLocal
from .pca_locality import PCALocality
from .smoothed import SmoothedCFDM
from .pspc import PSPC, Heatmaps
from .factory import MACHINE_NAMES, MACHINES, make_machine

__all__ = ["Machine", "Provenance", "SamePosition", "IS", "LS", "ELS", "MACHINE_NAMES", "MACHINES", "make_machine",
           "Wiener", "DataLocal", "PCALocality", "SmoothedCFDM", "PSPC", "Heatmaps"]
