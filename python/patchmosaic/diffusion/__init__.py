"""patchmosaic.diffusion: reverse processes and the denoisers they drive.

- samplers.py: :func:`ddim`, :func:`ddpm` (short pure functions over a denoiser)
- denoisers.py: :class:`MachineDenoiser`, :class:`NetworkDenoiser`, :class:`IndexedDenoiser`; each owns its
  noise schedule
- kschedule.py: per-step patch sizes (:class:`KSchedule`, the paper's calibrated schedules)
"""

from . import kschedule, samplers
from .denoisers import IndexedDenoiser, MachineDenoiser, NetworkDenoiser, as_denoiser
from .kschedule import KSchedule
from .samplers import ddim, ddpm, reverse_process, time_grid

__all__ = ["ddim", "ddpm", "reverse_process", "time_grid", "MachineDenoiser", "NetworkDenoiser", "IndexedDenoiser",
           "as_denoiser", "KSchedule", "kschedule", "samplers"]
