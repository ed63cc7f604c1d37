// candidate_softmax.cpp -- exact softmax over a short candidate list per query pixel (CPU).
// The candidates come from a patch index (FAISS); their distances are recomputed here from the
// original float patches, so the index's own approximations only decide *which* keys are summed.
// A candidate may stand for several identical keys (same patch, hence same centre): it then enters
// the softmax with its multiplicity, w = count * exp(logit), which is exact.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "patch_gather.hpp"
#include "patchmosaic/engines.hpp"
#include "threads.hpp"

namespace patchmosaic {

template <typename T>
void candidate_softmax_cpu(const CandidateSoftmaxArgs<T>& A) {
  const int d = A.n_elem > 0 ? A.n_elem : A.C * A.k * A.k;  // a masked patch: its table's elements
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  const int64_t HW = static_cast<int64_t>(A.H) * A.W;
  const int nt = resolve_threads(A.n_threads, A.P);
  FirstError error;
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> qp, kp;
    std::vector<double> logit, acc;
    error.run([&] {
      qp.resize(d);
      kp.resize(d);
      logit.resize(std::max(A.m, 1));
      acc.resize(A.C);
    });
#pragma omp for schedule(static)
    for (int64_t p = 0; p < A.P; ++p) error.run([&] {
      const int64_t b = A.pix[p] / HWq;
      const int64_t pos = A.pix[p] % HWq;
      const int qi = static_cast<int>(pos / A.Wq), qj = static_cast<int>(pos % A.Wq);
      if (A.n_elem > 0)
        gather_elements(A.query + b * A.C * HWq, A.Hq, A.Wq, qi, qj, A.k / 2, A.query_pad, A.elem, A.elem_scale,
                        A.n_elem, qp.data(), 1);
      else
        gather_run(A.query + b * A.C * HWq, A.C, A.Hq, A.Wq, qi, qj, 1, A.k, A.query_pad, qp.data(), 1);
      const double a = A.a[b], s2 = A.inv_2b2[b];
      const int64_t* cand = A.cand + p * A.m;
      const double* count = A.count ? A.count + p * A.m : nullptr;
      double top = -std::numeric_limits<double>::infinity(), last = std::numeric_limits<double>::infinity();
      int best = -1;
      for (int c = 0; c < A.m; ++c) {
        if (cand[c] < 0) continue;
        const int64_t n = cand[c] / HW, kpos = cand[c] % HW;
        if (A.n_elem > 0)
          gather_elements(A.train + n * A.C * HW, A.H, A.W, static_cast<int>(kpos / A.W), static_cast<int>(kpos % A.W),
                          A.k / 2, A.key_pad, A.elem, A.elem_scale, A.n_elem, kp.data(), 1);
        else
          gather_run(A.train + n * A.C * HW, A.C, A.H, A.W, static_cast<int>(kpos / A.W),
                     static_cast<int>(kpos % A.W), 1, A.k, A.key_pad, kp.data(), 1);
        double dist = 0.0;
        for (int e = 0; e < d; ++e) {
          const double diff = static_cast<double>(qp[e]) - a * static_cast<double>(kp[e]);
          dist += diff * diff;
        }
        logit[c] = -dist * s2;
        if (logit[c] > top) { top = logit[c]; best = c; }
        last = std::min(last, logit[c]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double sum = 0.0;
      for (int c = 0; c < A.m; ++c) {
        if (cand[c] < 0) continue;
        const double w = (count ? count[c] : 1.0) * std::exp(logit[c] - top);
        sum += w;
        const int64_t n = cand[c] / HW, kpos = cand[c] % HW;
        const T* img = A.train + n * A.C * HW + kpos;
        for (int ch = 0; ch < A.C; ++ch) acc[ch] += w * static_cast<double>(img[ch * HW]);
      }
      T* o = A.out + b * A.C * HWq + pos;
      for (int ch = 0; ch < A.C; ++ch) o[ch * HWq] = best < 0 ? T(0) : static_cast<T>(acc[ch] / sum);
      A.top_logit[p] = top;
      A.last_logit[p] = last;
      A.sum_rel[p] = sum;
      if (A.arg_key) A.arg_key[p] = best < 0 ? -1 : cand[best];
      if (A.arg_share) A.arg_share[p] = best < 0 ? T(0) : static_cast<T>((count ? count[best] : 1.0) / sum);
    });
  }
  error.rethrow();
}

template void candidate_softmax_cpu<float>(const CandidateSoftmaxArgs<float>&);
template void candidate_softmax_cpu<double>(const CandidateSoftmaxArgs<double>&);

}  // namespace patchmosaic
