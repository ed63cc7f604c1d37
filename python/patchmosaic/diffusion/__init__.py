"""patchmosaic.diffusion: reverse processes and the denoisers they drive.

- samplers.py: :func:`ddim`, :func:`ddpm` (short pure functions over a denoiser)
- denoisers.py: :class:`MachineDenoiser`, :class:`NetworkDenoiser`, :class:`IndexedDenoiser`; each owns its
  noise schedule
- kschedule.py: per-step parameters (:class:`KSchedule`: patch sizes, the paper's calibrated schedules and PSPC's
  published one; :class:`ThresholdSchedule`: PCA-locality thresholds, PSPC-Flex masses)
- blend.py: :class:`BlendDenoiser`, two denoisers mixed per step by a weight or a :class:`WeightSchedule`
- edm.py: the variance-exploding (EDM / k-diffusion) view of any denoiser, :func:`as_sigma_denoiser`, and EDM's
  Euler and Heun samplers (:func:`edm_sample`)
"""

from . import edm, kschedule, samplers
from .blend import BlendDenoiser, WeightSchedule
from .denoisers import IndexedDenoiser, MachineDenoiser, NetworkDenoiser, as_denoiser
from .kschedule import KSchedule, ThresholdSchedule
from .samplers import ddim, ddpm, reverse_process, time_grid
from .edm import as_sigma_denoiser, edm_sample, edm_sigmas, from_sigma_denoiser, sigma_grid

__all__ = ["ddim", "ddpm", "reverse_process", "time_grid", "MachineDenoiser", "NetworkDenoiser", "IndexedDenoiser",
           "as_denoiser", "KSchedule", "ThresholdSchedule", "kschedule", "samplers", "edm", "as_sigma_denoiser",
           "from_sigma_denoiser", "edm_sample", "edm_sigmas", "sigma_grid", "BlendDenoiser", "WeightSchedule"]
