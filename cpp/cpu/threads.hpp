// threads.hpp -- how many OpenMP threads a kernel call uses.
#pragma once

#include <algorithm>
#include <cstdint>

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

}  // namespace patchmosaic
