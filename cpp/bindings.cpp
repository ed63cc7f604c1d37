// bindings.cpp -- pybind11 module patchmosaic._core: the call structs (bound once, bind_contract.hpp) and
// the entry points of the CPU engine (and, in a CUDA build, of the CUDA engine). Nothing here knows torch:
// the Python layer (python/patchmosaic/ops) allocates the buffers and fills the structs; every entry point
// validates its struct (validate.hpp) before it touches a buffer, and releases the GIL while it runs.
#include <pybind11/pybind11.h>

#include "bind_contract.hpp"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/validate.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace patchmosaic;

namespace {

template <typename Call, typename F32, typename F64>
void by_dtype(const Call& c, F32 f32, F64 f64) {
  py::gil_scoped_release nogil;
  if (c.dtype == kFloat32) f32(view<float>(c));
  else f64(view<double>(c));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "patchmosaic compiled core: streaming patch-softmax kernels (CPU, and CUDA where built)";
  bind_contract(m, false);
  m.def("local_forward_cpu", [](const LocalCall& c) {
    validate(c, Pass::kForward, Engine::kCpu);
    by_dtype(c, local_forward_cpu<float>, local_forward_cpu<double>);
  }, "Local machines (LS / ELS / boundary-aware ELS), forward pass: out, stats and provenance of a LocalCall.");
  m.def("local_backward_cpu", [](const LocalCall& c) {
    validate(c, Pass::kBackward, Engine::kCpu);
    by_dtype(c, local_backward_cpu<float>, local_backward_cpu<double>);
  }, "Local machines, backward pass: grad_query, grad_a, grad_inv_2b2 of a LocalCall.");
  m.def("ideal_forward_cpu", [](const IdealCall& c) {
    validate(c, Pass::kForward, Engine::kCpu);
    by_dtype(c, ideal_forward_cpu<float>, ideal_forward_cpu<double>);
  }, "Ideal score machine, forward pass.");
  m.def("ideal_backward_cpu", [](const IdealCall& c) {
    validate(c, Pass::kBackward, Engine::kCpu);
    by_dtype(c, ideal_backward_cpu<float>, ideal_backward_cpu<double>);
  }, "Ideal score machine, backward pass.");
  m.def("candidate_softmax_cpu", [](const CandidateCall& c) {
    validate(c);
    by_dtype(c, candidate_softmax_cpu<float>, candidate_softmax_cpu<double>);
  }, "Exact softmax over a candidate key list per listed query pixel (the patch index's re-scoring).");
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
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
