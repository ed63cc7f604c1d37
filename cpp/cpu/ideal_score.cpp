// ideal_score.cpp -- the CPU kernel of the ideal score machine (IS, eq. 3-4).
//
// Each query image is one row; each training image of its group is one key whose patch and value
// are the whole image. Distances are computed directly as sum (x - a phi)^2 (not by expansion: the
// images are long vectors, so expansion would cancel badly at small t). Work items are chunks of
// one row's keys; their partial (max, sum, weighted images) merge associatively at the end.
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "../patch_softmax.hpp"
#include "online_softmax.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

constexpr int64_t kChunk = 512;  // training images per work item

struct Partial {
  RowState st;
  std::vector<double> acc;
};

}  // namespace

template <typename T>
void ideal_score_cpu(const IdealScoreArgs<T>& A) {
  struct Item { int64_t b, i0, i1; };
  std::vector<Item> items;
  for (int64_t b = 0; b < A.B; ++b) {
    const int32_t g = A.group_of_b[b];
    if (g < 0 || g >= A.n_groups) throw std::invalid_argument("group_of_b out of range");
    const int64_t lo = A.grp_img_ptr[g], hi = A.grp_img_ptr[g + 1];
    if (lo == hi) throw std::invalid_argument("an image group has no training images");
    for (int64_t i = lo; i < hi; i += kChunk) items.push_back({b, i, std::min(hi, i + kChunk)});
  }
  std::vector<Partial> parts(items.size());
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(items.size()));
  const int64_t D = A.D;
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> logit(kChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < static_cast<int64_t>(items.size()); ++it) {
      const Item& I = items[it];
      const T* x = A.query + I.b * D;
      const double a = A.a[I.b], s = A.inv_2b2[I.b];
      const T af = static_cast<T>(a);
      const int64_t n = I.i1 - I.i0;
      Partial& P = parts[it];
      P.acc.assign(D, 0.0);
      double mx = -std::numeric_limits<double>::infinity();
      int64_t arg = -1;
      for (int64_t j = 0; j < n; ++j) {
        const T* phi = A.train + static_cast<int64_t>(A.grp_img[I.i0 + j]) * D;
        double dist = 0.0;
        T part = T(0);
        for (int64_t e0 = 0; e0 < D; e0 += 256) {  // accumulate in T over short runs, then in double
          part = T(0);
          const int64_t e1 = std::min(D, e0 + 256);
#pragma omp simd reduction(+ : part)
          for (int64_t e = e0; e < e1; ++e) {
            const T diff = x[e] - af * phi[e];
            part += diff * diff;
          }
          dist += part;
        }
        logit[j] = -dist * s;
        if (logit[j] > mx) { mx = logit[j]; arg = A.grp_img[I.i0 + j]; }
      }
      P.st.m = mx;
      P.st.best = arg;
      for (int64_t j = 0; j < n; ++j) {
        const double w = exp_nonpos(logit[j] - mx);
        if (w == 0.0) continue;
        P.st.s += w;
        const T* phi = A.train + static_cast<int64_t>(A.grp_img[I.i0 + j]) * D;
        for (int64_t e = 0; e < D; ++e) P.acc[e] += w * phi[e];
      }
    }
  }
  // merge the partials of each row, in order
  std::vector<RowState> st(A.B);
  std::vector<double> acc(static_cast<size_t>(A.B) * D, 0.0);
  for (size_t it = 0; it < items.size(); ++it) {
    const int64_t b = items[it].b;
    RowState& S = st[b];
    double* ab = acc.data() + b * D;
    const Partial& P = parts[it];
    const MergeFactors mf = merge_partial(S, P.st.m, P.st.s, P.st.best);
    for (int64_t e = 0; e < D; ++e) ab[e] = ab[e] * mf.old_scale + P.acc[e] * mf.part_scale;
  }
  for (int64_t b = 0; b < A.B; ++b) {
    for (int64_t e = 0; e < D; ++e) A.out[b * D + e] = static_cast<T>(acc[b * D + e] / st[b].s);
    if (A.arg_key) A.arg_key[b] = st[b].best;
    if (A.arg_share) A.arg_share[b] = static_cast<T>(1.0 / st[b].s);
  }
}

template void ideal_score_cpu<float>(const IdealScoreArgs<float>&);
template void ideal_score_cpu<double>(const IdealScoreArgs<double>&);

}  // namespace patchmosaic
