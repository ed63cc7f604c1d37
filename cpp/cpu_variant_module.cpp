// cpu_variant_module.cpp -- one instruction-set variant of the CPU engine as a module of its own
// (_core_avx2, _core_avx512, _core_native; CMakeLists.txt), compiled with that variant's flags and loaded
// only on a CPU that executes them (python/patchmosaic/ops/engines.py). Its call structs are module-local
// copies of _core's.
#include <pybind11/pybind11.h>

#include "bind_contract.hpp"

namespace patchmosaic {
void register_cpu(py::module_& m);
}

PYBIND11_MODULE(PM_MODULE, m) {
  m.doc() = "patchmosaic CPU engine, instruction-set variant " PM_CPU_VARIANT;
  patchmosaic::bind_contract(m, true);
  patchmosaic::register_cpu(m);
}
