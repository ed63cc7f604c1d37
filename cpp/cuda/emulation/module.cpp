// module.cpp (emulation) -- the CUDA entry points of bindings_cuda.cpp as a module of their own,
// `_cuda_emu`, with the kernels built for the CPU (cuda_runtime.h beside this file). Built by the test
// suite (tests/cuda_emulation.py) only; host addresses stand for device addresses.
#include <pybind11/pybind11.h>

#include "py_buffers.hpp"

PYBIND11_MODULE(_cuda_emu, m) { patchmosaic::register_cuda(m); }
