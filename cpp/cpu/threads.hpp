// threads.hpp -- how many OpenMP threads a kernel call uses, and exceptions carried out of a parallel region.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace patchmosaic {

// requested <= 0: all available; never more threads than work items, never fewer than one.
inline int resolve_threads(int requested, int64_t n_items) {
#ifdef _OPENMP
  const int64_t nt = requested > 0 ? requested : omp_get_max_threads();
#else
  const int64_t nt = 1;
  (void)requested;
#endif
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, n_items)));
}

// The calling thread's index in the current OpenMP team (0 outside one or without OpenMP).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// An exception may not leave an OpenMP region (the runtime aborts the process): work inside one runs
// through run(), which keeps the first exception; rethrow() raises it after the region.
class FirstError {
 public:
  template <typename F>
  void run(F&& f) {
    if (failed_) return;
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      failed_ = true;
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::mutex mu_;
  volatile bool failed_ = false;
};

}  // namespace patchmosaic
