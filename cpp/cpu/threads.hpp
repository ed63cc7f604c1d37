// threads.hpp -- how many OpenMP threads a kernel call uses, exceptions carried out of a parallel region, and a
// call stopped early when its caller asks (a Ctrl-C).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
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

// Stopping a call early. The host registers a poll that says whether the caller asked to stop (the Python
// bindings: a pending Ctrl-C, bindings_cpu.cpp); FirstError asks it from the thread that made the call (thread 0 of
// the region) between work items, at most every kStopPollEvery, and a call told to stop ends with StopRequested
// once every thread has finished the item it is in. No poll registered: never asked.
using StopPoll = bool (*)();
inline std::atomic<StopPoll>& stop_poll() {
  static std::atomic<StopPoll> poll{nullptr};
  return poll;
}
constexpr std::chrono::milliseconds kStopPollEvery{50};  // (the poll may wait for Python's lock)

struct StopRequested : std::exception {
  const char* what() const noexcept override { return "patchmosaic: the call was stopped by its caller"; }
};

// An exception may not leave an OpenMP region (the runtime aborts the process): work inside one runs
// through run(), which keeps the first exception (or StopRequested, where the stop poll says so); rethrow()
// raises it after the region.
class FirstError {
 public:
  template <typename F>
  void run(F&& f) {
    if (failed_) return;
    if (thread_index() == 0 && stop_asked()) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::make_exception_ptr(StopRequested{});
      failed_ = true;
      return;
    }
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
  // (thread 0 only) whether the stop poll, asked now if it was not asked in the last kStopPollEvery, says stop
  bool stop_asked() {
    const StopPoll poll = stop_poll().load(std::memory_order_relaxed);
    if (!poll) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_poll_) return false;
    next_poll_ = now + kStopPollEvery;
    return poll();
  }

  std::chrono::steady_clock::time_point next_poll_{};
  std::exception_ptr error_;
  std::mutex mu_;
  volatile bool failed_ = false;
};

}  // namespace patchmosaic
