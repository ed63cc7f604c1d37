// ideal_score.cpp -- the CPU kernels of the ideal score machine (IS, eq. 3-4), forward and backward.
//
// Each query image is one row; each training image of its group is one key whose patch and value are the
// whole image. Distances are computed directly as sum (x - a phi)^2 (not by expansion: the images are long
// vectors, so expansion would cancel badly at small t). Work items are chunks of one row's keys; their
// partial (max, sum, weighted images) merge at the end in item order.
//
// Backward (engines.hpp, with K = V = phi): per item the same distances again, the weights from the
// forward's statistics, and in double G = sum_n w_n delta_n (a phi_n - x), the a and s sums; the items'
// partials add up in item order.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"
#include "simd_exp.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

constexpr int64_t kChunk = 512;  // training images per work item
constexpr int64_t kWaveBytes = int64_t(256) << 20;

struct Item {
  int64_t b, i0, i1;
};

struct Partial {
  double m = -std::numeric_limits<double>::infinity(), s = 0.0;
  int64_t best = -1;
  std::vector<double> acc;
};

template <typename T>
std::vector<Item> plan_ideal(const IdealScoreArgs<T>& A) {
  std::vector<Item> items;
  for (int64_t b = 0; b < A.B; ++b) {
    const int32_t g = A.group_of_b[b];
    const int64_t lo = A.grp_img_ptr[g], hi = A.grp_img_ptr[g + 1];
    for (int64_t i = lo; i < hi; i += kChunk) items.push_back({b, i, std::min(hi, i + kChunk)});
  }
  return items;
}

// |x - a phi|^2 in the working type over runs of 256 elements, the runs summed in double
template <typename T>
inline double distance(const T* x, const T* phi, T af, int64_t D) {
  double dist = 0.0;
  T part = T(0);
  for (int64_t e0 = 0; e0 < D; e0 += 256) {
    part = T(0);
    const int64_t e1 = std::min(D, e0 + 256);
#pragma omp simd reduction(+ : part)
    for (int64_t e = e0; e < e1; ++e) {
      const T diff = x[e] - af * phi[e];
      part += diff * diff;
    }
    dist += part;
  }
  return dist;
}

}  // namespace

template <typename T>
void ideal_forward_cpu(const IdealScoreArgs<T>& A) {
  const std::vector<Item> items = plan_ideal(A);
  std::vector<Partial> parts(items.size());
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(items.size()));
  const int64_t D = A.D;
  FirstError error;
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> logit;
    error.run([&] { logit.resize(kChunk); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < static_cast<int64_t>(items.size()); ++it)
      error.run([&] {
        const Item& I = items[it];
        const T* x = A.query + I.b * D;
        const double s = A.inv_2b2[I.b];
        const T af = static_cast<T>(A.a[I.b]);
        const int64_t n = I.i1 - I.i0;
        Partial& P = parts[it];
        P.acc.assign(D, 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        int64_t arg = -1;
        for (int64_t j = 0; j < n; ++j) {
          const T* phi = A.train + static_cast<int64_t>(A.grp_img[I.i0 + j]) * D;
          logit[j] = -distance(x, phi, af, D) * s;
          if (logit[j] > mx) {
            mx = logit[j];
            arg = A.grp_img[I.i0 + j];
          }
        }
        P.m = mx;
        P.best = arg;
        for (int64_t j = 0; j < n; ++j) {
          const double w = exp_nonpos(logit[j] - mx);
          if (w == 0.0) continue;
          P.s += w;
          const T* phi = A.train + static_cast<int64_t>(A.grp_img[I.i0 + j]) * D;
          for (int64_t e = 0; e < D; ++e) P.acc[e] += w * phi[e];
        }
      });
  }
  error.rethrow();
  // merge the partials of each row, in order
  std::vector<double> m(A.B, -std::numeric_limits<double>::infinity()), s(A.B, 0.0);
  std::vector<int64_t> best(A.B, -1);
  std::vector<double> acc(static_cast<size_t>(A.B) * D, 0.0);
  for (size_t it = 0; it < items.size(); ++it) {
    const int64_t b = items[it].b;
    double* ab = acc.data() + b * D;
    const Partial& P = parts[it];
    const MergeFactors f = merge_state(m[b], s[b], best[b], P.m, P.s, P.best);
    for (int64_t e = 0; e < D; ++e) ab[e] = ab[e] * f.self + P.acc[e] * f.other;
  }
  for (int64_t b = 0; b < A.B; ++b) {
    for (int64_t e = 0; e < D; ++e) A.out[b * D + e] = static_cast<T>(acc[b * D + e] / s[b]);
    A.stats[2 * b] = m[b];
    A.stats[2 * b + 1] = s[b];
    if (A.arg_key) A.arg_key[b] = best[b];
    if (A.arg_share) A.arg_share[b] = static_cast<T>(1.0 / s[b]);
  }
}

template <typename T>
void ideal_backward_cpu(const IdealScoreArgs<T>& A) {
  const std::vector<Item> items = plan_ideal(A);
  const int64_t D = A.D, n_items = static_cast<int64_t>(items.size());
  std::vector<double> Dot(A.B, 0.0);  // <g, out> per query image
  for (int64_t b = 0; b < A.B; ++b)
    for (int64_t e = 0; e < D; ++e) Dot[b] += static_cast<double>(A.grad_out[b * D + e]) * static_cast<double>(A.out[b * D + e]);
  std::vector<double> gx(static_cast<size_t>(A.B) * D, 0.0), ga(A.B, 0.0), gs(A.B, 0.0);
  const int64_t per_item = D + 2;
  const int64_t wave = std::max<int64_t>(1, kWaveBytes / (per_item * static_cast<int64_t>(sizeof(double))));
  for (int64_t w0 = 0; w0 < n_items; w0 += wave) {
    const int64_t w1 = std::min(n_items, w0 + wave);
    std::vector<double> buf(static_cast<size_t>(w1 - w0) * per_item, 0.0);
    const int nt = resolve_threads(A.n_threads, w1 - w0);
    FirstError error;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t it = w0; it < w1; ++it)
      error.run([&] {
        const Item& I = items[it];
        const T* x = A.query + I.b * D;
        const T* g = A.grad_out + I.b * D;
        const double a = A.a[I.b], s = A.inv_2b2[I.b];
        const T af = static_cast<T>(a);
        const double m = A.stats[2 * I.b], inv_sum = 1.0 / A.stats[2 * I.b + 1];
        double* G = buf.data() + (it - w0) * per_item;
        double& gai = G[D];
        double& gsi = G[D + 1];
        for (int64_t j = I.i0; j < I.i1; ++j) {
          const T* phi = A.train + static_cast<int64_t>(A.grp_img[j]) * D;
          const double dist = distance(x, phi, af, D);
          const double w = exp_nonpos(-dist * s - m) * inv_sum;
          if (w == 0.0) continue;
          double gphi = 0.0, dphi = 0.0;
          for (int64_t e = 0; e < D; ++e) {
            gphi += static_cast<double>(g[e]) * phi[e];
            dphi += (static_cast<double>(x[e]) - a * phi[e]) * phi[e];
          }
          const double p = w * (gphi - Dot[I.b]);
          gai += p * 2.0 * s * dphi;
          gsi -= p * dist;
          for (int64_t e = 0; e < D; ++e) G[e] += p * std::fma(a, static_cast<double>(phi[e]), -static_cast<double>(x[e]));
        }
      });
    error.rethrow();
    for (int64_t it = w0; it < w1; ++it) {
      const int64_t b = items[it].b;
      const double* G = buf.data() + (it - w0) * per_item;
      const double two_s = 2.0 * A.inv_2b2[b];
      for (int64_t e = 0; e < D; ++e) gx[b * D + e] += two_s * G[e];
      ga[b] += G[D];
      gs[b] += G[D + 1];
    }
  }
  for (size_t e = 0; e < gx.size(); ++e) A.grad_query[e] = static_cast<T>(gx[e]);
  for (int64_t b = 0; b < A.B; ++b) {
    A.grad_a[b] = ga[b];
    A.grad_inv_2b2[b] = gs[b];
  }
}

template void ideal_forward_cpu<float>(const IdealScoreArgs<float>&);
template void ideal_forward_cpu<double>(const IdealScoreArgs<double>&);
template void ideal_backward_cpu<float>(const IdealScoreArgs<float>&);
template void ideal_backward_cpu<double>(const IdealScoreArgs<double>&);

}  // namespace patchmosaic
