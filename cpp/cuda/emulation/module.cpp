// module.cpp (emulation) -- the CUDA entry points of bindings_cuda.cpp as a module of their own,
// `_cuda_emu`, with the kernels built for the CPU (cuda_runtime.h beside this file). Built by the test
// suite (tests/cuda_emulation.py) only; host addresses stand for device addresses. Its call structs are
// module-local copies of _core's (the two modules may be built against different pybind11 versions).
#include <pybind11/pybind11.h>

#include "bind_contract.hpp"

PYBIND11_MODULE(_cuda_emu, m) {
  patchmosaic::bind_contract(m, true);
  patchmosaic::register_cuda(m);
}
