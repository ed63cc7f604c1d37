// bindings.cpp -- pybind11 module patchmosaic._core: the call structs (bound once, bind_contract.hpp), the
// baseline build of the CPU engine (bindings_cpu.cpp), the CPU's instruction-set levels (so that Python
// picks the best CPU variant module, CMakeLists.txt), and, in a CUDA build, the CUDA engine. Nothing here
// knows torch: the Python layer (python/patchmosaic/ops) allocates the buffers and fills the structs.
#include <pybind11/pybind11.h>

#include <string>

#include "bind_contract.hpp"
#include "patchmosaic/validate.hpp"

namespace patchmosaic {
void register_cpu(py::module_& m);
}

namespace py = pybind11;
using namespace patchmosaic;

namespace {

// Whether the running CPU executes an instruction-set level: "x86-64-v2", "x86-64-v3", "x86-64-v4".
bool cpu_supports(const std::string& level) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (level == "x86-64-v2") return __builtin_cpu_supports("x86-64-v2");
  if (level == "x86-64-v3") return __builtin_cpu_supports("x86-64-v3");
  if (level == "x86-64-v4") return __builtin_cpu_supports("x86-64-v4");
#endif
  (void)level;
  return false;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "patchmosaic compiled core: streaming patch-softmax kernels (CPU, and CUDA where built)";
  bind_contract(m, false);
  register_cpu(m);
  m.def("cpu_supports", &cpu_supports, "Whether this CPU executes an x86-64 level ('x86-64-v2', -v3 or -v4).");
  m.attr("MAX_PATCH_ELEMENTS") = kMaxPatchElements;
  m.attr("CUDA_MAX_CHANNELS") = kCudaMaxChannels;
  m.attr("CUDA_MAX_K") = kCudaMaxK;
#ifdef PATCHMOSAIC_WITH_CUDA
  m.attr("has_cuda") = true;
  register_cuda(m);
#else
  m.attr("has_cuda") = false;
#endif
}
