"""The exact machines of spec section 2: IS, LS, ELS (periodic) and boundary-aware ELS, and the linear
baseline beside them (Wiener). Each holds a
training set and calls one op of :mod:`patchmosaic.ops`; the key-set rules live in ops/keysets.py."""

from .base import Machine, Provenance
from .ideal import IS
from .local import ELS, LS, MACHINE_NAMES, make_machine
from .wiener import Wiener
from .locality import DataLocal

__all__ = ["Machine", "Provenance", "IS", "LS", "ELS", "MACHINE_NAMES", "make_machine", "Wiener", "DataLocal"]
