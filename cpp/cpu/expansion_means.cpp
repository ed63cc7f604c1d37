// expansion_means.cpp -- softmax-weighted means of whole training images for query rows that share them (the
// smoothed closed-form denoiser's draws, machines/smoothed.py), in three passes over the images as they are
// stored (float32 or float64; each pass converts to double as it reads, so float32 images are read at half the
// bytes of a float64 copy):
//
//   1. logits  l[r, n] = c1[r] <q_r, x_n> - c2[r] sq[n]   (float64 dot products, four images at a time);
//   2. weights w[r, n] = exp(l[r, n] - max_n l[r, n]), 0 below e^-cut or where the labels differ; their sums;
//   3. means   out[r] = sum_n w[r, n] x_n / sum_n w[r, n], over the images some row keeps, in image order.
//
// Every value depends only on its own row and image (pass 1), on its row (pass 2) or on its row and element
// (pass 3, each thread a range of elements), and sums run in image order: the result does not depend on the
// number of threads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "patchmosaic/engines.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

constexpr int64_t kTile = 4;     // images per tile of pass 1
constexpr int64_t kChunk = 256;  // elements per step of a tile's dot products

template <typename T>
inline void to_double(const T* x, double* out, int64_t D) {
#pragma omp simd
  for (int64_t e = 0; e < D; ++e) out[e] = static_cast<double>(x[e]);
}

// adds <q_i, x_j> for four rows q_0..q_3 (ld apart) and the tile's four images x_0..x_3 (double): s[4 i + j]. Sixteen
// sums from eight loads per element: the loop runs at the multiply-adds' rate, not the loads'
inline void dots44(const double* q, const double* x, int64_t D, int64_t ld, double* s) {
  double s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  double s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
  const double *q0 = q, *q1 = q + ld, *q2 = q + 2 * ld, *q3 = q + 3 * ld;
  const double *x0 = x, *x1 = x + ld, *x2 = x + 2 * ld, *x3 = x + 3 * ld;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t e = 0; e < D; ++e) {
    const double a0 = q0[e], a1 = q1[e], a2 = q2[e], a3 = q3[e];
    const double b0 = x0[e], b1 = x1[e], b2 = x2[e], b3 = x3[e];
    s00 += a0 * b0, s01 += a0 * b1, s02 += a0 * b2, s03 += a0 * b3;
    s10 += a1 * b0, s11 += a1 * b1, s12 += a1 * b2, s13 += a1 * b3;
    s20 += a2 * b0, s21 += a2 * b1, s22 += a2 * b2, s23 += a2 * b3;
    s30 += a3 * b0, s31 += a3 * b1, s32 += a3 * b2, s33 += a3 * b3;
  }
  const double v[16] = {s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33};
  for (int i = 0; i < 16; ++i) s[i] += v[i];
}

// adds <q, x_j> for one row and the tile's four images (ld apart)
inline void dots14(const double* q, const double* x, int64_t D, int64_t ld, double* s) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  const double *x0 = x, *x1 = x + ld, *x2 = x + 2 * ld, *x3 = x + 3 * ld;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t e = 0; e < D; ++e) {
    const double v = q[e];
    s0 += v * x0[e];
    s1 += v * x1[e];
    s2 += v * x2[e];
    s3 += v * x3[e];
  }
  s[0] += s0, s[1] += s1, s[2] += s2, s[3] += s3;
}

inline double dot(const double* q, const double* x, int64_t D) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < D; ++e) s += q[e] * x[e];
  return s;
}

template <typename T>
void logits(const ExpansionMeansArgs& A, const T* X, double* L, int nt) {
  const int64_t n_tiles = (A.N + kTile - 1) / kTile;
  // each thread's tile of images and their dot products (row-major), allocated before the parallel region (an
  // exception may not leave one)
  std::vector<std::vector<double>> tiles(nt, std::vector<double>(static_cast<size_t>(kTile * A.D)));
  std::vector<std::vector<double>> sums(nt, std::vector<double>(static_cast<size_t>(A.R * kTile)));
#pragma omp parallel num_threads(nt)
  {
    std::vector<double>& tile = tiles[thread_index()];
    std::vector<double>& S = sums[thread_index()];
#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_tiles; ++it) {
      const int64_t n0 = it * kTile, nn = std::min<int64_t>(kTile, A.N - n0);
      for (int64_t j = 0; j < nn; ++j) to_double(X + (n0 + j) * A.D, tile.data() + j * A.D, A.D);
      std::fill(S.begin(), S.end(), 0.0);
      if (nn == kTile)  // the four images against every row, kChunk elements at a time (the tile's and the
        for (int64_t e0 = 0; e0 < A.D; e0 += kChunk) {  // rows' chunks stay in the first-level cache)
          const int64_t len = std::min(kChunk, A.D - e0);
          int64_t r = 0;
          for (; r + 4 <= A.R; r += 4) dots44(A.Q + r * A.D + e0, tile.data() + e0, len, A.D, S.data() + r * kTile);
          for (; r < A.R; ++r) dots14(A.Q + r * A.D + e0, tile.data() + e0, len, A.D, S.data() + r * kTile);
        }
      else
        for (int64_t r = 0; r < A.R; ++r)
          for (int64_t j = 0; j < nn; ++j) S[r * kTile + j] = dot(A.Q + r * A.D, tile.data() + j * A.D, A.D);
      for (int64_t r = 0; r < A.R; ++r)
        for (int64_t j = 0; j < nn; ++j)
          L[r * A.N + n0 + j] = A.c1[r] * S[r * kTile + j] - A.c2[r] * A.sq[n0 + j];
    }
  }
}

// logits -> weights in place (0 where left out), their sums per row
void weights(const ExpansionMeansArgs& A, double* L, double* sums, int nt) {
  const double inf = std::numeric_limits<double>::infinity();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < A.R; ++r) {
    double* l = L + r * A.N;
    if (A.row_label)
      for (int64_t n = 0; n < A.N; ++n)
        if (A.img_label[n] != A.row_label[r]) l[n] = -inf;
    double m = -inf;
    for (int64_t n = 0; n < A.N; ++n) m = std::max(m, l[n]);
    double s = 0.0;
    for (int64_t n = 0; n < A.N; ++n) {
      const double d = l[n] - m;
      l[n] = d >= -A.cut ? std::exp(d) : 0.0;  // also 0 for -inf (an image of another label)
      s += l[n];
    }
    sums[r] = s;
  }
}

template <typename T>
void means(const ExpansionMeansArgs& A, const T* X, const double* W, const double* sums,
           const std::vector<int64_t>& kept, int nt) {
  // each thread a range of elements (a multiple of 16, so that threads do not share cache lines of out), taken
  // cw at a time: the rows' sums of that chunk (R x cw, in the first-level cache for a few tens of rows) while four
  // images at a time are added to them (four multiply-adds per load and store of a sum)
  const int64_t per = ((A.D + nt - 1) / nt + 15) / 16 * 16, K = static_cast<int64_t>(kept.size());
  const int64_t cw = std::min(kChunk, per);  // elements per step (a range's sums: R x cw)
  const int n_ranges = static_cast<int>((A.D + per - 1) / per);
  std::vector<std::vector<double>> accs(n_ranges, std::vector<double>(static_cast<size_t>(A.R * cw)));
  std::vector<std::vector<double>> xs(n_ranges, std::vector<double>(static_cast<size_t>(kTile * cw), 0.0));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int g = 0; g < n_ranges; ++g) {
    const int64_t e0 = g * per, e1 = std::min(A.D, e0 + per);
    std::vector<double>&acc = accs[g], &x = xs[g];
    for (int64_t c0 = e0; c0 < e1; c0 += cw) {
      const int64_t len = std::min(cw, e1 - c0);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t k0 = 0; k0 < K; k0 += kTile) {
        const int64_t kn = std::min(kTile, K - k0);
        for (int64_t j = 0; j < kn; ++j) to_double(X + kept[k0 + j] * A.D + c0, x.data() + j * cw, len);
        const double *x0 = x.data(), *x1 = x0 + cw, *x2 = x1 + cw, *x3 = x2 + cw;
        double w[4][kTile] = {};  // 0 beyond the last kept image (whose x stays finite)
        int64_t r = 0;
        for (; r + 4 <= A.R; r += 4) {  // four rows at a time: sixteen multiply-adds per eight loads
          for (int64_t i = 0; i < 4; ++i)
            for (int64_t j = 0; j < kn; ++j) w[i][j] = W[(r + i) * A.N + kept[k0 + j]];
          double *a0 = acc.data() + r * cw, *a1 = a0 + cw, *a2 = a1 + cw, *a3 = a2 + cw;
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) {
            const double v0 = x0[e], v1 = x1[e], v2 = x2[e], v3 = x3[e];
            a0[e] += w[0][0] * v0 + w[0][1] * v1 + w[0][2] * v2 + w[0][3] * v3;
            a1[e] += w[1][0] * v0 + w[1][1] * v1 + w[1][2] * v2 + w[1][3] * v3;
            a2[e] += w[2][0] * v0 + w[2][1] * v1 + w[2][2] * v2 + w[2][3] * v3;
            a3[e] += w[3][0] * v0 + w[3][1] * v1 + w[3][2] * v2 + w[3][3] * v3;
          }
        }
        for (; r < A.R; ++r) {
          for (int64_t j = 0; j < kn; ++j) w[0][j] = W[r * A.N + kept[k0 + j]];
          double* a0 = acc.data() + r * cw;
#pragma omp simd
          for (int64_t e = 0; e < len; ++e)
            a0[e] += w[0][0] * x0[e] + w[0][1] * x1[e] + w[0][2] * x2[e] + w[0][3] * x3[e];
        }
      }
      for (int64_t r = 0; r < A.R; ++r) {
        const double inv = 1.0 / sums[r];
        for (int64_t e = 0; e < len; ++e) A.out[r * A.D + c0 + e] = acc[r * cw + e] * inv;
      }
    }
  }
}

template <typename T>
int64_t run(const ExpansionMeansArgs& A) {
  const T* X = static_cast<const T*>(A.X);
  std::vector<double> L(static_cast<size_t>(A.R * A.N)), sums(static_cast<size_t>(A.R));
  logits(A, X, L.data(), resolve_threads(A.n_threads, (A.N + kTile - 1) / kTile));
  weights(A, L.data(), sums.data(), resolve_threads(A.n_threads, A.R));
  std::vector<char> keep(static_cast<size_t>(A.N), 0);  // the images some row keeps, row by row (contiguous)
  for (int64_t r = 0; r < A.R; ++r)
    for (int64_t n = 0; n < A.N; ++n) keep[n] |= L[r * A.N + n] != 0.0;
  std::vector<int64_t> kept;
  for (int64_t n = 0; n < A.N; ++n)
    if (keep[n]) kept.push_back(n);
  means(A, X, L.data(), sums.data(), kept, resolve_threads(A.n_threads, (A.D + 15) / 16));
  return static_cast<int64_t>(kept.size());
}

}  // namespace

int64_t expansion_means(const ExpansionMeansArgs& A) { return A.f32 ? run<float>(A) : run<double>(A); }

}  // namespace patchmosaic
