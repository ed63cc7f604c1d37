"""patchmosaic.experiments: what the command line runs: calibration of k-schedules (calibrate.py),
a blend's weights (blend_calibration.py), machine versus network (compare.py), the patch index's switch time (switch_time.py), canvases of any size
(synthesis.py), the demo (demo.py) and the CLI itself (cli.py)."""

from .blend_calibration import BlendCalibration, calibrate_blend
from .calibrate import Calibration, calibrate
from .compare import compare
from .switch_time import calibrate_t_max

__all__ = ["calibrate", "Calibration", "compare", "calibrate_t_max", "calibrate_blend", "BlendCalibration"]
