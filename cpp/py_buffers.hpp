// py_buffers.hpp -- numpy arrays to typed pointers, with errors that name the argument.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace patchmosaic {

namespace py = pybind11;

template <typename T>
inline T* ptr_of(const py::array& arr, const char* name, int ndim, bool writable = false) {
  if (!py::isinstance<py::array_t<T>>(arr) || !(arr.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": expected a C-contiguous array of " +
                                py::str(py::dtype::of<T>()).cast<std::string>() + ", got dtype " +
                                py::str(arr.dtype()).cast<std::string>());
  if (ndim >= 0 && arr.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                                std::to_string(arr.ndim()));
  if (writable && !arr.writeable()) throw std::invalid_argument(std::string(name) + ": not writable");
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

// Per-query coefficients and image groups, the fields every kernel's arguments share (A.B set first).
template <typename Args>
void fill_groups(Args& A, const py::array& a, const py::array& inv_2b2, const py::array& grp_img_ptr,
                 const py::array& grp_img, const py::array& group_of_b) {
  A.a = ptr_of<double>(a, "a", 1);
  A.inv_2b2 = ptr_of<double>(inv_2b2, "inv_2b2", 1);
  A.grp_img_ptr = ptr_of<int64_t>(grp_img_ptr, "grp_img_ptr", 1);
  A.n_groups = grp_img_ptr.shape(0) - 1;
  A.grp_img = ptr_of<int32_t>(grp_img, "grp_img", 1);
  A.group_of_b = ptr_of<int32_t>(group_of_b, "group_of_b", 1);
  if (a.shape(0) != A.B || inv_2b2.shape(0) != A.B || group_of_b.shape(0) != A.B)
    throw std::invalid_argument("a, inv_2b2 and group_of_b must have one entry per query image");
}

#ifdef PATCHMOSAIC_WITH_CUDA
// bindings_cuda.cpp: the CUDA entry points (device pointers and a stream in)
void register_cuda(py::module_& m);
#endif

}  // namespace patchmosaic
