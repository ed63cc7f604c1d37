// wiener_mask.cpp -- the PCA-locality machine's neighbourhoods (machines/pca_locality.py), exactly, from a cheap
// approximation of its Wiener matrix L = U diag(w) U^T (U the data's principal directions, float64 D x r, w the
// noise level's shrinkage).
//
// Output element m's neighbourhood is {n : A[m, n] >= tau}, A[m, n] = |L[m, n]| / dd[n] (L is symmetric: row m
// of L is column m of the row-normalised matrix M), tau = theta * max A. The caller passes an approximation Lt of
// L (float32: half the time of the float64 product) and a bound on its error,
//     |Lt[m, n] - L[m, n]| <= c sq[m] sq[n] + tail[m] tail[n] + eta     (sq = sqrt(diag L); tail: of the terms
//                                                                         left out of Lt, e.g. a low-rank one),
// so that every entry is decided by the bound where it can be, and recomputed exactly (sum_k U[m, k] w[k] U[n, k]
// in float64) only where its interval holds the threshold, or may hold the maximum. The result is the mask
// of the float64 matrix, at the cost of one pass over Lt and a few dot products. With c = eta = 0 (Lt the float64
// matrix itself) nothing is recomputed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "patchmosaic/engines.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

constexpr int kLanes = 16;  // partial maxima per row (independent lanes: the loop vectorises)

inline double exact_entry(const WienerMaskArgs& A, int64_t m, int64_t n) {
  const double* __restrict um = A.U + m * A.r;
  const double* __restrict un = A.U + n * A.r;
  const double* __restrict w = A.w;
  double part[kLanes] = {};  // independent partial sums (the loop vectorises), added by halves
  int64_t k = 0;
  for (; k + kLanes <= A.r; k += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += um[k + j] * w[k + j] * un[k + j];
  for (; k < A.r; ++k) part[0] += um[k] * w[k] * un[k];
  for (int h = kLanes / 2; h > 0; h /= 2)
    for (int j = 0; j < h; ++j) part[j] += part[j + h];
  const double v = std::fabs(part[0]);
  // A diagonal entry is its row's diagonal divided by itself: exactly 1 (this sum and the caller's dd, summed in
  // another order, differ by a few ulp, and at theta = 1 every diagonal ties with the maximum), or the diagonal
  // itself where it lies below 1e-6 (divided by 1: inv_dd 1 and v tiny)
  if (m == n) return (A.inv_dd[n] == 1.0 && v < 0.5) ? v : 1.0;
  return v * A.inv_dd[n];
}

// Row m of the approximation, read entry by entry: the approximate value a = |L~[m, n]| / dd[n] and the bound e on
// its error (the terms of row m computed once).
template <typename L>
struct RowBound {
  const WienerMaskArgs& A;
  const L* __restrict row;
  double cm, pm;
  RowBound(const WienerMaskArgs& args, int64_t m)
      : A(args), row(static_cast<const L*>(args.L) + m * args.D), cm(args.c * args.sq[m]), pm(args.tail[m]) {}
  inline double value(int64_t n) const { return std::fabs(static_cast<double>(row[n])) * A.inv_dd[n]; }
  inline double error(int64_t n) const { return cm * A.s[n] + pm * A.p[n] + A.t[n]; }
};

// The largest lower bound of row m's entries: max_n (A~[m, n] - err[m, n]).
template <typename L>
double row_lower_max(const RowBound<L>& R) {
  double part[kLanes];
  std::fill(part, part + kLanes, -std::numeric_limits<double>::infinity());
  const int64_t D = R.A.D;
  int64_t n = 0;
  for (; n + kLanes <= D; n += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double v = R.value(n + j) - R.error(n + j);
      part[j] = v > part[j] ? v : part[j];
    }
  for (; n < D; ++n) part[0] = std::max(part[0], R.value(n) - R.error(n));
  return *std::max_element(part, part + kLanes);
}

template <typename L>
double mask_max_t(const WienerMaskArgs& A, int64_t* n_checked) {
  const int64_t D = A.D;
  const int nt = resolve_threads(A.n_threads, D);
  std::vector<double> lo(D);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t m = 0; m < D; ++m) lo[m] = row_lower_max(RowBound<L>(A, m));
  const double bound = D ? *std::max_element(lo.begin(), lo.end()) : 0.0;
  // every entry whose upper bound reaches the largest lower bound may be the maximum: recomputed exactly
  std::vector<double> best(D, 0.0);
  std::vector<int64_t> checked(D, 0);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t m = 0; m < D; ++m) {
    const RowBound<L> R(A, m);
    double b = 0.0;
    for (int64_t n = 0; n < D; ++n) {
      const double a = R.value(n), e = R.error(n);
      if (a + e < bound) continue;
      if (e == 0.0) {
        b = std::max(b, a);
      } else {
        b = std::max(b, exact_entry(A, m, n));
        ++checked[m];
      }
    }
    best[m] = b;
  }
  *n_checked = 0;
  for (int64_t m = 0; m < D; ++m) *n_checked += checked[m];
  return D ? *std::max_element(best.begin(), best.end()) : 0.0;
}

template <typename L>
void mask_rows_t(const WienerMaskArgs& A, double tau, std::vector<int64_t>& ptr, std::vector<int32_t>& elem,
                 int64_t* n_checked) {
  const int64_t D = A.D;
  const int nt = resolve_threads(A.n_threads, D);
  std::vector<std::vector<int32_t>> rows(D);
  std::vector<int64_t> checked(D, 0);
  FirstError error;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t m = 0; m < D; ++m) error.run([&] {
    const RowBound<L> R(A, m);
    auto& out = rows[m];
    for (int64_t n = 0; n < D; ++n) {
      const double a = R.value(n), e = R.error(n);
      if (a + e < tau) continue;  // certainly out (a + e < tau), certainly in (a - e >= tau), else exactly
      if (a - e < tau) {
        ++checked[m];
        if (exact_entry(A, m, n) < tau) continue;
      }
      out.push_back(static_cast<int32_t>(n));
    }
  });
  error.rethrow();
  ptr.assign(D + 1, 0);
  *n_checked = 0;
  for (int64_t m = 0; m < D; ++m) {
    ptr[m + 1] = ptr[m] + static_cast<int64_t>(rows[m].size());
    *n_checked += checked[m];
  }
  elem.resize(ptr[D]);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t m = 0; m < D; ++m) std::copy(rows[m].begin(), rows[m].end(), elem.begin() + ptr[m]);
}

}  // namespace

double wiener_mask_max(const WienerMaskArgs& A, int64_t* n_checked) {
  return A.f32 ? mask_max_t<float>(A, n_checked) : mask_max_t<double>(A, n_checked);
}

void wiener_mask_rows(const WienerMaskArgs& A, double tau, std::vector<int64_t>& ptr, std::vector<int32_t>& elem,
                      int64_t* n_checked) {
  if (A.f32) mask_rows_t<float>(A, tau, ptr, elem, n_checked);
  else mask_rows_t<double>(A, tau, ptr, elem, n_checked);
}

}  // namespace patchmosaic
