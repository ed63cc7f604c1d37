// aligned_softmax.cpp -- the CPU engine of the same-position machines (contract.hpp, AlignedCall): every row is a
// softmax over the training images at the query's own positions, its logit a weighted squared distance over the
// row's neighbourhood of elements.
//
// Forward: the training images kBlock at a time, transposed, with every query's squared residuals against them
// (fold_part), so that a row's distances to the block are one kBlock-wide multiply-add per neighbourhood element,
// or for a row of few runs one difference of prefix sums per run: O(N (D + |hood|)) per query image, vectorised over
// the images instead of the elements, which suits scattered neighbourhoods (a thresholded data mask) as well as
// square patches. A row whose neighbourhood differs from the previous row's in fewer elements than that costs takes
// the previous row's distances plus what it adds, less what it drops (hood_chain.hpp, chain_sums), while the
// rounding that accumulates allows.
//
// Backward: for each training image the squared residual once, with its prefix sums P (in double), a row's
// distance as the sum over its neighbourhood's *runs* -- maximal sequences of consecutive elements with one
// weight -- each one difference P[hi] - P[lo]; the derivatives scattered back through a difference array.
// Forward and backward take a row's distance from prefix sums only where their rounding cannot matter
// (runs_precise), element by element elsewhere.
//
// How each row is summed (its runs, runs or elements, its chain) is the table's HoodPlan, derived once per table and
// handed to every call on it (hood_plan_cpu; a call without one derives its own).
//
// Threads: each group's images (its label's training images) are split into contiguous parts of about kPart
// images; a part folds its images into its own online softmax states (softmax_state.hpp), threads take parts as
// they come, and the parts are merged in part order: the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"
#include "hood_chain.hpp"
#include "simd_exp.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

constexpr int kBlock = 16;        // training images whose logits are computed and folded together
constexpr int64_t kPart = 512;  // images of a part (the parts of a group: about this many each)

// A row's neighbourhood as runs [lo, hi) of consecutive elements with one weight w.
struct Runs {
  std::vector<int64_t> ptr;  // (n_rows + 1,)
  std::vector<int32_t> lo, hi;
  std::vector<double> w;
  std::vector<double> wsum;  // per row: the sum of |weight| over its elements
};

// Whether a row's distance from prefix sums is precise enough. A difference P[hi] - P[lo] of double prefix sums
// carries the rounding of every step between lo and hi, each at most 2^-53 of the prefix there (at most `ptot`, the
// squared residual's total over the image, the largest of the block's), so the row's distance is within
// 2^-53 wsum ptot and its logit within inv times that. Taken where that is at most 1e-10 for double (weights within
// 1e-10 relative) and 1e-6 for float (far below float's rounding of the logits); elsewhere the row is summed
// element by element: an element far from the query outside the row, or a very low noise level, would make the
// prefix differences lose the row's distance to cancellation.
template <typename T>
inline bool runs_precise(double inv, double wsum, double ptot) {
  constexpr double tol = sizeof(T) == 8 ? 1e-10 : 1e-6;
  return inv * wsum * ptot * 1.12e-16 <= tol;
}

// The weight of neighbourhood entry e (1 where the table has no weights).
template <typename T>
inline double entry_weight(const AlignedArgs<T>& A, int64_t e) {
  return A.hood_weight ? A.hood_weight[e] : 1.0;
}

// A neighbourhood element starts a run unless it follows its predecessor in the row with the same weight.
template <typename T>
inline bool starts_run(const AlignedArgs<T>& A, int64_t r, int64_t e) {
  if (e == A.hood_ptr[r]) return true;
  return A.hood_elem[e] != A.hood_elem[e - 1] + 1 || entry_weight(A, e) != entry_weight(A, e - 1);
}

// The runs of every row: counted, then written, row by row in parallel (a wide mask holds millions of elements).
template <typename T>
Runs make_runs(const AlignedArgs<T>& A) {
  Runs R;
  const int64_t nr = A.n_rows;
  R.ptr.assign(nr + 1, 0);
  const int nt = resolve_threads(A.n_threads, nr / 64 + 1);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < nr; ++r) {
    int64_t n = 0;
    for (int64_t e = A.hood_ptr[r]; e < A.hood_ptr[r + 1]; ++e) n += starts_run(A, r, e);
    R.ptr[r + 1] = n;
  }
  for (int64_t r = 0; r < nr; ++r) R.ptr[r + 1] += R.ptr[r];
  R.lo.resize(R.ptr[nr]);
  R.hi.resize(R.ptr[nr]);
  R.w.resize(R.ptr[nr]);
  R.wsum.assign(nr, 0.0);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < nr; ++r) {
    int64_t u = R.ptr[r] - 1;
    for (int64_t e = A.hood_ptr[r]; e < A.hood_ptr[r + 1]; ++e) {
      if (starts_run(A, r, e)) {
        ++u;
        R.lo[u] = A.hood_elem[e];
        R.w[u] = entry_weight(A, e);
      }
      R.hi[u] = A.hood_elem[e] + 1;
      R.wsum[r] += std::fabs(entry_weight(A, e));
    }
  }
  return R;
}

// The parts of the work: group g's images grp_img[i0 .. i1), for the group's query images.
struct Part {
  int64_t g, i0, i1;
};

struct Groups {
  std::vector<std::vector<int64_t>> queries;  // per group: its query images, ascending
  std::vector<Part> parts;                    // in merge order: by group, then image range
};

// A group's images in ceil(n / kPart) contiguous parts of equal size: the same parts for any number of threads,
// so that the merged results do not depend on it.
template <typename T>
Groups make_parts(const AlignedArgs<T>& A) {
  Groups G;
  G.queries.assign(A.n_groups, {});
  for (int64_t b = 0; b < A.B; ++b) G.queries[A.group_of_b[b]].push_back(b);
  for (int64_t g = 0; g < A.n_groups; ++g) {
    if (G.queries[g].empty()) continue;
    const int64_t n = A.grp_img_ptr[g + 1] - A.grp_img_ptr[g];
    const int64_t k = std::max<int64_t>(1, (n + kPart - 1) / kPart);
    for (int64_t p = 0; p < k; ++p)
      G.parts.push_back({g, A.grp_img_ptr[g] + n * p / k, A.grp_img_ptr[g] + n * (p + 1) / k});
  }
  return G;
}

// The weighted distance of row r from the prefix sums P of the squared residual delta^2 (P[D]: its total), or
// element by element where the prefix differences would not be precise enough (runs_precise).
template <typename T>
inline double row_distance(const AlignedArgs<T>& A, const Runs& R, int64_t r, double inv, const double* __restrict P,
                           const double* __restrict delta) {
  double d = 0.0;
  if (runs_precise<double>(inv, R.wsum[r], P[A.D])) {
    for (int64_t u = R.ptr[r]; u < R.ptr[r + 1]; ++u) d += R.w[u] * (P[R.hi[u]] - P[R.lo[u]]);
  } else {
    for (int64_t e = A.hood_ptr[r]; e < A.hood_ptr[r + 1]; ++e) {
      const double v = delta[A.hood_elem[e]];
      d += entry_weight(A, e) * v * v;
    }
  }
  return d;
}

// One part's online softmax states of its group's query images: per (query, row) m, s, best; per (query,
// response entry) the weighted sum acc.
struct PartState {
  std::vector<double> m, s, acc;
  std::vector<int64_t> best;
};

// A block of kBlock values of T (one per image of a block), as one GCC vector: the compiler maps it to the
// module's registers (one zmm for float under AVX-512, two ymm under AVX2, ...), so that the block's arithmetic
// is written once for every instruction set.
template <typename T>
struct BlockVec {
  typedef T type __attribute__((vector_size(kBlock * sizeof(T))));
};

// The widest vector the module's instruction set holds in one register, and a block as such pieces: GCC keeps a
// vector wider than that (a block of 16 doubles anywhere, of 16 floats under AVX2 or SSE) in memory, so a
// loop-carried accumulator of the block type is stored and reloaded at every step (measured: the AVX2 build of this
// kernel was slower than the SSE one); the accumulating loops below hold their sums as arrays of native pieces,
// which stay in registers, lane for lane the same arithmetic.
#if defined(__AVX512F__)
constexpr int kNativeBytes = 64;
#elif defined(__AVX__)
constexpr int kNativeBytes = 32;
#else
constexpr int kNativeBytes = 16;
#endif
template <typename T>
struct Pieces {
  typedef T type __attribute__((vector_size(kNativeBytes)));
  static constexpr int n = kBlock * static_cast<int>(sizeof(T)) / kNativeBytes;  // native vectors per block
  static inline type load(const void* block, int p) {
    type v;
    __builtin_memcpy(&v, static_cast<const char*>(block) + p * kNativeBytes, kNativeBytes);
    return v;
  }
  static inline void store(void* block, int p, const type& v) {
    __builtin_memcpy(static_cast<char*>(block) + p * kNativeBytes, &v, kNativeBytes);
  }
};

// The largest and the sum of a GCC vector's W lanes, by halves (a tree of log2 W vector operations instead of a
// serial chain of W - 1 dependent scalar ones: the chain's latency was most of a small neighbourhood's time).
template <typename T, int W>
struct Lanes {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
  typedef T half __attribute__((vector_size(W / 2 * sizeof(T))));
  static inline void split(const type& v, half& lo, half& hi) {
    __builtin_memcpy(&lo, &v, sizeof(half));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(half), sizeof(half));
  }
  static inline T sum(const type& v) {
    if constexpr (W == 2) {
      return v[0] + v[1];
    } else {
      half lo, hi;
      split(v, lo, hi);
      return Lanes<T, W / 2>::sum(lo + hi);
    }
  }
  static inline T max(const type& v) {
    if constexpr (W == 2) {
      return v[0] > v[1] ? v[0] : v[1];
    } else {
      half lo, hi;
      split(v, lo, hi);
      return Lanes<T, W / 2>::max(lo > hi ? lo : hi);
    }
  }
};

// The lane-wise tree sum of a block's lanes (the order of Lanes::sum: halves, then halves of
// those), and exp_nonpos of every lane, taken by its native pieces (Pieces): lane for lane the values of the
// block-wide forms, without a vector wider than a register.
template <typename T, int P = Pieces<T>::n>
inline typename Pieces<T>::type piece_tree(const typename Pieces<T>::type* v) {
  if constexpr (P == 1) {
    return v[0];
  } else {
    typename Pieces<T>::type h[P / 2];
    for (int i = 0; i < P / 2; ++i) h[i] = v[i] + v[i + P / 2];
    return piece_tree<T, P / 2>(h);
  }
}
template <typename T, typename B>
inline T block_sum(const B& v) {
  if constexpr (kNativeBytes == 64) return Lanes<T, kBlock>::sum(v);
  typename Pieces<T>::type p[Pieces<T>::n];
  for (int i = 0; i < Pieces<T>::n; ++i) p[i] = Pieces<T>::load(&v, i);
  return Lanes<T, kNativeBytes / static_cast<int>(sizeof(T))>::sum(piece_tree<T>(p));
}
template <typename B>
inline B block_exp(const B& d) {
  B w;
  for (int i = 0; i < Pieces<float>::n; ++i) {
    Pieces<float>::store(&w, i, exp_nonpos_vec(Pieces<float>::load(&d, i)));
  }
  return w;
}

// The 16 x 16 transpose of rows r[0..15] (r[i][l] -> r[l][i]) in registers: four stages that each swap the
// off-diagonal blocks of side b = 8, 4, 2, 1 between rows i and i + b (two shuffles per pair of rows), instead of
// 256 scalar stores at a 64-byte stride -- the block copy was a quarter of a small neighbourhood's time.
template <int b, typename V, size_t... L>
inline V swap_low(const V& x, const V& y, std::index_sequence<L...>) {
  return __builtin_shufflevector(x, y, ((L & b) == 0 ? L : kBlock + L - b)...);
}
template <int b, typename V, size_t... L>
inline V swap_high(const V& x, const V& y, std::index_sequence<L...>) {
  return __builtin_shufflevector(x, y, ((L & b) == 0 ? L + b : kBlock + L)...);
}
template <int b, typename V>
inline void transpose_stage(V* r) {
  constexpr auto lanes = std::make_index_sequence<kBlock>{};
  for (int i = 0; i < kBlock; ++i) {
    if (i & b) continue;
    const V lo = swap_low<b>(r[i], r[i + b], lanes), hi = swap_high<b>(r[i], r[i + b], lanes);
    r[i] = lo;
    r[i + b] = hi;
  }
}

// Phi[e][j] = rows[j][e] for e < D: the block's images, transposed (kBlock of them, as kBlock-lane vectors).
template <typename T>
inline void transpose_block(const T* const* rows, int64_t D, typename BlockVec<T>::type* __restrict Phi) {
  using V = typename BlockVec<T>::type;
  static_assert(kBlock == 16, "the register transpose is written for 16 lanes");
  int64_t e0 = 0;
  for (; e0 + kBlock <= D; e0 += kBlock) {
    V r[kBlock];
    for (int j = 0; j < kBlock; ++j) __builtin_memcpy(&r[j], rows[j] + e0, sizeof(V));
    transpose_stage<8>(r);
    transpose_stage<4>(r);
    transpose_stage<2>(r);
    transpose_stage<1>(r);
    for (int l = 0; l < kBlock; ++l) Phi[e0 + l] = r[l];
  }
  for (int j = 0; j < kBlock; ++j)
    for (int64_t e = e0; e < D; ++e) Phi[e][j] = rows[j][e];
}

// A block's logits in double, as the module's native vectors (two zmm under AVX-512): GCC keeps a 16-double vector
// in memory, and its stores and reloads between a row's sums, its tests and its weights were a large part of a
// small neighbourhood's time.
struct Logits {
  using N = typename Pieces<double>::type;
  static constexpr int P = Pieces<double>::n;  // pieces
  static constexpr int W = kNativeBytes / static_cast<int>(sizeof(double));  // lanes per piece
  N p[P];
  double lane(int j) const { return p[j / W][j % W]; }
};

// Lanes [p W, (p + 1) W) of a block of T as doubles (W: Logits::W), by lane shuffles (a copy through memory
// stalled on its store).
template <int p, size_t... L>
inline typename Logits::N float_lanes_as_double(const typename BlockVec<float>::type& v, std::index_sequence<L...>) {
  return __builtin_convertvector(__builtin_shufflevector(v, v, (p * Logits::W + L)...), typename Logits::N);
}
template <typename T, int p>
inline typename Logits::N piece_as_double(const typename BlockVec<T>::type& v) {
  if constexpr (sizeof(T) == 8) return Pieces<double>::load(&v, p);
  else return float_lanes_as_double<p>(v, std::make_index_sequence<Logits::W>{});
}

// f(std::integral_constant<int, p>{}) for p = 0 .. P - 1 (a piece index the shuffles can take as a constant).
template <int P, typename F>
inline void for_pieces(F&& f) {
  [&]<int... p>(std::integer_sequence<int, p...>) { (f(std::integral_constant<int, p>{}), ...); }(
      std::make_integer_sequence<int, P>{});
}

// The block of T of L - m (for float: each lane rounded once, from the double difference).
template <typename T>
inline typename BlockVec<T>::type shifted(const Logits& L, double m) {
  typename BlockVec<T>::type out;
  if constexpr (sizeof(T) == 8) {
    for (int p = 0; p < Logits::P; ++p) Pieces<double>::store(&out, p, L.p[p] - m);
  } else {
    typedef float H __attribute__((vector_size(Logits::W * sizeof(float))));
#if defined(__AVX512F__)  // the two halves joined by a shuffle
    const H lo = __builtin_convertvector(L.p[0] - m, H), hi = __builtin_convertvector(L.p[1] - m, H);
    out = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    for (int p = 0; p < Logits::P; ++p) {
      const H x = __builtin_convertvector(L.p[p] - m, H);
      __builtin_memcpy(reinterpret_cast<char*>(&out) + p * Logits::W * sizeof(float), &x, sizeof(H));
    }
#endif
  }
  return out;
}

// The largest lane of L (a NaN lane may or may not be taken, as Lanes::max).
inline double logits_max(const Logits& L) {
  typename Logits::N m = L.p[0];
  for (int p = 1; p < Logits::P; ++p) m = m > L.p[p] ? m : L.p[p];
  return Lanes<double, Logits::W>::max(m);
}

// Whether some lane of L is not below v (kNotBelow: a NaN lane counts) or above v (kAbove): lane-wise comparisons
// folded into one flag instead of the block's largest logit (a horizontal reduction), which a row needs only when its
// maximum rises.
enum class Cmp { kNotBelow, kAbove };
template <Cmp c>
inline bool any_lane(const Logits& L, double v) {
#if defined(__AVX512F__)
  constexpr int pred = c == Cmp::kNotBelow ? _CMP_NLT_UQ : _CMP_GT_OQ;
  const __m512d b = _mm512_set1_pd(v);
  __mmask8 k = 0;
  for (int p = 0; p < Logits::P; ++p) k |= _mm512_cmp_pd_mask(reinterpret_cast<const __m512d&>(L.p[p]), b, pred);
  return k != 0;
#elif defined(__AVX__)
  constexpr int pred = c == Cmp::kNotBelow ? _CMP_NLT_UQ : _CMP_GT_OQ;
  const __m256d b = _mm256_set1_pd(v);
  int k = 0;
  for (int p = 0; p < Logits::P; ++p)
    k |= _mm256_movemask_pd(_mm256_cmp_pd(reinterpret_cast<const __m256d&>(L.p[p]), b, pred));
  return k != 0;
#elif defined(__SSE2__)
  const __m128d b = _mm_set1_pd(v);
  int k = 0;
  for (int p = 0; p < Logits::P; ++p) {
    const __m128d x = reinterpret_cast<const __m128d&>(L.p[p]);
    k |= _mm_movemask_pd(c == Cmp::kNotBelow ? _mm_cmpnlt_pd(x, b) : _mm_cmpgt_pd(x, b));
  }
  return k != 0;
#else
  for (int j = 0; j < kBlock; ++j)
    if (c == Cmp::kNotBelow ? !(L.lane(j) < v) : L.lane(j) > v) return true;
  return false;
#endif
}

// v with its lanes below the smallest normal T in magnitude set to 0 (a rescaled sum that small is below T's
// resolution of the row's new sums, whose largest weight is 1)
template <typename V>
inline V flush_tiny(const V& v) {
  using T = std::remove_cvref_t<decltype(v[0])>;
  constexpr T tiny = std::numeric_limits<T>::min();
  return (v < tiny && v > -tiny) ? V{} : v;
}

// Whether every weight of the table is 1 (a plain mask: the distance needs no multiplication).
template <typename T>
bool unit_weights(const AlignedArgs<T>& A) {
  if (!A.hood_weight) return true;
  for (int64_t u = 0; u < A.hood_ptr[A.n_rows]; ++u)
    if (A.hood_weight[u] != 1.0) return false;
  return true;
}

// The sum over the elements he[u0 .. u1) of (weight hw[u] *) their rows of Res, added to L in double: four
// independent accumulators (the additions' latency), in T over at most kChunk elements at a time, then in double.
template <typename T, bool WEIGHTED>
inline void element_sums(const int32_t* __restrict he, const double* __restrict hw, int64_t u0, int64_t u1,
                         const typename BlockVec<T>::type* __restrict Res, typename Logits::N* L) {
  using V = typename BlockVec<T>::type;
  using N = typename Pieces<T>::type;
  constexpr int P = Pieces<T>::n;
  constexpr int kChunk = 32;
  for (; u0 < u1; u0 += kChunk) {
    const int64_t u2 = std::min<int64_t>(u1, u0 + kChunk);
    N s0[P] = {}, s1[P] = {}, s2[P] = {}, s3[P] = {};
    int64_t u = u0;
    for (; u + 4 <= u2; u += 4) {
      const V *r0 = Res + he[u], *r1 = Res + he[u + 1], *r2 = Res + he[u + 2], *r3 = Res + he[u + 3];
      for (int p = 0; p < P; ++p) {
        if constexpr (WEIGHTED) {
          s0[p] += static_cast<T>(hw[u]) * Pieces<T>::load(r0, p);
          s1[p] += static_cast<T>(hw[u + 1]) * Pieces<T>::load(r1, p);
          s2[p] += static_cast<T>(hw[u + 2]) * Pieces<T>::load(r2, p);
          s3[p] += static_cast<T>(hw[u + 3]) * Pieces<T>::load(r3, p);
        } else {
          s0[p] += Pieces<T>::load(r0, p);
          s1[p] += Pieces<T>::load(r1, p);
          s2[p] += Pieces<T>::load(r2, p);
          s3[p] += Pieces<T>::load(r3, p);
        }
      }
    }
    for (; u < u2; ++u)
      for (int p = 0; p < P; ++p) {
        if constexpr (WEIGHTED) s0[p] += static_cast<T>(hw[u]) * Pieces<T>::load(Res + he[u], p);
        else s0[p] += Pieces<T>::load(Res + he[u], p);
      }
    V sum;
    for (int p = 0; p < P; ++p) {
      Pieces<T>::store(&sum, p, (s0[p] + s1[p]) + (s2[p] + s3[p]));
    }
    for_pieces<Logits::P>([&](auto p) { L[p] += piece_as_double<T, p>(sum); });
  }
}

// The sum over row r's neighbourhood of (weight *) its elements' rows of Res, times scale.
template <typename T, bool WEIGHTED>
inline void row_sums(const AlignedArgs<T>& A, int64_t r, const typename BlockVec<T>::type* __restrict Res,
                     double scale, Logits& out) {
  typename Logits::N L[Logits::P] = {};
  element_sums<T, WEIGHTED>(A.hood_elem, A.hood_weight, A.hood_ptr[r], A.hood_ptr[r + 1], Res, L);
  for (int p = 0; p < Logits::P; ++p) out.p[p] = scale * L[p];
}

// The same sums by the row's runs, from the block's prefix sums Pre[e] = sum_{e' < e} Res[e'] in double: one
// difference per run (a wide neighbourhood of few runs: a large patch, a high-noise mask). Unit weights (WEIGHTED
// false: every mask of PCA-locality, LS, PSPC) add the differences without reading or multiplying a weight (the
// same values: 1 * d is d).
template <typename T, bool WEIGHTED>
inline void row_sums_runs(const Runs& R, int64_t r, const typename BlockVec<double>::type* __restrict Pre,
                          double scale, Logits& out) {
  using VD = typename BlockVec<double>::type;
  using N = typename Pieces<double>::type;
  constexpr int P = Pieces<double>::n;
  N s0[P] = {}, s1[P] = {};
  int64_t u = R.ptr[r];
  for (; u + 2 <= R.ptr[r + 1]; u += 2) {
    const VD *h0 = Pre + R.hi[u], *l0 = Pre + R.lo[u], *h1 = Pre + R.hi[u + 1], *l1 = Pre + R.lo[u + 1];
    for (int p = 0; p < P; ++p) {
      const N d0 = Pieces<double>::load(h0, p) - Pieces<double>::load(l0, p);
      const N d1 = Pieces<double>::load(h1, p) - Pieces<double>::load(l1, p);
      if constexpr (WEIGHTED) {
        s0[p] += R.w[u] * d0;
        s1[p] += R.w[u + 1] * d1;
      } else {
        s0[p] += d0;
        s1[p] += d1;
      }
    }
  }
  if (u < R.ptr[r + 1])
    for (int p = 0; p < P; ++p) {
      const N d = Pieces<double>::load(Pre + R.hi[u], p) - Pieces<double>::load(Pre + R.lo[u], p);
      if constexpr (WEIGHTED) s0[p] += R.w[u] * d;
      else s0[p] += d;
    }
  for (int p = 0; p < P; ++p) out.p[p] = scale * (s0[p] + s1[p]);
}

// Row r's distances from row r - 1's (prev), plus the elements it adds and less those it drops (hood_chain.hpp). A
// chain starts at a row summed on its own: by its runs (exact to runs_precise's tolerance; acc starts at 0) or by
// its elements (within 10 u of its distance, u T's unit roundoff: acc starts at the distance). The added and
// dropped elements are summed as row_sums sums elements (in T over chunks of 32, then in double), within 10 u of
// their total, which acc adds up; so a chained distance is within 10 u acc of its exact value, lane by lane, and a
// row is chained only while acc is below kChainSlack times its distance in every lane: within kChainSlack times the
// bound of summing the row element by element. Returns false, with out and acc unchanged, where it is not (a new
// chain starts there).
constexpr double kChainSlack = 4.0;
template <typename T>
inline bool chain_sums(const Chain& C, int64_t r, const typename BlockVec<T>::type* __restrict Res,
                       const typename Logits::N* prev, typename Logits::N* acc, Logits& out) {
  typename Logits::N add[Logits::P] = {}, drop[Logits::P] = {};
  const int64_t u0 = C.ptr[r], um = u0 + C.n_add[r], u1 = C.ptr[r + 1];
  element_sums<T, false>(C.elem.data(), nullptr, u0, um, Res, add);
  element_sums<T, false>(C.elem.data(), nullptr, um, u1, Res, drop);
  Logits cand, over;
  typename Logits::N next[Logits::P];
  for (int p = 0; p < Logits::P; ++p) {
    cand.p[p] = (prev[p] + add[p]) - drop[p];
    next[p] = (acc[p] + add[p]) + drop[p];
    over.p[p] = next[p] - kChainSlack * cand.p[p];
  }
  if (any_lane<Cmp::kNotBelow>(over, 0.0)) return false;  // (a NaN lane counts: summed on its own)
  out = cand;
  for (int p = 0; p < Logits::P; ++p) acc[p] = next[p];
  return true;
}

// Per row, whether its runs cost fewer vector loads than its elements (four per run -- two prefix sums of kBlock
// doubles -- against one per element in float, two in double).
template <typename T>
std::vector<char> rows_by_runs(const AlignedArgs<T>& A, const Runs& R) {
  std::vector<char> by(A.n_rows);
  const int64_t per_element = sizeof(T) == 4 ? 1 : 2;
  for (int64_t r = 0; r < A.n_rows; ++r)
    by[r] = 4 * (R.ptr[r + 1] - R.ptr[r]) < per_element * (A.hood_ptr[r + 1] - A.hood_ptr[r]);
  return by;
}

// The rows summed from their predecessor's (hood_chain.hpp; float and unit weights only: in double, chains were
// 0.89-0.97x as fast on LS and PCA-locality): where the elements a row adds and drops cost less than the row on its
// own. Measured costs, in vector loads: an element gathered from Res about 2 (an 11 x 11 square chained, 22
// elements instead of 11 runs, was no faster); a run 4 (two prefix sums of two loads); kChainOverhead for the
// chaining itself (small rows at low noise were slower chained at 4); and chains only where they save at least
// kChainSaving of the table's loads (LS's squares and low-noise masks, which save less, were up to 8% slower).
constexpr int64_t kChainOverhead = 8;
constexpr double kChainSaving = 0.1;
template <typename T>
Chain chain_rows(const AlignedArgs<T>& A, const Runs& R, const std::vector<char>& by_runs, bool unit) {
  const int64_t nr = A.n_rows, per_element = 2;
  if (sizeof(T) == 8 || !unit) return Chain{};
  std::vector<int64_t> direct(nr);
  for (int64_t r = 0; r < nr; ++r)  // (a row summed by its elements counted at 3/4: at low noise, where rows are,
                                    // their distances are small and chains restart more often)
    direct[r] = by_runs[r] ? 4 * (R.ptr[r + 1] - R.ptr[r]) : 3 * per_element * (A.hood_ptr[r + 1] - A.hood_ptr[r]) / 4;
  return make_chain(nr, R.ptr.data(), R.lo.data(), R.hi.data(), direct, per_element, kChainOverhead, kChainSaving,
                    A.n_threads);
}

// One part's images, kBlock at a time, for every query image of its group. The block is transposed once
// (Phi[e][j] = phi_j[e]), and per query its squared residuals Res[e][j] = (x[e] - a Phi[e][j])^2, so that a row's
// distances to the block's images are one kBlock-wide (multiply-)add per neighbourhood element (row_sums), or, for
// a row of few runs, one difference of prefix sums per run (row_sums_runs); its logits fold at once into the
// row's state: a block none of whose logits is within the cut of the row's maximum is skipped, the maximum is
// raised (raise_max; the block's largest logit taken only then), and the weights (cut_exp vectorised) and the
// weighted response values are added lane by lane, summed over the lanes at the part's end.
template <typename T, bool WEIGHTED>
void fold_part(const AlignedArgs<T>& A, const Runs& R, const std::vector<char>& by_runs, const Chain& C,
               const std::vector<int64_t>& qs, const Part& part, PartState& S) {
  using V = typename BlockVec<T>::type;
  using VD = typename BlockVec<double>::type;
  const bool any_runs = std::find(by_runs.begin(), by_runs.end(), 1) != by_runs.end();
  constexpr int NB = kBlock;
  const int64_t nr = A.n_rows, D = A.D, nq = static_cast<int64_t>(qs.size());
  S.m.assign(nq * nr, -std::numeric_limits<double>::infinity());
  S.s.assign(nq * nr, 0.0);
  S.best.assign(nq * nr, -1);
  S.acc.assign(nq * A.n_resp, 0.0);
  std::vector<V> Phi(D), Res(D);  // over-aligned element type: std::allocator aligns it
  // Per (query, row) and per (query, response entry): the weights' and the weighted values' sums lane by lane
  // (image j of every block adds to lane j), each rescaled with its row's maximum, and summed over the lanes at
  // the part's end: no horizontal sum per row and block. A lane adds at most kPart / kBlock blocks in T.
  std::vector<V> sl(nq * nr, V{}), al(nq * A.n_resp, V{});
  std::vector<VD> Pre(any_runs ? D + 1 : 0);
  for (int64_t i0 = part.i0; i0 < part.i1; i0 += NB) {
    const int nb = static_cast<int>(std::min<int64_t>(NB, part.i1 - i0));
    V tail;  // 1 for the block's images, 0 for a short block's repeated lanes
    for (int j = 0; j < NB; ++j) tail[j] = j < nb ? T(1) : T(0);
    const T* rows[NB];  // a short block repeats its first image (its logits are never used)
    for (int j = 0; j < NB; ++j) rows[j] = A.train + static_cast<int64_t>(A.grp_img[i0 + (j < nb ? j : 0)]) * D;
    transpose_block<T>(rows, D, Phi.data());
    for (int64_t qi = 0; qi < nq; ++qi) {
      const int64_t b = qs[qi];
      const T* x = A.query + b * D;
      const T a = static_cast<T>(A.a[b]);
      const double inv = A.inv_2b2[b];
      for (int64_t e = 0; e < D; ++e) {
        const V dl = x[e] - a * Phi[e];
        Res[e] = dl * dl;
      }
      if (any_runs) {  // the running sum in registers (native pieces), each prefix stored as it is made
        using ND = typename Pieces<double>::type;
        constexpr int PD = Pieces<double>::n;
        ND run[PD] = {};
        Pre[0] = VD{};
        for (int64_t e = 0; e < D; ++e) {
          for_pieces<PD>([&](auto p) {
            run[p] += piece_as_double<T, p>(Res[e]);
            Pieces<double>::store(&Pre[e + 1], p, run[p]);
          });
        }
      }
      // the block's largest total of the squared residual (the precision of its prefix differences)
      double ptot = 0.0;
      if (any_runs)
        for (int j = 0; j < nb; ++j) ptot = std::max(ptot, Pre[D][j]);
      double* m = S.m.data() + qi * nr;
      int64_t* best = S.best.data() + qi * nr;
      V* sq = sl.data() + qi * nr;
      V* aq = al.data() + qi * A.n_resp;
      // row r - 1's distances and its chain's terms' total, kept where row r is chained
      typename Logits::N prev[Logits::P], acc[Logits::P];
      for (int64_t r = 0; r < nr; ++r) {
        if (A.hood_ptr[r + 1] == A.hood_ptr[r]) {  // an empty neighbourhood (a constant pixel's row in a PCA
          // mask): every logit -inv * 0, every weight 1 -- the fold's own values, without its exponentials
          if (m[r] == -std::numeric_limits<double>::infinity()) {
            m[r] = -0.0;
            best[r] = A.grp_img[i0];
          }
          sq[r] += tail;
          for (int64_t e = A.resp_ptr[r]; e < A.resp_ptr[r + 1]; ++e) aq[e] += tail * Phi[A.resp_elem[e]];
          continue;
        }
        Logits L;
        const bool runs = by_runs[r] && runs_precise<T>(inv, R.wsum[r], ptot);
        if (!C.any) {  // (no row chained: the row's sums scaled as they are made)
          if (runs) row_sums_runs<T, WEIGHTED>(R, r, Pre.data(), -inv, L);
          else row_sums<T, WEIGHTED>(A, r, Res.data(), -inv, L);
        } else {
          if (!(C.on[r] && chain_sums<T>(C, r, Res.data(), prev, acc, L))) {  // summed on its own
            if (runs) row_sums_runs<T, WEIGHTED>(R, r, Pre.data(), 1.0, L);
            else row_sums<T, WEIGHTED>(A, r, Res.data(), 1.0, L);
            if (C.on[r + 1])  // a chain starts here: its rounding so far (by runs: none; by elements: 10 u L)
              for (int p = 0; p < Logits::P; ++p) acc[p] = runs ? typename Logits::N{} : L.p[p];
          }
          for (int p = 0; p < Logits::P; ++p) {
            if (C.on[r + 1]) prev[p] = L.p[p];
            L.p[p] *= -inv;
          }
        }
        // every weight of the block exactly 0 (block_counts of its largest logit; a short block's repeated
        // lanes equal its first)
        if (!any_lane<Cmp::kNotBelow>(L, m[r] - ExpCut<T>::value)) continue;
        const double top = any_lane<Cmp::kAbove>(L, m[r]) ? logits_max(L) : m[r];
        if (top > m[r]) {  // (a NaN lane may make `top` NaN: then, as for a block below the maximum, no raise)
          int arg = 0;  // the block's first image of the largest logit
          while (arg < kBlock - 1 && L.lane(arg) != top) ++arg;
          best[r] = A.grp_img[i0 + arg];
          const double f = raise_max(m[r], top);
          const T ft = f < static_cast<double>(std::numeric_limits<T>::min()) ? T(0) : static_cast<T>(f);
          sq[r] = flush_tiny(sq[r] * ft);  // (no subnormal lane stays for later blocks to add to)
          for (int64_t e = A.resp_ptr[r]; e < A.resp_ptr[r + 1]; ++e) aq[e] = flush_tiny(aq[e] * ft);
        }
        const V d = shifted<T>(L, m[r]);
        V w;  // the weights: cut_exp of softmax_state.hpp, vectorised (exp_nonpos); 0 past a short block's end
        if constexpr (sizeof(T) == 4) w = block_exp(d);
        else
          for (int j = 0; j < NB; ++j) w[j] = exp_nonpos(d[j]);
        if (nb < NB) w *= tail;
        sq[r] += w;
        for (int64_t e = A.resp_ptr[r]; e < A.resp_ptr[r + 1]; ++e) aq[e] += w * Phi[A.resp_elem[e]];
      }
    }
  }
  // the lanes' sums, each in the order of block_sum, into the part's state
  for (int64_t u = 0; u < nq * nr; ++u) S.s[u] = static_cast<double>(block_sum<T>(sl[u]));
  for (int64_t u = 0; u < nq * A.n_resp; ++u) S.acc[u] = static_cast<double>(block_sum<T>(al[u]));
}

}  // namespace

// A table's rows as the passes sum them, derived once per table and T instead of at every call (on PCA-locality's
// MNIST masks at high noise that took a quarter of a call): every row's runs, which rows are summed by their runs,
// and the chains. It records the buffers and sizes of the table it was derived from, and a call whose table has
// other buffers or sizes, or another T, refuses it (plan_of); it holds no reference to them, so it is valid only
// while those buffers live unchanged: Python keeps it on the ElementTable that owns them (ops/engines.py).
struct HoodPlan {
  const int64_t* hood_ptr;
  const int32_t* hood_elem;
  const double* hood_weight;
  int64_t n_rows, n_hood, D;
  size_t elem_size;
  bool unit;
  Runs R;
  std::vector<char> by_runs;
  Chain C;
};

template <typename T>
std::shared_ptr<const HoodPlan> hood_plan_cpu(const AlignedArgs<T>& A) {
  auto P = std::make_shared<HoodPlan>();
  P->hood_ptr = A.hood_ptr;
  P->hood_elem = A.hood_elem;
  P->hood_weight = A.hood_weight;
  P->n_rows = A.n_rows;
  P->n_hood = A.hood_ptr[A.n_rows];
  P->D = A.D;
  P->elem_size = sizeof(T);
  P->unit = unit_weights(A);
  P->R = make_runs(A);
  P->by_runs = rows_by_runs(A, P->R);
  P->C = chain_rows(A, P->R, P->by_runs, P->unit);
  return P;
}

namespace {

// The call's plan: `given` where it was derived from this call's table and T, else an error; derived here (held by
// `own`) where none is given.
template <typename T>
const HoodPlan& plan_of(const AlignedArgs<T>& A, const HoodPlan* given, std::shared_ptr<const HoodPlan>& own) {
  if (!given) {
    own = hood_plan_cpu(A);
    return *own;
  }
  if (given->hood_ptr != A.hood_ptr || given->hood_elem != A.hood_elem || given->hood_weight != A.hood_weight ||
      given->n_rows != A.n_rows || given->n_hood != A.hood_ptr[A.n_rows] || given->D != A.D ||
      given->elem_size != sizeof(T))
    throw std::invalid_argument("aligned_softmax: the HoodPlan was derived from another element table or dtype");
  return *given;
}

}  // namespace

template <typename T>
void aligned_forward_cpu(const AlignedArgs<T>& A, const HoodPlan* given) {
  std::shared_ptr<const HoodPlan> own;
  const HoodPlan& plan = plan_of(A, given, own);
  const Groups G = make_parts(A);
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(G.parts.size()));
  std::vector<PartState> states(G.parts.size());
  FirstError error;
  const int64_t np = static_cast<int64_t>(G.parts.size());
  const auto fold = plan.unit ? &fold_part<T, false> : &fold_part<T, true>;
#pragma omp parallel for num_threads(resolve_threads(nt, np)) schedule(dynamic, 1)
  for (int64_t p = 0; p < np; ++p)
    error.run([&] { fold(A, plan.R, plan.by_runs, plan.C, G.queries[G.parts[p].g], G.parts[p], states[p]); });
  error.rethrow();
  // merge each group's parts in order
  const int64_t nr = A.n_rows;
  std::vector<double> acc;
  for (int64_t g = 0; g < A.n_groups; ++g) {
    const auto& qs = G.queries[g];
    for (size_t qi = 0; qi < qs.size(); ++qi) {
      const int64_t b = qs[qi];
      for (int64_t r = 0; r < nr; ++r) {
        double m = -std::numeric_limits<double>::infinity(), s = 0.0;
        int64_t best = -1;
        const int64_t j0 = A.resp_ptr[r], j1 = A.resp_ptr[r + 1];
        acc.assign(j1 - j0, 0.0);
        for (size_t p = 0; p < G.parts.size(); ++p) {
          if (G.parts[p].g != g) continue;
          const PartState& P = states[p];
          const int64_t st = static_cast<int64_t>(qi) * nr + r;
          const MergeFactors f = merge_state(m, s, best, P.m[st], P.s[st], P.best[st]);
          for (int64_t j = j0; j < j1; ++j)
            acc[j - j0] = acc[j - j0] * f.self + P.acc[static_cast<int64_t>(qi) * A.n_resp + j] * f.other;
        }
        for (int64_t j = j0; j < j1; ++j) A.out[b * A.n_resp + j] = static_cast<T>(acc[j - j0] / s);
        A.stats[2 * (b * nr + r)] = m;
        A.stats[2 * (b * nr + r) + 1] = s;
        if (A.arg_key) {
          A.arg_key[b * nr + r] = best;
          A.arg_share[b * nr + r] = static_cast<T>(1.0 / s);
        }
      }
    }
  }
}

template <typename T>
void aligned_backward_cpu(const AlignedArgs<T>& A, const HoodPlan* given) {
  std::shared_ptr<const HoodPlan> own;
  const Runs& R = plan_of(A, given, own).R;
  const Groups G = make_parts(A);
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(G.parts.size()));
  const int64_t nr = A.n_rows, D = A.D, np = static_cast<int64_t>(G.parts.size());
  // per part and query image of its group: the gradient of the query, of a and of inv_2b2
  std::vector<std::vector<double>> gx(np), gab(np);
  FirstError error;
#pragma omp parallel for num_threads(resolve_threads(nt, np)) schedule(dynamic, 1)
  for (int64_t p = 0; p < np; ++p)
    error.run([&] {
      const Part& part = G.parts[p];
      const auto& qs = G.queries[part.g];
      const int64_t nq = static_cast<int64_t>(qs.size());
      gx[p].assign(nq * D, 0.0);
      gab[p].assign(nq * 2, 0.0);
      std::vector<double> P(D + 1), delta(D), dif(D + 1);
      for (int64_t i = part.i0; i < part.i1; ++i) {
        const T* phi = A.train + static_cast<int64_t>(A.grp_img[i]) * D;
        for (int64_t qi = 0; qi < nq; ++qi) {
          const int64_t b = qs[qi];
          const T* x = A.query + b * D;
          const double a = A.a[b], inv = A.inv_2b2[b];
          double acc = 0.0;
          P[0] = 0.0;
          for (int64_t e = 0; e < D; ++e) {
            delta[e] = static_cast<double>(x[e]) - a * static_cast<double>(phi[e]);
            acc += delta[e] * delta[e];
            P[e + 1] = acc;
          }
          std::fill(dif.begin(), dif.end(), 0.0);
          double gs = 0.0;
          bool any = false;
          for (int64_t r = 0; r < nr; ++r) {
            const double d = row_distance(A, R, r, inv, P.data(), delta.data());
            const double* st = A.stats + 2 * (b * nr + r);
            const double w = cut_exp<T, double>(-inv * d - st[0]) / st[1];
            if (w == 0.0) continue;
            double gv = 0.0;  // <g, phi[resp] - out> over the row's response
            for (int64_t j = A.resp_ptr[r]; j < A.resp_ptr[r + 1]; ++j)
              gv += static_cast<double>(A.grad_out[b * A.n_resp + j]) *
                    (static_cast<double>(phi[A.resp_elem[j]]) - static_cast<double>(A.out[b * A.n_resp + j]));
            const double c = w * gv;  // d<g, out> / d l_n
            if (c == 0.0) continue;
            any = true;
            gs -= c * d;
            for (int64_t u = R.ptr[r]; u < R.ptr[r + 1]; ++u) {
              dif[R.lo[u]] += c * R.w[u];
              dif[R.hi[u]] -= c * R.w[u];
            }
          }
          double* g = gx[p].data() + qi * D;
          double ga = 0.0, G = 0.0;
          if (any)
            for (int64_t e = 0; e < D; ++e) {
              G += dif[e];  // sum over the rows holding e of c * w_e
              g[e] -= 2.0 * inv * delta[e] * G;
              ga += 2.0 * inv * static_cast<double>(phi[e]) * delta[e] * G;
            }
          gab[p][2 * qi] += ga;
          gab[p][2 * qi + 1] += gs;
        }
      }
    });
  error.rethrow();
  std::vector<double> sum(D);
  for (int64_t g = 0; g < A.n_groups; ++g) {
    const auto& qs = G.queries[g];
    for (size_t qi = 0; qi < qs.size(); ++qi) {
      const int64_t b = qs[qi];
      std::fill(sum.begin(), sum.end(), 0.0);
      double ga = 0.0, gs = 0.0;
      for (int64_t p = 0; p < np; ++p) {
        if (G.parts[p].g != g) continue;
        const double* gp = gx[p].data() + qi * D;
        for (int64_t e = 0; e < D; ++e) sum[e] += gp[e];
        ga += gab[p][2 * qi];
        gs += gab[p][2 * qi + 1];
      }
      for (int64_t e = 0; e < D; ++e) A.grad_query[b * D + e] = static_cast<T>(sum[e]);
      A.grad_a[b] = ga;
      A.grad_inv_2b2[b] = gs;
    }
  }
}

template std::shared_ptr<const HoodPlan> hood_plan_cpu<float>(const AlignedArgs<float>&);
template std::shared_ptr<const HoodPlan> hood_plan_cpu<double>(const AlignedArgs<double>&);
template void aligned_forward_cpu<float>(const AlignedArgs<float>&, const HoodPlan*);
template void aligned_forward_cpu<double>(const AlignedArgs<double>&, const HoodPlan*);
template void aligned_backward_cpu<float>(const AlignedArgs<float>&, const HoodPlan*);
template void aligned_backward_cpu<double>(const AlignedArgs<double>&, const HoodPlan*);

}  // namespace patchmosaic
