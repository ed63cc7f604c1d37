// bind_contract.hpp -- the call structs of contract.hpp as Python classes, generated from their field
// lists (so every field is named once). Python fills them by name (ops/contract.py); an unknown name is
// an AttributeError, and FIELDS lists what must be set.
#pragma once

#include <pybind11/pybind11.h>

#include "patchmosaic/contract.hpp"

namespace patchmosaic {

namespace py = pybind11;

template <typename S>
py::class_<S> bind_call(py::module_& m, const char* name, bool module_local) {
  py::class_<S> cls(m, name, py::module_local(module_local));
  cls.def(py::init<>());
  return cls;
}

#define PM_BIND_FIELD(field)                         \
  cls.def_readwrite(#field, &Struct::field);         \
  names.append(#field);

// module_local: the CUDA emulator of the test suite is a second module with the same structs.
inline void bind_contract(py::module_& m, bool module_local) {
  {
    using Struct = LocalCall;
    auto cls = bind_call<Struct>(m, "LocalCall", module_local);
    py::list names;
    PM_LOCAL_FIELDS(PM_BIND_FIELD)
    cls.attr("FIELDS") = py::tuple(names);
  }
  {
    using Struct = IdealCall;
    auto cls = bind_call<Struct>(m, "IdealCall", module_local);
    py::list names;
    PM_IDEAL_FIELDS(PM_BIND_FIELD)
    cls.attr("FIELDS") = py::tuple(names);
  }
  {
    using Struct = CandidateCall;
    auto cls = bind_call<Struct>(m, "CandidateCall", module_local);
    py::list names;
    PM_CANDIDATE_FIELDS(PM_BIND_FIELD)
    cls.attr("FIELDS") = py::tuple(names);
  }
  {
    using Struct = LocalMultiCall;
    auto cls = bind_call<Struct>(m, "LocalMultiCall", module_local);
    py::list names;
    PM_LOCAL_MULTI_FIELDS(PM_BIND_FIELD)
    cls.attr("FIELDS") = py::tuple(names);
  }
  {
    using Struct = AlignedCall;
    auto cls = bind_call<Struct>(m, "AlignedCall", module_local);
    py::list names;
    PM_ALIGNED_FIELDS(PM_BIND_FIELD)
    cls.attr("FIELDS") = py::tuple(names);
  }
}

#undef PM_BIND_FIELD

#ifdef PATCHMOSAIC_WITH_CUDA
// bindings_cuda.cpp: the CUDA entry points (a call struct, a stream handle and a device index)
void register_cuda(py::module_& m);
#endif

}  // namespace patchmosaic
