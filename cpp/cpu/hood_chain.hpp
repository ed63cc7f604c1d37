// hood_chain.hpp -- neighbourhoods as their predecessor's, changed (aligned_softmax.cpp): where row r's neighbourhood
// differs from row r - 1's in fewer elements than it costs to sum on its own (a wide mask's rows at high noise:
// neighbouring output elements have nearly the same neighbourhood), its distances are row r - 1's plus the elements
// it adds, less those it drops -- on PCA-locality's MNIST masks at t = 0.95 about 60 vector loads per row instead
// of 160 (41 runs, each two prefix sums of two loads).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "threads.hpp"

namespace patchmosaic {

// any: whether some row is summed from row r - 1's distances; if so, per row, whether it is (on, n_rows + 1 entries,
// the last 0) and its terms elem[ptr[r] .. ptr[r + 1]): the first n_add[r] of them the elements it adds, the rest
// those it drops (all empty where no row is).
struct Chain {
  std::vector<char> on;
  std::vector<int64_t> ptr;
  std::vector<int32_t> elem;
  std::vector<int32_t> n_add;
  bool any = false;
};

// The elements of row a's runs [alo[i], ahi[i]) outside row b's (each row's runs ascending and disjoint), written to
// out (when not null); returns their count. O(runs + output), by one sweep of both rows.
inline int64_t runs_difference(const int32_t* alo, const int32_t* ahi, int64_t na, const int32_t* blo,
                               const int32_t* bhi, int64_t nb, int32_t* out) {
  int64_t n = 0, j = 0;
  auto emit = [&](int32_t x, int32_t stop) {
    if (out)
      for (int32_t e = x; e < stop; ++e) out[n + (e - x)] = e;
    n += stop - x;
  };
  for (int64_t i = 0; i < na; ++i) {
    int32_t x = alo[i];
    const int32_t end = ahi[i];
    while (x < end) {
      while (j < nb && bhi[j] <= x) ++j;
      if (j == nb || blo[j] >= end) {  // no run of b meets [x, end)
        emit(x, end);
        x = end;
      } else if (blo[j] > x) {  // [x, blo[j]) is outside b
        emit(x, blo[j]);
        x = blo[j];
      } else {  // x is inside b's run j
        x = std::min(end, bhi[j]);
      }
    }
  }
  return n;
}

// The chain of a table of unit-weight neighbourhoods given as runs (ptr, lo, hi: row r's runs [lo[u], hi[u]) for u
// in [ptr[r], ptr[r + 1]), ascending and disjoint: validate.hpp refuses a table whose rows are not), given each
// row's cost on its own (`direct`, in vector loads) and an added or dropped element's (`per_element`): a row is
// chained where its added and dropped elements, with `overhead` loads for the chaining itself, cost less; and none
// is unless that saves at least `min_saving` of the table's cost (the chains' bookkeeping slows every row). A row
// after an empty one is never chained (the engine folds empty rows without distances). O(runs + chained elements).
inline Chain make_chain(int64_t n_rows, const int64_t* ptr, const int32_t* lo, const int32_t* hi,
                        const std::vector<int64_t>& direct, int64_t per_element, int64_t overhead, double min_saving,
                        int n_threads) {
  Chain C;
  C.on.assign(n_rows + 1, 0);
  C.ptr.assign(n_rows + 1, 0);
  C.n_add.assign(n_rows, 0);
  const int nt = resolve_threads(n_threads, n_rows / 64 + 1);
  auto difference = [&](int64_t a, int64_t b, int32_t* out) {
    return runs_difference(lo + ptr[a], hi + ptr[a], ptr[a + 1] - ptr[a], lo + ptr[b], hi + ptr[b],
                           ptr[b + 1] - ptr[b], out);
  };
  int64_t total = direct[0], saved = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : total, saved)
  for (int64_t r = 1; r < n_rows; ++r) {
    total += direct[r];
    if (ptr[r - 1] == ptr[r]) continue;  // (an empty row's distances are not kept for its successor)
    const int64_t na = difference(r, r - 1, nullptr), nd = difference(r - 1, r, nullptr);
    const int64_t cost = per_element * (na + nd) + overhead;
    if (cost >= direct[r]) continue;
    saved += direct[r] - cost;
    C.on[r] = 1;
    C.n_add[r] = static_cast<int32_t>(na);
    C.ptr[r + 1] = na + nd;
  }
  if (saved == 0 || saved < min_saving * static_cast<double>(total)) return Chain{};  // too little to gain
  C.any = true;
  for (int64_t r = 0; r < n_rows; ++r) C.ptr[r + 1] += C.ptr[r];
  C.elem.resize(C.ptr[n_rows]);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 1; r < n_rows; ++r) {
    if (!C.on[r]) continue;
    int32_t* out = C.elem.data() + C.ptr[r];
    difference(r, r - 1, out);
    difference(r - 1, r, out + C.n_add[r]);
  }
  return C;
}

}  // namespace patchmosaic
