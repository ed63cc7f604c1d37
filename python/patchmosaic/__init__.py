"""patchmosaic: exact, fast equivariant local score machines (Kamb & Ganguli, ICML 2025).

    >>> import patchmosaic as pm
    >>> m = pm.ELS(train_images)                 # boundary-aware ELS, cosine-legacy schedule
    >>> x0_hat = m.denoise(x_t, t=0.5, k=7)      # same shape, dtype and array type as x_t
"""

from . import data, kschedule, metrics, networks, sampling, schedules
from .calibrate import Calibration, calibrate
from .compare import compare
from .denoisers import MachineDenoiser, NetworkDenoiser
from .kschedule import KSchedule
from .patch_index import IndexedDenoiser, PatchIndex, calibrate_t_max
from .sampling import ddim, ddpm
from .backends.cuda import available as cuda_available
from .machines import ELS, IS, LS, Machine, Provenance
from .validation import ResourceError

__all__ = ["IS", "LS", "ELS", "Machine", "Provenance", "ResourceError", "cuda_available", "data", "kschedule",
           "metrics", "networks", "sampling", "schedules", "ddim", "ddpm", "KSchedule", "MachineDenoiser",
           "NetworkDenoiser", "calibrate", "Calibration", "compare", "PatchIndex", "IndexedDenoiser", "calibrate_t_max"]
__version__ = "0.1.0"
