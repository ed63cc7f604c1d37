// bindings_cpu.cpp -- the CPU engine's entry points, registered in every module that carries a build of
// the CPU kernels (_core, and the instruction-set variants _core_avx2, ...; see CMakeLists.txt). Each
// validates its struct (validate.hpp) before it touches a buffer and releases the GIL while it runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>

#include "bind_contract.hpp"
#include "cpu/threads.hpp"
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

struct HoodPlanHandle {
  std::shared_ptr<const HoodPlan> plan;
};

template <typename T>
using Array = py::array_t<T, py::array::c_style>;  // no forcecast: a wrong dtype is refused, not copied

template <typename T>
const T* vector_of(const Array<T>& a, int64_t n, const char* name, const char* op = "wiener_mask") {
  if (a.ndim() != 1 || a.shape(0) != n)
    throw py::value_error(std::string(op) + ": " + name + " must have shape (" + std::to_string(n) + ",)");
  return a.data();
}

// The WienerMaskArgs of Python's arrays, checked (shapes and dtypes; the values are the caller's).
WienerMaskArgs wiener_args(const py::array& L, const Array<double>& U, const Array<double>& w,
                           const Array<double>& inv_dd,
                           const Array<double>& sq, const Array<double>& s, const Array<double>& tail,
                           const Array<double>& p, const Array<double>& t, double c, int n_threads) {
  WienerMaskArgs A{};
  const bool f32 = py::isinstance<Array<float>>(L), f64 = py::isinstance<Array<double>>(L);
  if (!(f32 || f64) || L.ndim() != 2 || L.shape(0) != L.shape(1) || !(L.flags() & py::array::c_style))
    throw py::value_error("wiener_mask: L must be a C-contiguous square float32 or float64 array");
  A.L = L.data();
  A.f32 = f32;
  A.D = L.shape(0);
  if (U.ndim() != 2 || U.shape(0) != A.D) throw py::value_error("wiener_mask: U must have shape (D, r)");
  A.r = U.shape(1);
  A.U = U.data();
  A.w = vector_of(w, A.r, "w");
  A.inv_dd = vector_of(inv_dd, A.D, "inv_dd");
  A.sq = vector_of(sq, A.D, "sq");
  A.s = vector_of(s, A.D, "s");
  A.tail = vector_of(tail, A.D, "tail");
  A.p = vector_of(p, A.D, "p");
  A.t = vector_of(t, A.D, "t");
  if (!(c >= 0.0)) throw py::value_error("wiener_mask: c must be >= 0");
  A.c = c;
  A.n_threads = n_threads;
  return A;
}

// The CPU engine's stop poll (threads.hpp), on the thread that made the call: where that is Python's main thread
// (the only one that runs signal handlers; elsewhere the GIL is not taken and the answer is no), the pending signal
// handlers run, and one that raises -- Ctrl-C's KeyboardInterrupt -- stops the call, its exception left set for the
// translator below to hand on.
unsigned long python_main_thread = 0;
bool python_asks_stop() {
  if (PyThread_get_thread_ident() != python_main_thread) return false;
  py::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

}  // namespace

void register_cpu(py::module_& m) {
  python_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  stop_poll().store(&python_asks_stop);
  m.def("_set_stop_poll", [](bool enabled) {
    return stop_poll().exchange(enabled ? &python_asks_stop : nullptr) != nullptr;
  }, py::arg("enabled"),
        "Register (True) or withdraw (False) this module's Ctrl-C poll of its CPU engine calls; returns whether it was "
        "registered. For bench/stop_poll.py, which times calls with and without it.");
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StopRequested& e) {  // the signal handler's exception, else (none set) a KeyboardInterrupt
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
    }
  });
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
  // A table's HoodPlan, held by Python with the table (module-local: each variant module has its own)
  py::class_<HoodPlanHandle>(m, "HoodPlan", py::module_local(true));
  m.def("hood_plan_cpu", [](const AlignedCall& c) {
    validate(c, Pass::kForward, Engine::kCpu);
    HoodPlanHandle h;
    {
      py::gil_scoped_release nogil;
      if (c.dtype == kFloat32) h.plan = hood_plan_cpu(view<float>(c));
      else h.plan = hood_plan_cpu(view<double>(c));
    }
    return h;
  }, "The element table's runs and chains for the same-position passes of an AlignedCall's dtype, derived once.");
  m.def("aligned_forward_cpu", [](const AlignedCall& c, const HoodPlanHandle* h) {
    validate(c, Pass::kForward, Engine::kCpu);
    const HoodPlan* plan = h ? h->plan.get() : nullptr;
    const auto run = [plan](const auto& A) { aligned_forward_cpu(A, plan); };
    by_dtype(c, run, run);
  }, py::arg("call"), py::arg("plan") = nullptr,
     "Same-position machines, forward pass: out, stats and provenance of an AlignedCall (`plan`: its table's "
     "HoodPlan, or None to derive it in the call).");
  m.def("aligned_backward_cpu", [](const AlignedCall& c, const HoodPlanHandle* h) {
    validate(c, Pass::kBackward, Engine::kCpu);
    const HoodPlan* plan = h ? h->plan.get() : nullptr;
    const auto run = [plan](const auto& A) { aligned_backward_cpu(A, plan); };
    by_dtype(c, run, run);
  }, py::arg("call"), py::arg("plan") = nullptr,
     "Same-position machines, backward pass: grad_query, grad_a, grad_inv_2b2 of an AlignedCall.");
  m.def("wiener_mask_max", [](const py::array& L, const Array<double>& U, const Array<double>& w,
                              const Array<double>& inv_dd,
                              const Array<double>& sq, const Array<double>& s, const Array<double>& tail,
                              const Array<double>& p, const Array<double>& t, double c, int n_threads) {
    const WienerMaskArgs A = wiener_args(L, U, w, inv_dd, sq, s, tail, p, t, c, n_threads);
    int64_t checked = 0;
    double top;
    {
      py::gil_scoped_release nogil;
      top = wiener_mask_max(A, &checked);
    }
    return py::make_tuple(top, checked);
  }, "PCA-locality: the largest entry of |L| / dd (exact) from an approximate L and its error bound -> (max, "
     "entries recomputed).");
  m.def("wiener_mask_rows", [](const py::array& L, const Array<double>& U, const Array<double>& w,
                               const Array<double>& inv_dd,
                               const Array<double>& sq, const Array<double>& s, const Array<double>& tail,
                               const Array<double>& p, const Array<double>& t, double c, double tau, int n_threads) {
    const WienerMaskArgs A = wiener_args(L, U, w, inv_dd, sq, s, tail, p, t, c, n_threads);
    std::vector<int64_t> ptr;
    std::vector<int32_t> elem;
    int64_t checked = 0;
    {
      py::gil_scoped_release nogil;
      wiener_mask_rows(A, tau, ptr, elem, &checked);
    }
    Array<int64_t> ptr_out(static_cast<py::ssize_t>(ptr.size()));
    Array<int32_t> elem_out(static_cast<py::ssize_t>(elem.size()));
    std::copy(ptr.begin(), ptr.end(), ptr_out.mutable_data());
    std::copy(elem.begin(), elem.end(), elem_out.mutable_data());
    return py::make_tuple(ptr_out, elem_out, checked);
  }, "PCA-locality: each row's neighbourhood {n : |L[m, n]| / dd[n] >= tau} (exact) as CSR -> (ptr, elem, entries "
     "recomputed).");
  m.def("expansion_means", [](const py::array& X, const Array<double>& sq, const Array<double>& Q,
                              const Array<double>& c1, const Array<double>& c2, const py::object& row_label,
                              const py::object& img_label, double cut, int64_t groups, int n_threads) {
    ExpansionMeansArgs A{};
    const bool f32 = py::isinstance<Array<float>>(X), f64 = py::isinstance<Array<double>>(X);
    if (!(f32 || f64) || X.ndim() != 2 || !(X.flags() & py::array::c_style))
      throw py::value_error("expansion_means: X must be a C-contiguous 2-d float32 or float64 array");
    A.X = X.data();
    A.f32 = f32;
    A.N = X.shape(0);
    A.D = X.shape(1);
    if (Q.ndim() != 2 || Q.shape(1) != A.D) throw py::value_error("expansion_means: Q must have shape (R, D)");
    A.R = Q.shape(0);
    if (A.N < 1 || A.R < 1 || A.D < 1) throw py::value_error("expansion_means: empty X or Q");
    A.Q = Q.data();
    A.sq = vector_of(sq, A.N, "sq", "expansion_means");
    A.c1 = vector_of(c1, A.R, "c1", "expansion_means");
    A.c2 = vector_of(c2, A.R, "c2", "expansion_means");
    if (row_label.is_none() != img_label.is_none())
      throw py::value_error("expansion_means: row_label and img_label must both be given or both be None");
    Array<int64_t> rl, il;  // kept alive to the end of the call
    if (!row_label.is_none()) {
      rl = row_label.cast<Array<int64_t>>();
      il = img_label.cast<Array<int64_t>>();
      A.row_label = vector_of(rl, A.R, "row_label", "expansion_means");
      A.img_label = vector_of(il, A.N, "img_label", "expansion_means");
    }
    if (!(cut > 0.0) || !std::isfinite(cut))
      throw py::value_error("expansion_means: cut must be a finite number > 0");
    if (groups < 1 || A.R % groups != 0)
      throw py::value_error("expansion_means: groups must be >= 1 and divide the rows of Q (" + std::to_string(A.R) +
                            "), got " + std::to_string(groups));
    A.groups = groups;
    A.cut = cut;
    A.n_threads = n_threads;
    Array<double> out({static_cast<py::ssize_t>(A.groups), static_cast<py::ssize_t>(A.D)});
    A.out = out.mutable_data();
    int64_t kept;
    {
      py::gil_scoped_release nogil;
      kept = expansion_means(A);
    }
    return py::make_tuple(out, kept);
  }, "Softmax-weighted means of whole images X (N, D) for the rows of Q (R, D), logits c1 <Q_r, X_n> - c2 sq_n in "
     "float64, weights below e^-cut and other labels left out, averaged over the rows r = g, g + G, ... of each group "
     "-> (out (G, D) float64, images kept).");
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
