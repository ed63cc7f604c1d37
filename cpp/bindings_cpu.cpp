// bindings_cpu.cpp -- the CPU engine's entry points, registered in every module that carries a build of
// the CPU kernels (_core, and the instruction-set variants _core_avx2, ...; see CMakeLists.txt). Each
// validates its struct (validate.hpp) before it touches a buffer and releases the GIL while it runs.
#include <pybind11/pybind11.h>

#include "bind_contract.hpp"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/validate.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef PM_CPU_VARIANT
#define PM_CPU_VARIANT "generic"
#endif

namespace patchmosaic {
namespace {

template <typename Call, typename F32, typename F64>
void by_dtype(const Call& c, F32 f32, F64 f64) {
  py::gil_scoped_release nogil;
  if (c.dtype == kFloat32) f32(view<float>(c));
  else f64(view<double>(c));
}

}  // namespace

void register_cpu(py::module_& m) {
  m.def("local_forward_cpu", [](const LocalCall& c) {
    validate(c, Pass::kForward, Engine::kCpu);
    by_dtype(c, local_forward_cpu<float>, local_forward_cpu<double>);
  }, "Local machines (LS / ELS / boundary-aware ELS), forward pass: out, stats and provenance of a LocalCall.");
  m.def("local_backward_cpu", [](const LocalCall& c) {
    validate(c, Pass::kBackward, Engine::kCpu);
    by_dtype(c, local_backward_cpu<float>, local_backward_cpu<double>);
  }, "Local machines, backward pass: grad_query, grad_a, grad_inv_2b2 of a LocalCall.");
  m.def("local_forward_multi_cpu", [](const LocalMultiCall& c) {
    validate(c, Engine::kCpu);
    py::gil_scoped_release nogil;
    if (c.dtype == kFloat32) local_forward_multi_cpu<float>(view<float>(c));
    else local_forward_multi_cpu<double>(view<double>(c));
  }, "Local machines at several patch sizes in one pass (forward only): out (n_ks, B, C, Hq, Wq) of a LocalMultiCall.");
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
  m.def("aligned_forward_cpu", [](const AlignedCall& c) {
    validate(c, Pass::kForward, Engine::kCpu);
    by_dtype(c, aligned_forward_cpu<float>, aligned_forward_cpu<double>);
  }, "Same-position machines, forward pass: out, stats and provenance of an AlignedCall.");
  m.def("aligned_backward_cpu", [](const AlignedCall& c) {
    validate(c, Pass::kBackward, Engine::kCpu);
    by_dtype(c, aligned_backward_cpu<float>, aligned_backward_cpu<double>);
  }, "Same-position machines, backward pass: grad_query, grad_a, grad_inv_2b2 of an AlignedCall.");
  m.def("max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "OpenMP threads the CPU engine uses by default.");
  m.attr("CPU_VARIANT") = PM_CPU_VARIANT;
}

}  // namespace patchmosaic
