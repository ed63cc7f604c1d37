"""The CUDA kernels of cpp/cuda built for the CPU under an emulator (cpp/cuda/emulation/cuda_runtime.h),
so that the test suite runs them where there is no GPU: the same sources, host memory standing for
device memory, the threads of a block run as fibers switched at barriers (see that header for what
this can and cannot show). Compiled once per version of the sources into the temporary directory;
``module()`` returns the loaded ``_cuda_emu`` module, or skips the calling test where no C++ compiler
is found.
"""

from __future__ import annotations

import hashlib
import importlib.util
import glob
import os
import shutil
import subprocess
import sysconfig
import tempfile

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CPP = os.path.join(ROOT, "cpp")
KERNELS = sorted(glob.glob(os.path.join(CPP, "cuda", "*.cu")))
HOST = [os.path.join(CPP, "bindings_cuda.cpp"), os.path.join(CPP, "cuda", "emulation", "module.cpp")]
HEADERS = sorted(glob.glob(os.path.join(CPP, "include", "patchmosaic", "*.hpp")) +
                 glob.glob(os.path.join(CPP, "cuda", "*.cuh")) + [os.path.join(CPP, "bind_contract.hpp"),
                 os.path.join(CPP, "cuda", "emulation", "cuda_runtime.h")])

_module = None


def module():
    global _module
    if _module is not None:
        return _module
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler to build the CUDA emulator")
    import pybind11

    h = hashlib.sha256()
    for path in KERNELS + HOST + HEADERS:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(cxx.encode())
    folder = os.path.join(tempfile.gettempdir(), f"patchmosaic_cuda_emu_{h.hexdigest()[:16]}")
    target = os.path.join(folder, "_cuda_emu" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        tmp = target + f".{os.getpid()}.tmp"
        cmd = [cxx, "-O2", "-std=c++20", "-shared", "-fPIC", "-DPATCHMOSAIC_WITH_CUDA",
               "-I" + os.path.join(CPP, "cuda", "emulation"), "-I" + CPP, "-I" + os.path.join(CPP, "include"), "-I" + pybind11.get_include(),
               "-I" + sysconfig.get_paths()["include"], "-x", "c++", *KERNELS, "-x", "none", *HOST, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("building the CUDA emulator failed:\n" + res.stderr[-4000:])
        os.replace(tmp, target)
    spec = importlib.util.spec_from_file_location("_cuda_emu", target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _module = mod
    return mod


def _cuda_available() -> bool:
    import patchmosaic as pm

    return pm.cuda_available()


def _no_gpu_reason() -> str:
    """Why the GPU tests cannot run here, precisely: the engine missing from the build, or only the device."""
    import torch
    from patchmosaic import ops

    if not ops.cuda_built():
        return "this build has no CUDA engine (nvcc was not found when it was compiled)"
    if not torch.cuda.is_available():
        return "the CUDA engine is built, but torch sees no CUDA device here"
    return "the CUDA engine cannot run here"


# the tests that need a real GPU
needs_gpu = pytest.mark.skipif(not _cuda_available(), reason=_no_gpu_reason())


@pytest.fixture(params=[pytest.param("gpu", marks=[pytest.mark.cuda, needs_gpu]), "emulated"])
def dev(request, monkeypatch):
    """The device of the CUDA engine's tensors: CUDA on the GPU, the CPU under the emulator (import it into a
    test module: ``from cuda_emulation import dev, needs_gpu``)."""
    import torch
    from patchmosaic.ops import engines

    if request.param == "gpu":
        return torch.device("cuda")
    monkeypatch.setattr(engines, "_EMULATOR", module())
    return torch.device("cpu")
