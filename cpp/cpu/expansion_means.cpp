// expansion_means.cpp -- softmax-weighted means of whole training images for query rows that share them, averaged
// over groups of rows (the smoothed closed-form denoiser: the draws of each query, machines/smoothed.py), reading
// the images as they are stored (float32 or float64, converted to double as they are read: float32 images are read
// at half the bytes of a float64 copy):
//
//   logits  l[r, n] = c1[r] <q_r, x_n> - c2[r] sq[n]   (float64 dot products, segments of 16 images converted to
//           double once, four images and four rows at a time, the rows short of four two and one at a time);
//   weights w[r, n] = exp(l[r, n] - max_n l[r, n]), left out (0) below e^-cut and where the labels differ, and
//           their sums Z[r];
//   means   out[g] = (1 / |g|) sum_{r in g} sum_n w[r, n] x_n / Z[r] = sum_n c[g, n] x_n,
//           c[g, n] = (1 / |g|) sum_{r in g} w[r, n] / Z[r]   (the rows r = g, g + G, g + 2G, ... of group g).
//
// Two passes over the images: the first takes every row's logits, the second one weighted sum per group, not per
// row: the mean of a group's softmax means is one weighted sum of the images, so the smoothed denoiser's ten draws
// of a query need one pass of weighted sums, not ten (where most images keep weight, as at high noise, the sums
// had cost as much as the dot products). The cut is exact (every row's largest logit is known before any weight
// is made). Both passes run over blocks of images fixed by N (not by the thread count); the second's blocks add
// their images in a fixed order (the reverse of the first pass's: the images read last are still in the caches)
// into sums of their own, merged in block order: the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "patchmosaic/engines.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

constexpr int64_t kTile = 4;     // images per tile of the dot products
constexpr int64_t kChunk = 256;  // elements per step of a tile's dot products
constexpr int64_t kSeg = 16;     // images per segment (converted to double once for the logits; the sums' unit)
constexpr int64_t kAcc = 512;    // elements per step of the weighted sums
constexpr double kBlockBudget = 64.0 * (1 << 20);  // bytes of the blocks' weighted sums (groups in chunks to fit)

// c + a * b: one fused multiply-add where the module's instruction set has one (a library call where it does not
// would be slow, so there it is a multiplication and an addition)
inline double madd(double a, double b, double c) {
#if defined(__FMA__)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <typename T>
inline void to_double(const T* x, double* out, int64_t D) {
#pragma omp simd
  for (int64_t e = 0; e < D; ++e) out[e] = static_cast<double>(x[e]);
}

// adds <q_i, x_j> for four rows q_0..q_3 (ld apart) and four images x_0..x_3 (double, ld apart) to s[i * ls + j].
// Sixteen sums from eight loads per element: the loop runs at the multiply-adds' rate, not the loads'
inline void dots44(const double* q, const double* x, int64_t D, int64_t ld, double* s, int64_t ls) {
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
  const double v[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) s[i * ls + j] += v[i][j];
}

// adds <q_i, x_j> for two rows q_0, q_1 (ld apart) and four images (ld apart) to s[i * ls + j]: eight sums from six
// loads per element (the rows short of four: one row at a time took five loads per four multiply-adds)
inline void dots24(const double* q, const double* x, int64_t D, int64_t ld, double* s, int64_t ls) {
  double s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  const double *q0 = q, *q1 = q + ld;
  const double *x0 = x, *x1 = x + ld, *x2 = x + 2 * ld, *x3 = x + 3 * ld;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
  for (int64_t e = 0; e < D; ++e) {
    const double a0 = q0[e], a1 = q1[e];
    const double b0 = x0[e], b1 = x1[e], b2 = x2[e], b3 = x3[e];
    s00 += a0 * b0, s01 += a0 * b1, s02 += a0 * b2, s03 += a0 * b3;
    s10 += a1 * b0, s11 += a1 * b1, s12 += a1 * b2, s13 += a1 * b3;
  }
  s[0] += s00, s[1] += s01, s[2] += s02, s[3] += s03;
  s[ls] += s10, s[ls + 1] += s11, s[ls + 2] += s12, s[ls + 3] += s13;
}

// adds <q, x_j> for one row and four images (ld apart) to s[j]
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

// images per block: at least 256, at most 32 blocks; a function of N alone, so that the result is one of N alone
inline int64_t block_images(int64_t N) {
  const int64_t b = std::max<int64_t>(256, (N + 31) / 32);
  return (b + kSeg - 1) / kSeg * kSeg;
}

// the largest of l[0..n), NaN ignored (-inf if there is nothing else)
inline double largest(const double* l, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, l[j]);
  return m;
}

// a thread's working space, allocated before the parallel regions (an exception may not leave one)
struct Scratch {
  std::vector<double> tile;   // a segment's images in double (kSeg x D)
  std::vector<double> l;      // their logits (nr x kSeg), then the groups' weights (gc x kSeg)
  std::vector<int64_t> kept;  // the segment's images that some group of the chunk keeps
  Scratch(int64_t D, int64_t nr)
      : tile(static_cast<size_t>(kSeg * D)), l(static_cast<size_t>(nr * kSeg)), kept(static_cast<size_t>(kSeg)) {}
};

// asks for the next segment's images (bytes [p, end)) a slice at a time while this one's are multiplied, so that
// memory is read while the products run (the hardware's prefetcher alone ran out of reach of a segment's 50 KB)
struct Prefetch {
  const char *p, *end;
  int64_t step;  // bytes per slice
  void slice() {
    for (const char* q = p, *stop = std::min(end, p + step); q < stop; q += 64) __builtin_prefetch(q, 0, 1);
    p = std::min(end, p + step);
  }
};

// the dot products of every row with the segment's ns images (in sc.tile) -> sc.l (row stride kSeg)
void segment_dots(const ExpansionMeansArgs& A, int64_t ns, Scratch& sc, Prefetch& pf) {
  const int64_t D = A.D, nr = A.R;
  const double* Q = A.Q;
  double* S = sc.l.data();
  std::fill(sc.l.begin(), sc.l.end(), 0.0);
  for (int64_t j0 = 0; j0 < ns; j0 += kTile) {
    const double* x = sc.tile.data() + j0 * D;
    if (ns - j0 >= kTile)  // four images against every row, kChunk elements at a time (the images' and the rows'
      for (int64_t e0 = 0; e0 < D; e0 += kChunk) {  // chunks stay in the first-level cache)
        const int64_t len = std::min(kChunk, D - e0);
        pf.slice();
        int64_t r = 0;
        for (; r + 4 <= nr; r += 4) dots44(Q + r * D + e0, x + e0, len, D, S + r * kSeg + j0, kSeg);
        for (; r + 2 <= nr; r += 2) dots24(Q + r * D + e0, x + e0, len, D, S + r * kSeg + j0, kSeg);
        for (; r < nr; ++r) dots14(Q + r * D + e0, x + e0, len, D, S + r * kSeg + j0);
      }
    else
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < ns - j0; ++j) S[r * kSeg + j0 + j] = dot(Q + r * D, x + j * D, D);
  }
}

// every row's logits for the segment of images [n0, n0 + ns) -> L (R x N; the row's label differing: -inf), the
// images converted to double in sc.tile; the images up to n_next asked for
template <typename T>
void segment_logits(const ExpansionMeansArgs& A, const T* X, int64_t n0, int64_t ns, int64_t n_next, double* L,
                    Scratch& sc) {
  const int64_t D = A.D;
  for (int64_t j = 0; j < ns; ++j) to_double(X + (n0 + j) * D, sc.tile.data() + j * D, D);
  // the next segment's images (up to n_next), spread over this one's chunks of products
  const char* next = reinterpret_cast<const char*>(X + (n0 + ns) * D);
  const int64_t bytes = (n_next - n0 - ns) * D * static_cast<int64_t>(sizeof(T));
  const int64_t slices = (ns / kTile) * ((D + kChunk - 1) / kChunk);
  Prefetch pf{next, next + bytes, slices > 0 ? (bytes / slices + 64) / 64 * 64 : 0};
  segment_dots(A, ns, sc, pf);
  for (int64_t r = 0; r < A.R; ++r) {
    const double* l = sc.l.data() + r * kSeg;
    for (int64_t j = 0; j < ns; ++j) {
      const int64_t n = n0 + j;
      L[r * A.N + n] = A.row_label && A.img_label[n] != A.row_label[r] ? -std::numeric_limits<double>::infinity()
                                                                       : A.c1[r] * l[j] - A.c2[r] * A.sq[n];
    }
  }
}

// adds four weighted images x[0..3] (len elements each, converted to double as read) to the sums a of M groups (D
// apart), group i's weights c[i * kSeg + kept[j]]: each sum a chain of four multiply-adds, image by image
template <int M, typename T>
inline void add_rows4(const double* c, const int64_t* kept, const T* const* x, int64_t len, double* a, int64_t D) {
  double w[M][kTile];
  for (int i = 0; i < M; ++i)
    for (int64_t j = 0; j < kTile; ++j) w[i][j] = c[i * kSeg + kept[j]];
  const T *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) {
    const double v0 = x0[e], v1 = x1[e], v2 = x2[e], v3 = x3[e];
    for (int i = 0; i < M; ++i) {
      double& ai = a[i * D + e];
      ai = madd(w[i][3], v3, madd(w[i][2], v2, madd(w[i][1], v1, madd(w[i][0], v0, ai))));
    }
  }
}

// the weights and weighted sums of groups [g0, g0 + gc) for the segment of images [n0, n0 + ns) into a block's
// sums a (gc x D; set: zeroed yet, at the block's first image that a group keeps). W: the rows' weights (R x N),
// inv[r] = 1 / (|g| Z[r]) (0 where the row has no image). Returns how many of the segment's images some row (of any
// group) keeps where count is set (the first chunk of groups), else 0
template <typename T>
int64_t segment_sums(const ExpansionMeansArgs& A, const T* X, int64_t G, int64_t g0, int64_t gc, int64_t n0,
                     int64_t ns, const double* W, const double* inv, double* a, char& set, bool count, Scratch& sc) {
  const int64_t D = A.D, N = A.N;
  double* c = sc.l.data();  // gc x kSeg
  int64_t K = 0, any = 0;
  for (int64_t j = 0; j < ns; ++j) {
    const int64_t n = n0 + j;
    bool kept = false;  // by a row of the chunk's groups
    for (int64_t i = 0; i < gc; ++i) {
      double s = 0.0;
      for (int64_t r = g0 + i; r < A.R; r += G) s += W[r * N + n] * inv[r];
      c[i * kSeg + j] = s;
      kept |= s != 0.0;
    }
    if (count) {
      bool some = kept;  // by any row
      for (int64_t r = 0; r < A.R && !some; ++r) some = W[r * N + n] != 0.0;
      any += some;
    }
    if (kept) sc.kept[K++] = j;
  }
  if (K == 0) return any;
  if (!set) {  // every group's sums (the paths below add zero weights to the groups of four or two they share)
    std::fill(a, a + gc * D, 0.0);
    set = 1;
  }
  // kAcc elements at a time (the groups' sums in the first-level cache), four images and four groups at a time, the
  // groups short of four two and one at a time; the images short of four one at a time
  for (int64_t e0 = 0; e0 < D; e0 += kAcc) {
    const int64_t len = std::min(kAcc, D - e0);
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      const int64_t kn = std::min(kTile, K - k0);
      const T* x[kTile];
      for (int64_t j = 0; j < kn; ++j) x[j] = X + (n0 + sc.kept[k0 + j]) * D + e0;
      const int64_t* kj = &sc.kept[k0];
      int64_t i = 0;
      if (kn == kTile) {
        for (; i + 4 <= gc; i += 4) add_rows4<4>(c + i * kSeg, kj, x, len, a + i * D + e0, D);
        for (; i + 2 <= gc; i += 2) add_rows4<2>(c + i * kSeg, kj, x, len, a + i * D + e0, D);
        for (; i < gc; ++i) add_rows4<1>(c + i * kSeg, kj, x, len, a + i * D + e0, D);
        continue;
      }
      for (; i < gc; ++i) {
        double* ai = a + i * D + e0;
        for (int64_t j = 0; j < kn; ++j) {
          const double w = c[i * kSeg + kj[j]];
          const T* v = x[j];
          if (w == 0.0) continue;
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) ai[e] = madd(w, static_cast<double>(v[e]), ai[e]);
        }
      }
    }
  }
  return any;
}

template <typename T>
int64_t run(const ExpansionMeansArgs& A) {
  const T* X = static_cast<const T*>(A.X);
  const int64_t N = A.N, D = A.D, R = A.R, G = A.groups, per = block_images(N), nb = (N + per - 1) / per;
  const int nt = resolve_threads(A.n_threads, nb);
  std::vector<double> W(static_cast<size_t>(R * N)), inv(static_cast<size_t>(R));
  // groups in chunks whose blocks' sums fit the budget
  const int64_t gch = std::min(G, std::max<int64_t>(1, static_cast<int64_t>(kBlockBudget / (8.0 * nb * D))));
  std::unique_ptr<double[]> sums(new double[static_cast<size_t>(nb * gch * D)]);  // zeroed where first used
  std::vector<char> set(static_cast<size_t>(nb));  // a block's sums zeroed (it adds an image)
  std::vector<int64_t> kept_in(static_cast<size_t>(nb));
  std::vector<Scratch> scratch(static_cast<size_t>(nt), Scratch(D, R));  // gch <= G <= R
  // pass 1: every row's logits
#pragma omp parallel for num_threads(nt) schedule(dynamic)
  for (int64_t b = 0; b < nb; ++b) {  // nothing here allocates or throws
    const int64_t n1 = std::min(N, (b + 1) * per);
    for (int64_t n0 = b * per; n0 < n1; n0 += kSeg)
      segment_logits(A, X, n0, std::min(kSeg, n1 - n0), std::min(n1, n0 + 2 * kSeg), W.data(),
                     scratch[thread_index()]);
  }
  // each row's weights (in place of its logits) and their sum; inv: 1 / (|g| Z[r])
  std::vector<int64_t> size(static_cast<size_t>(G), 0);
  for (int64_t r = 0; r < R; ++r) ++size[r % G];
#pragma omp parallel for num_threads(std::min<int64_t>(nt, R)) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    double* w = W.data() + r * N;
    const double top = largest(w, N);
    double z = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const double d = w[n] - top;  // NaN where both are -inf (no image of the row's label): left out
      w[n] = d >= -A.cut ? std::exp(d) : 0.0;
      z += w[n];
    }
    inv[r] = z > 0.0 ? 1.0 / (static_cast<double>(size[r % G]) * z) : 0.0;
  }
  // pass 2: each group's weighted sum, per block, merged in block order
  int64_t kept = 0;
  for (int64_t g0 = 0; g0 < G; g0 += gch) {
    const int64_t gc = std::min(gch, G - g0);
#pragma omp parallel for num_threads(nt) schedule(dynamic)
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int64_t b = nb - 1 - bi;  // the blocks and their segments in reverse: those read last are still cached
      double* a = sums.get() + b * gch * D;
      set[b] = 0;
      const int64_t nfirst = b * per, n1 = std::min(N, (b + 1) * per);
      int64_t k = 0;
      for (int64_t n0 = nfirst + (n1 - nfirst - 1) / kSeg * kSeg; n0 >= nfirst; n0 -= kSeg)
        k += segment_sums(A, X, G, g0, gc, n0, std::min(kSeg, n1 - n0), W.data(), inv.data(), a, set[b], g0 == 0,
                          scratch[thread_index()]);
      kept_in[b] = k;
    }
    if (g0 == 0)
      for (int64_t b = 0; b < nb; ++b) kept += kept_in[b];
#pragma omp parallel for num_threads(std::min<int64_t>(nt, gc)) schedule(static)
    for (int64_t i = 0; i < gc; ++i) {
      double* out = A.out + (g0 + i) * D;
      std::fill(out, out + D, 0.0);
      for (int64_t b = 0; b < nb; ++b) {
        if (!set[b]) continue;
        const double* a = sums.get() + (b * gch + i) * D;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) out[e] += a[e];
      }
    }
  }
  // a group with a row that keeps no image (every logit -inf or NaN) has no mean
  for (int64_t r = 0; r < R; ++r)
    if (inv[r] == 0.0) std::fill(A.out + (r % G) * D, A.out + (r % G + 1) * D, std::numeric_limits<double>::quiet_NaN());
  return kept;
}

}  // namespace

int64_t expansion_means(const ExpansionMeansArgs& A) { return A.f32 ? run<float>(A) : run<double>(A); }

}  // namespace patchmosaic
