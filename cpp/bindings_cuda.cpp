// bindings_cuda.cpp -- the CUDA entry points of patchmosaic._core (built with PATCHMOSAIC_CUDA), and of the
// test suite's emulator module: the same call structs as the CPU engine (device addresses for the large
// buffers, host addresses for the index arrays), torch's current stream as an integer handle, and the
// device index. A bad index reaches device memory out of bounds, and on a GPU that kills the whole CUDA
// context: every struct is validated on the host first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bind_contract.hpp"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/validate.hpp"

namespace patchmosaic {

namespace {

template <typename Call, typename F32, typename F64>
void by_dtype(const Call& c, uintptr_t stream, int device, F32 f32, F64 f64) {
  py::gil_scoped_release nogil;
  if (c.dtype == kFloat32) f32(view<float>(c), reinterpret_cast<void*>(stream), device);
  else f64(view<double>(c), reinterpret_cast<void*>(stream), device);
}

}  // namespace

void register_cuda(py::module_& m) {
  m.def("local_forward_cuda", [](const LocalCall& c, uintptr_t stream, int device) {
    validate(c, Pass::kForward, Engine::kCuda);
    by_dtype(c, stream, device, local_forward_cuda<float>, local_forward_cuda<double>);
  }, "Local machines on the GPU, forward pass (a LocalCall, a stream handle, a device index).");
  m.def("local_backward_cuda", [](const LocalCall& c, uintptr_t stream, int device) {
    validate(c, Pass::kBackward, Engine::kCuda);
    by_dtype(c, stream, device, local_backward_cuda<float>, local_backward_cuda<double>);
  }, "Local machines on the GPU, backward pass.");
  m.def("local_forward_multi_cuda", [](const LocalMultiCall& c, uintptr_t stream, int device) {
    validate(c, Engine::kCuda);
    by_dtype(c, stream, device, local_forward_multi_cuda<float>, local_forward_multi_cuda<double>);
  }, "Local machines on the GPU at several patch sizes in one pass (forward only): out (n_ks, B, C, Hq, Wq) of a "
     "LocalMultiCall.");
  m.def("ideal_forward_cuda", [](const IdealCall& c, uintptr_t stream, int device) {
    validate(c, Pass::kForward, Engine::kCuda);
    by_dtype(c, stream, device, ideal_forward_cuda<float>, ideal_forward_cuda<double>);
  }, "Ideal score machine on the GPU, forward pass.");
  m.def("ideal_backward_cuda", [](const IdealCall& c, uintptr_t stream, int device) {
    validate(c, Pass::kBackward, Engine::kCuda);
    by_dtype(c, stream, device, ideal_backward_cuda<float>, ideal_backward_cuda<double>);
  }, "Ideal score machine on the GPU, backward pass.");
  m.def("aligned_forward_cuda", [](const AlignedCall& c, uintptr_t stream, int device) {
    validate(c, Pass::kForward, Engine::kCuda);
    by_dtype(c, stream, device, aligned_forward_cuda<float>, aligned_forward_cuda<double>);
  }, "Same-position machines on the GPU, forward pass (an AlignedCall, a stream handle, a device index).");
  m.def("aligned_backward_cuda", [](const AlignedCall& c, uintptr_t stream, int device) {
    validate(c, Pass::kBackward, Engine::kCuda);
    by_dtype(c, stream, device, aligned_backward_cuda<float>, aligned_backward_cuda<double>);
  }, "Same-position machines on the GPU, backward pass (needs the transposed neighbourhood table).");
}

}  // namespace patchmosaic
