"""patchmosaic.diffusion: reverse processes and the denoisers they drive.

- samplers.py: :func:`ddim`, :func:`ddpm` (short pure functions over a denoiser)
- denoisers.py: :class:`MachineDenoiser`, :class:`NetworkDenoiser`, :class:`IndexedDenoiser`; each owns its
  noise schedule
- kschedule.py: per-step parameters (:class:`KSchedule`: patch sizes, the paper's calibrated schedules;
  :class:`ThresholdSchedule`: PCA-locality thresholds)
"""

from . import kschedule, samplers
from .denoisers import IndexedDenoiser, MachineDenoiser, NetworkDenoiser, as_denoiser
from .kschedule import KSchedule, ThresholdSchedule
from .samplers import ddim, ddpm, reverse_process, time_grid

__all__ = ["ddim", "ddpm", "reverse_process", "time_grid", "MachineDenoiser", "NetworkDenoiser", "IndexedDenoiser",
           "as_denoiser", "KSchedule", "ThresholdSchedule", "kschedule", "samplers"]
