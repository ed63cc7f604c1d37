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

#ifdef PATCHMOSAIC_WITH_CUDA
// bindings_cuda.cpp: the CUDA entry points (device pointers and a stream in)
void register_cuda(py::module_& m);
#endif

}  // namespace patchmosaic
