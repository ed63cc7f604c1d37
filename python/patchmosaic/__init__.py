"""patchmosaic: exact, fast equivariant local score machines (Kamb & Ganguli, ICML 2025).

    >>> import patchmosaic as pm
    >>> m = pm.ELS(train_images)                 # boundary-aware ELS, cosine-legacy schedule
    >>> x0_hat = m.denoise(x_t, t=0.5, k=7)      # same shape, dtype and array type as x_t

The package, by role (imports run one way, down this list):

    ops/          the machines' operations as PyTorch custom ops; the only door to the compiled core
    machines/     IS, LS, ELS (periodic and boundary-aware) and the analytic machines that followed them:
                  training sets calling the ops, each a choice of key set, neighbourhood, response and
                  source; Wiener, the optimal linear (Gaussian) denoiser, the closed-form baseline
    index/        approximate machines through a FAISS patch index, with an error bound
    diffusion/    samplers (DDIM, DDPM), denoisers (machine, network, indexed), k-schedules
    experiments/  calibration, comparison, synthesis, the demo and the command line
and beside them: schedules (noise schedules), validation, metrics, io (files, pictures, progress),
data (data sets) and networks (the paper's CNNs and their training); distributed/ runs the machines and
experiments over torch.distributed ranks (key and query sharding).
"""

import os as _os
import sys as _sys

from .validation import ConfigurationError, ResourceError


def _run_as_command() -> bool:
    """Whether this process is the ``patchmosaic`` command (``python -m patchmosaic`` or the script)."""
    argv = list(getattr(_sys, "orig_argv", []))
    if "-m" in argv:
        return argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["patchmosaic"]
    return _os.path.basename(_sys.argv[0] if _sys.argv else "") == "patchmosaic"


try:
    from . import data, diffusion, distributed, index, metrics, networks, ops, schedules
except ConfigurationError as _e:  # the command says it in one line; a program importing the package gets the error
    if _run_as_command():
        print(f"patchmosaic: error: {_e}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise
from .diffusion import (BlendDenoiser, WeightSchedule, IndexedDenoiser, KSchedule, MachineDenoiser, NetworkDenoiser, ThresholdSchedule, ddim, ddpm,
                        kschedule, as_sigma_denoiser, from_sigma_denoiser, edm_sample, edm_sigmas)
from .diffusion import samplers as sampling
from .experiments import BlendCalibration, Calibration, calibrate, calibrate_blend, calibrate_t_max, compare
from .index import PatchIndex
from . import machines
from .machines import *  # noqa: F401,F403  (every machine: machines/__init__.py lists them)
from .ops import cuda_available

__all__ = machines.__all__ + [
    "ResourceError", "ConfigurationError", "cuda_available", "data", "kschedule", "metrics", "networks", "ops",
    "sampling", "schedules", "diffusion", "index", "ddim", "ddpm", "KSchedule", "ThresholdSchedule", "MachineDenoiser",
    "NetworkDenoiser", "calibrate", "Calibration", "compare", "PatchIndex", "IndexedDenoiser", "calibrate_t_max",
    "distributed", "as_sigma_denoiser", "from_sigma_denoiser", "edm_sample", "edm_sigmas", "BlendDenoiser",
    "WeightSchedule", "calibrate_blend", "BlendCalibration"]
__version__ = "0.1.0"
