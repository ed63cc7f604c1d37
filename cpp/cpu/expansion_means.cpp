// expansion_means.cpp -- softmax-weighted means of whole training images for query rows that share them (the
// smoothed closed-form denoiser's draws, machines/smoothed.py), reading the images as they are stored (float32 or
// float64, converted to double as they are read: float32 images are read at half the bytes of a float64 copy) once
// for both the logits and the means (the first 16 images of each block twice):
//
//   logits  l[r, n] = c1[r] <q_r, x_n> - c2[r] sq[n]   (float64 dot products, four images and four rows at a time,
//           the rows short of four two and one at a time);
//   means   out[r] = sum_n w[r, n] x_n / sum_n w[r, n],  w[r, n] = exp(l[r, n] - max_n l[r, n]),
//           left out below e^-cut of the row's largest and where the labels differ.
//
// The images are cut into blocks fixed by N alone (not by the thread count), each a streaming softmax of its own
// (flash-attention's online form): a segment of 16 images is converted to double once, its logits taken, each row's
// running maximum raised (the block's sums rescaled when it rises), and the segment's weighted images added, so the
// images leave the caches after one visit. The running maxima start at a floor that every block shares (the
// largest logit over the first segment of every block), so that a block does not add what only its own first
// segments keep. The blocks' maxima, sums and weighted sums are merged in block order at the end. Which images a
// block adds, and in which order, depends only on the data: the result does not depend on the number of threads.
// A block may add an image whose weight is below e^-cut of the row's largest but not of the block's running
// maximum (one the merge would have left out): each below e^-cut of the row's largest weight, so the means differ
// from those of the exact cut by at most N e^-cut relative (below float64 rounding for N under 10^9 at cut 60; the
// op refuses cut < 30).
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
constexpr int64_t kSeg = 16;     // images per segment (converted once, used for the logits and the sums)
constexpr int64_t kAcc = 128;    // elements per step of a segment's weighted sums
constexpr double kBlockBudget = 64.0 * (1 << 20);  // bytes of the blocks' weighted sums (rows in groups to fit)

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

// a block's streaming softmax for rows [r0, r0 + nr): running maxima m and weight sums s (nr), weighted sums a
// (nr x D), the sums scaled to e^-m
struct BlockState {
  double *m, *s, *a;
  char* set;  // per row: its sums a set (zeroed) yet; a row is set where it (or its group of four) first adds
};

// the largest of l[0..n), NaN ignored (-inf if there is nothing else)
inline double largest(const double* l, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, l[j]);
  return m;
}

// a thread's working space for one segment, allocated before the parallel region (an exception may not leave one)
struct Scratch {
  std::vector<double> tile;   // the segment's images in double (kSeg x D)
  std::vector<double> l;      // their logits, then weights (nr x kSeg)
  std::vector<int64_t> kept;  // the segment's images that some row keeps
  std::vector<char> active;   // the rows that keep one of them
  Scratch(int64_t D, int64_t nr)
      : tile(static_cast<size_t>(kSeg * D)), l(static_cast<size_t>(nr * kSeg)), kept(static_cast<size_t>(kSeg)),
        active(static_cast<size_t>(nr)) {}
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

// the dot products of rows [r0, r0 + nr) with the segment's ns images (in sc.tile) -> sc.l (row stride kSeg)
void segment_dots(const ExpansionMeansArgs& A, int64_t r0, int64_t nr, int64_t ns, Scratch& sc, Prefetch& pf) {
  const int64_t D = A.D;
  const double* Q = A.Q + r0 * D;
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

// the logits of rows [r0, r0 + nr) for the segment of images [n0, n0 + ns) -> sc.l (row stride kSeg) and L (the
// row's label differing: -inf), the images converted to double in sc.tile; the images up to n_next asked for
template <typename T>
void segment_logits(const ExpansionMeansArgs& A, const T* X, int64_t r0, int64_t nr, int64_t n0, int64_t ns,
                    int64_t n_next, double* L, Scratch& sc) {
  const int64_t D = A.D;
  for (int64_t j = 0; j < ns; ++j) to_double(X + (n0 + j) * D, sc.tile.data() + j * D, D);
  // the next segment's images (up to n_next), spread over this one's chunks of products
  const char* next = reinterpret_cast<const char*>(X + (n0 + ns) * D);
  const int64_t bytes = (n_next - n0 - ns) * D * static_cast<int64_t>(sizeof(T));
  const int64_t slices = (ns / kTile) * ((D + kChunk - 1) / kChunk);
  Prefetch pf{next, next + bytes, slices > 0 ? (bytes / slices + 64) / 64 * 64 : 0};
  segment_dots(A, r0, nr, ns, sc, pf);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t rr = r0 + r;
    double* l = sc.l.data() + r * kSeg;
    for (int64_t j = 0; j < ns; ++j) {
      const int64_t n = n0 + j;
      l[j] = A.row_label && A.img_label[n] != A.row_label[rr] ? -std::numeric_limits<double>::infinity()
                                                              : A.c1[rr] * l[j] - A.c2[rr] * A.sq[n];
      L[rr * A.N + n] = l[j];
    }
  }
}

// adds four weighted images x[0..3] (len elements each) to the sums a of M rows (D apart), row i's weights
// l[i * kSeg + kept[j]]: each sum a chain of four multiply-adds, image by image (M = 4: sixteen multiply-adds per
// eight loads; M = 2: eight per six; M = 1: one load and store of the row's sums per four)
template <int M>
inline void add_rows4(const double* l, const int64_t* kept, const double* const* x, int64_t len, double* a,
                      int64_t D) {
  double w[M][kTile];
  for (int i = 0; i < M; ++i)
    for (int64_t j = 0; j < kTile; ++j) w[i][j] = l[i * kSeg + kept[j]];
  const double *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) {
    const double v0 = x0[e], v1 = x1[e], v2 = x2[e], v3 = x3[e];
    for (int i = 0; i < M; ++i) {
      double& ai = a[i * D + e];
      ai = madd(w[i][3], v3, madd(w[i][2], v2, madd(w[i][1], v1, madd(w[i][0], v0, ai))));
    }
  }
}

// one segment of images [n0, n0 + ns) into a block's state: its logits, each row's running maximum raised (the
// block's sums rescaled), the weights, and the weighted images of those some row keeps
template <typename T>
void segment(const ExpansionMeansArgs& A, const T* X, int64_t r0, int64_t nr, int64_t n0, int64_t ns, int64_t n_next,
             double* L, const BlockState& st, Scratch& sc) {
  const int64_t D = A.D;
  segment_logits(A, X, r0, nr, n0, ns, n_next, L, sc);
  for (int64_t r = 0; r < nr; ++r) {
    double* l = sc.l.data() + r * kSeg;
    const double mx = largest(l, ns);
    if (mx > st.m[r]) {  // a new largest logit: what the block has added so far, scaled to it
      if (st.s[r] > 0.0) {
        const double f = st.m[r] - mx >= -A.cut ? std::exp(st.m[r] - mx) : 0.0;
        double* a = st.a + r * D;
#pragma omp simd
        for (int64_t e = 0; e < D; ++e) a[e] *= f;
        st.s[r] *= f;
      }
      st.m[r] = mx;
    }
    char active = 0;  // whether the row adds something
    for (int64_t j = 0; j < ns; ++j) {
      const double d = l[j] - st.m[r];  // NaN where both are -inf (no image of the row's label yet): left out
      l[j] = d >= -A.cut ? std::exp(d) : 0.0;
      st.s[r] += l[j];
      active |= l[j] != 0.0;
    }
    sc.active[r] = active;
  }
  int64_t K = 0;  // the images some row keeps, in image order
  for (int64_t j = 0; j < ns; ++j)
    for (int64_t r = 0; r < nr; ++r)
      if (sc.l[r * kSeg + j] != 0.0) {
        sc.kept[K++] = j;
        break;
      }
  if (K == 0) return;
  // the groups of four and the pairs (of the four- and two-row paths) that hold a row adding something: their sums
  // set first
  const int64_t n4 = nr / 4 * 4, n2 = n4 + (nr - n4) / 2 * 2;
  for (int64_t r = 0, g = 0; r < nr; r += g) {
    g = r < n4 ? 4 : r < n2 ? 2 : 1;
    if (!std::any_of(&sc.active[r], &sc.active[r] + g, [](char c) { return c != 0; })) continue;
    for (int64_t i = r; i < r + g; ++i)
      if (!st.set[i]) {
        std::fill(st.a + i * D, st.a + (i + 1) * D, 0.0);
        st.set[i] = 1;
      }
  }
  // their weighted sums, kAcc elements at a time (the rows' sums and the images' chunks in the first-level cache),
  // four images and four rows at a time (sixteen multiply-adds per eight loads), the rows short of four two and one
  // at a time; fewer than four images (as at low noise, where a segment keeps one image or none) one image and one
  // row at a time
  for (int64_t e0 = 0; e0 < D; e0 += kAcc) {
    const int64_t len = std::min(kAcc, D - e0);
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      const int64_t kn = std::min(kTile, K - k0);
      const double* x[kTile];
      for (int64_t j = 0; j < kn; ++j) x[j] = sc.tile.data() + sc.kept[k0 + j] * D + e0;
      int64_t r = 0;
      if (kn == kTile) {
        for (; r + 4 <= nr; r += 4) {
          if (!(sc.active[r] | sc.active[r + 1] | sc.active[r + 2] | sc.active[r + 3])) continue;
          add_rows4<4>(sc.l.data() + r * kSeg, &sc.kept[k0], x, len, st.a + r * D + e0, D);
        }
        for (; r + 2 <= nr; r += 2) {
          if (!(sc.active[r] | sc.active[r + 1])) continue;
          add_rows4<2>(sc.l.data() + r * kSeg, &sc.kept[k0], x, len, st.a + r * D + e0, D);
        }
      }
      for (; r < nr; ++r) {
        double* a0 = st.a + r * D + e0;
        if (kn == kTile) {
          const double* wr = sc.l.data() + r * kSeg;
          if (std::all_of(&sc.kept[k0], &sc.kept[k0] + kTile, [wr](int64_t j) { return wr[j] == 0.0; })) continue;
          add_rows4<1>(wr, &sc.kept[k0], x, len, a0, D);
          continue;
        }
        for (int64_t j = 0; j < kn; ++j) {
          const double c = sc.l[r * kSeg + sc.kept[k0 + j]], *v = x[j];
          if (c == 0.0) continue;
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) a0[e] = madd(c, v[e], a0[e]);
        }
      }
    }
  }
}

// rows [r0, r0 + nr): every block's streaming softmax (blocks in parallel), then their merge in block order into
// out; M gets each row's largest logit
template <typename T>
void row_group(const ExpansionMeansArgs& A, const T* X, int64_t r0, int64_t nr, double* L, double* M,
               std::vector<double>& bm, std::vector<double>& bs, double* ba, std::vector<char>& bset,
               std::vector<double>& lower,
               std::vector<Scratch>& scratch, int nt) {
  const int64_t D = A.D, per = block_images(A.N), nb = (A.N + per - 1) / per;
  // a floor under each row's largest logit: the largest over every block's first segment (a function of the data
  // alone). The blocks start their running maxima there, so that no block adds images below e^-cut of it (the
  // merge would leave them out): without it a block adds what its first segments keep against their own maxima
#pragma omp parallel for num_threads(nt) schedule(dynamic)
  for (int64_t b = 0; b < nb; ++b) {
    Scratch& sc = scratch[thread_index()];
    const int64_t n0 = b * per, ns = std::min(kSeg, A.N - n0);
    segment_logits(A, X, r0, nr, n0, ns, n0 + ns, L, sc);
    for (int64_t r = 0; r < nr; ++r) bm[b * nr + r] = largest(&sc.l[r * kSeg], ns);
  }
  for (int64_t r = 0; r < nr; ++r) {
    lower[r] = -std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < nb; ++b) lower[r] = std::max(lower[r], bm[b * nr + r]);
  }
#pragma omp parallel for num_threads(nt) schedule(dynamic)
  for (int64_t b = 0; b < nb; ++b) {  // nothing here allocates or throws
    const BlockState st{bm.data() + b * nr, bs.data() + b * nr, ba + b * nr * D, bset.data() + b * nr};
    std::copy(lower.begin(), lower.begin() + nr, st.m);
    std::fill(st.s, st.s + nr, 0.0);
    std::fill(st.set, st.set + nr, 0);  // the weighted sums: set where first used
    const int64_t n1 = std::min(A.N, (b + 1) * per);
    for (int64_t n0 = b * per; n0 < n1; n0 += kSeg)
      segment(A, X, r0, nr, n0, std::min(kSeg, n1 - n0), std::min(n1, n0 + 2 * kSeg), L, st,
              scratch[thread_index()]);
  }
#pragma omp parallel for num_threads(std::min<int64_t>(nt, nr)) schedule(static)
  for (int64_t r = 0; r < nr; ++r) {
    double top = -std::numeric_limits<double>::infinity(), tot = 0.0;
    for (int64_t b = 0; b < nb; ++b) top = std::max(top, bm[b * nr + r]);
    double* out = A.out + (r0 + r) * D;
    std::fill(out, out + D, 0.0);
    for (int64_t b = 0; b < nb; ++b) {
      const double d = bm[b * nr + r] - top;
      if (!(d >= -A.cut) || bs[b * nr + r] == 0.0) continue;  // the block's images all below e^-cut of the row's
      const double f = std::exp(d), *a = ba + (b * nr + r) * D;
      tot += f * bs[b * nr + r];
#pragma omp simd
      for (int64_t e = 0; e < D; ++e) out[e] += f * a[e];
    }
    const double inv = 1.0 / tot;
    for (int64_t e = 0; e < D; ++e) out[e] *= inv;
    M[r0 + r] = top;
  }
}

template <typename T>
int64_t run(const ExpansionMeansArgs& A) {
  const T* X = static_cast<const T*>(A.X);
  const int64_t D = A.D, per = block_images(A.N), nb = (A.N + per - 1) / per;
  // rows in groups whose blocks' weighted sums fit the budget (a multiple of four rows: a row's dot products take
  // the same path in any group)
  int64_t rg = A.R;
  if (static_cast<double>(nb) * A.R * D * 8.0 > kBlockBudget)
    rg = std::min(A.R, std::max<int64_t>(4, static_cast<int64_t>(kBlockBudget / (8.0 * nb * D)) / 4 * 4));
  const int nt = resolve_threads(A.n_threads, nb);
  std::vector<double> L(static_cast<size_t>(A.R * A.N)), M(static_cast<size_t>(A.R));
  std::vector<double> bm(static_cast<size_t>(nb * rg)), bs(static_cast<size_t>(nb * rg));
  std::vector<double> lower(static_cast<size_t>(rg));
  std::unique_ptr<double[]> ba(new double[static_cast<size_t>(nb * rg * D)]);  // set row by row where first used
  std::vector<char> bset(static_cast<size_t>(nb * rg));
  std::vector<Scratch> scratch(static_cast<size_t>(nt), Scratch(D, rg));
  for (int64_t r0 = 0; r0 < A.R; r0 += rg)
    row_group(A, X, r0, std::min(rg, A.R - r0), L.data(), M.data(), bm, bs, ba.get(), bset, lower, scratch, nt);
  std::vector<char> keep(static_cast<size_t>(A.N), 0);  // the images whose weight some row keeps
  for (int64_t r = 0; r < A.R; ++r)
    for (int64_t n = 0; n < A.N; ++n) keep[n] |= L[r * A.N + n] - M[r] >= -A.cut;
  return std::count(keep.begin(), keep.end(), 1);
}

}  // namespace

int64_t expansion_means(const ExpansionMeansArgs& A) { return A.f32 ? run<float>(A) : run<double>(A); }

}  // namespace patchmosaic
