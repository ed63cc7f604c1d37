// patch_softmax.cpp -- the CPU kernel of every local machine (LS, ELS, boundary-aware ELS).
//
// Work is split into items: (image group g, query-pixel class c, block of query rows, range of keys).
// An item gathers its query patches once, then streams its keys in blocks of kKB: each key block is
// gathered on the fly (patches never exist for more than one block), and every tile of kMR query
// rows is multiplied against it by a register-blocked micro-kernel; the resulting logits fold into
// each row's online softmax. Each key is gathered once per (group, class, row block), not once per
// row tile. Items over different key ranges of the same rows produce partial states (max, sum,
// weighted centres, arg-max) that merge associatively at the end, in a fixed order, so results do
// not depend on the number of threads or their scheduling.
#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "../patch_softmax.hpp"
#include "online_softmax.hpp"
#include "patch_gather.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

constexpr int kKB = 256;            // keys per streamed block
constexpr int64_t kRowBlock = 4096; // query rows per item at most (bounds the query-patch buffer)
constexpr double kTargetItems = 64;  // work items per call, roughly: enough to balance 2..32 threads

// Micro-tile: kMR query rows x NR keys of accumulators, held in vector registers.
#if defined(__AVX512F__)
constexpr int kMR = 6;
template <typename T> struct Tile { static constexpr int NR = 64 / sizeof(T) * 4; };  // four zmm
#else
constexpr int kMR = 4;
template <typename T> struct Tile { static constexpr int NR = 32 / sizeof(T) * 2; };  // two ymm
#endif

// 64 bytes of T as one GCC vector (one zmm register, or two ymm): element-wise max without a
// reduction the auto-vectoriser would have to recognise.
template <typename T> struct Vec64;
template <> struct Vec64<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct Vec64<double> { typedef double type __attribute__((vector_size(64))); };

// Logits of one tile of kMR query rows against a block of keys, and each row's block maximum:
//   L[m][j] = c1[m] * sum_dd Q[dd][m] Kt[dd][j] - c2[m] * kn[j]   (j < nk; -inf beyond)
// Q is one packed tile, [d][kMR]; the dot products stay in registers until turned into logits.
template <typename T>
inline void logit_tile(const T* __restrict Q, const T* __restrict Kt, int d, const T* __restrict kn, int nk,
                       const T* __restrict c1, const T* __restrict c2, T* __restrict L, T* __restrict bmax) {
  constexpr int NR = Tile<T>::NR;
  constexpr int kLanes = 64 / sizeof(T);
  static_assert(NR % kLanes == 0 && kKB % NR == 0, "tile sizes");
  const T ninf = -std::numeric_limits<T>::infinity();
  using Vec = typename Vec64<T>::type;
  Vec lmax[kMR];
  for (int m = 0; m < kMR; ++m) lmax[m] = Vec{} + ninf;
  for (int j0 = 0; j0 < kKB; j0 += NR) {
    T acc[kMR][NR] = {};
    for (int dd = 0; dd < d; ++dd) {
      const T* kv = Kt + static_cast<int64_t>(dd) * kKB + j0;
      for (int m = 0; m < kMR; ++m) {
        const T qv = Q[static_cast<int64_t>(dd) * kMR + m];
#pragma omp simd
        for (int j = 0; j < NR; ++j) acc[m][j] += qv * kv[j];
      }
    }
    for (int m = 0; m < kMR; ++m) {
      T* Lm = L + m * kKB + j0;
      for (int j = 0; j < NR; ++j) {
        const T v = c1[m] * acc[m][j] - c2[m] * kn[j0 + j];
        Lm[j] = j0 + j < nk ? v : ninf;
      }
      for (int u = 0; u < NR; u += kLanes) {
        Vec v;
        std::memcpy(&v, Lm + u, sizeof(Vec));
        lmax[m] = lmax[m] > v ? lmax[m] : v;
      }
    }
  }
  for (int m = 0; m < kMR; ++m) {
    T lanes[kLanes];
    std::memcpy(lanes, &lmax[m], sizeof(Vec));
    T mx = lanes[0];
    for (int l = 1; l < kLanes; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
    bmax[m] = mx;
  }
}

// Logit below which a weight is exactly zero relative to the running maximum (see exp_nonpos).
template <typename T> constexpr double kCut = 87.0;
template <> constexpr double kCut<double> = 700.0;

struct Item {
  int64_t g, c, row0, row1, k0, k1;
  int64_t part;  // first row of this item's partial state
};

template <typename T>
struct Workspace {
  std::vector<T> Qp, S, Kt, knorm, V, Wt, bmax;
  std::vector<double> knorm_acc;
  std::vector<int64_t> key_id, base;
  std::vector<T> c1, c2;
  Workspace(int d, int C) : S(static_cast<size_t>(kMR) * kKB), Kt(static_cast<size_t>(d) * kKB), knorm(kKB),
                            V(static_cast<size_t>(C) * kKB), Wt(kKB), bmax(kMR), knorm_acc(kKB), key_id(kKB), base(kKB) {}
};

struct Partials {
  std::vector<double> m, s, acc;
  std::vector<int64_t> best;
  Partials(int64_t rows, int C) : m(rows, -std::numeric_limits<double>::infinity()), s(rows, 0.0),
                                  acc(static_cast<size_t>(rows) * C, 0.0), best(rows, -1) {}
};

// Fold one row's block of dot products S[0..nk) into its online softmax state (m, s, acc, best).
// CC: the channel count when known at compile time (1 or 3; 0 = runtime C), so that the exponential,
// the sum and the weighted centres are one fused, vectorised pass.
template <typename T, int CC>
inline void fold_row(const T* __restrict L, T bmax, Workspace<T>& ws, int nk, double& m, double& s, double* acc,
                     int64_t& best, int C_runtime) {
  const int C = CC > 0 ? CC : C_runtime;
  if (static_cast<double>(bmax) < m - kCut<T>) return;  // every weight of the block is exactly 0
  if (static_cast<double>(bmax) > m) {
    int barg = 0;
    while (L[barg] != bmax) ++barg;
    const double f = std::isinf(m) ? 0.0 : std::exp(m - static_cast<double>(bmax));
    s *= f;
    for (int c = 0; c < C; ++c) acc[c] *= f;
    m = bmax;
    best = ws.key_id[barg];
  }
  const T mt = static_cast<T>(m);
  const T* __restrict V = ws.V.data();
  if constexpr (CC == 1) {
    T wsum = T(0), v0 = T(0);
    for (int j = 0; j < nk; ++j) {
      const T w = exp_nonpos(L[j] - mt);
      wsum += w;
      v0 += w * V[j];
    }
    s += wsum;
    acc[0] += v0;
  } else if constexpr (CC == 3) {
    T wsum = T(0), v0 = T(0), v1 = T(0), v2 = T(0);
    for (int j = 0; j < nk; ++j) {
      const T w = exp_nonpos(L[j] - mt);
      wsum += w;
      v0 += w * V[j];
      v1 += w * V[kKB + j];
      v2 += w * V[2 * kKB + j];
    }
    s += wsum;
    acc[0] += v0;
    acc[1] += v1;
    acc[2] += v2;
  } else {
    T* __restrict W = ws.Wt.data();
    T wsum = T(0);
    for (int j = 0; j < nk; ++j) {
      W[j] = exp_nonpos(L[j] - mt);
      wsum += W[j];
    }
    s += wsum;
    for (int c = 0; c < C; ++c) {
      const T* Vc = V + static_cast<int64_t>(c) * kKB;
      T vsum = T(0);
      for (int j = 0; j < nk; ++j) vsum += W[j] * Vc[j];
      acc[c] += vsum;
    }
  }
}

template <typename T>
void run_item(const PatchSoftmaxArgs<T>& A, const Item& it, const std::vector<std::vector<int64_t>>& bs,
              Workspace<T>& ws, Partials& P) {
  const int C = A.C, k = A.k;
  const int d = C * k * k;
  const int64_t HW = static_cast<int64_t>(A.H) * A.W;
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  const int64_t q0 = A.cls_qpix_ptr[it.c], npix = A.cls_qpix_ptr[it.c + 1] - q0;
  const int64_t p0 = A.cls_kpos_ptr[it.c], npos = A.cls_kpos_ptr[it.c + 1] - p0;
  const int64_t i0 = A.grp_img_ptr[it.g];
  const int rows = static_cast<int>(it.row1 - it.row0);
  const int rows_padded = (rows + kMR - 1) / kMR * kMR;

  // gather the query rows straight into tiles of kMR rows, dd-major (Qp[tile][dd][m]), so the
  // micro-kernel broadcasts consecutive values; zero rows pad the last tile
  ws.Qp.assign(static_cast<size_t>(rows_padded) * d, T(0));
  ws.c1.assign(rows_padded, T(0));
  ws.c2.assign(rows_padded, T(0));
  for (int r = 0; r < rows; ++r) {
    const int64_t row = it.row0 + r;
    const int64_t b = bs[it.g][row / npix];
    const int64_t pix = A.cls_qpix[q0 + row % npix];
    T* dst = ws.Qp.data() + static_cast<int64_t>(r / kMR) * kMR * d + r % kMR;
    gather_run(A.query + b * C * HWq, C, A.Hq, A.Wq, static_cast<int>(pix / A.Wq), static_cast<int>(pix % A.Wq), 1,
               k, A.query_pad, dst, kMR);
    const double a = A.a[b], s = A.inv_2b2[b];
    ws.c1[r] = static_cast<T>(2.0 * a * s);
    ws.c2[r] = static_cast<T>(a * a * s);
  }
  double* pm = P.m.data() + it.part;
  double* ps = P.s.data() + it.part;
  double* pacc = P.acc.data() + it.part * C;
  int64_t* pbest = P.best.data() + it.part;

  // key counters advance incrementally: key kk = (image i0 + kk / npos, position p0 + kk % npos)
  int64_t img_i = it.k0 / npos, pos_i = it.k0 % npos;
  for (int64_t kb0 = it.k0; kb0 < it.k1; kb0 += kKB) {
    const int nk = static_cast<int>(std::min<int64_t>(kKB, it.k1 - kb0));
    // Key centres of the block (flat offsets into the training buffer), values and ids. Count the
    // runs of horizontally adjacent keys of one image along the way.
    const int64_t img_i0 = img_i, pos_i0 = pos_i;
    int runs = 0;
    for (int j = 0; j < nk; ++j) {
      const int64_t n = A.grp_img[i0 + img_i];
      const int64_t pos = A.cls_kpos[p0 + pos_i];
      const int64_t base = n * C * HW + pos;
      runs += (j == 0 || base != ws.base[j - 1] + 1 || pos % A.W == 0) ? 1 : 0;
      ws.base[j] = base;
      for (int c = 0; c < C; ++c) ws.V[static_cast<int64_t>(c) * kKB + j] = A.train[base + c * HW];
      ws.key_id[j] = n * HW + pos;
      if (++pos_i == npos) { pos_i = 0; ++img_i; }
    }
    if (A.key_pad == kPadZeros && runs * 8 > nk) {
      // Short runs (edge and corner classes, LS): every key of a class has the same padding signature,
      // so one pattern of padded entries holds for the whole block; gather each patch entry dd of
      // all keys at once through the centre offsets.
      const int64_t pos0 = A.cls_kpos[p0 + pos_i0];
      const int ci = static_cast<int>(pos0 / A.W), cj = static_cast<int>(pos0 % A.W), r = k / 2;
      for (int c = 0, dd = 0; c < C; ++c)
        for (int di = 0; di < k; ++di)
          for (int dj = 0; dj < k; ++dj, ++dd) {
            T* row = ws.Kt.data() + static_cast<int64_t>(dd) * kKB;
            const int y = ci - r + di, x = cj - r + dj;
            if (y < 0 || y >= A.H || x < 0 || x >= A.W) {
              std::fill(row, row + nk, T(0));
              continue;
            }
            const T* src = A.train + c * HW + static_cast<int64_t>(di - r) * A.W + (dj - r);
            const int64_t* base = ws.base.data();
            for (int j = 0; j < nk; ++j) row[j] = src[base[j]];
          }
    } else {
      // long runs (interior classes): each patch entry of a run is one contiguous copy (gather_run)
      int64_t gi = img_i0, gp = pos_i0;
      for (int j = 0; j < nk;) {
        const int64_t n = A.grp_img[i0 + gi];
        const int32_t* kp = A.cls_kpos + p0 + gp;
        const int64_t pos = kp[0];
        const int ci = static_cast<int>(pos / A.W), cj = static_cast<int>(pos % A.W);
        int L = 1;
        while (j + L < nk && gp + L < npos && kp[L] == pos + L && cj + L < A.W) ++L;
        gather_run(A.train + n * C * HW, C, A.H, A.W, ci, cj, L, k, A.key_pad, ws.Kt.data() + j, kKB);
        j += L;
        gp += L;
        if (gp == npos) { gp = 0; ++gi; }
      }
    }
    if (nk < kKB)
      for (int dd = 0; dd < d; ++dd)
        std::fill(ws.Kt.begin() + static_cast<int64_t>(dd) * kKB + nk, ws.Kt.begin() + static_cast<int64_t>(dd + 1) * kKB, T(0));
    // key norms, accumulated in double over dd (vectorised over keys)
    std::fill(ws.knorm_acc.begin(), ws.knorm_acc.end(), 0.0);
    for (int dd = 0; dd < d; ++dd) {
      const T* row = ws.Kt.data() + static_cast<int64_t>(dd) * kKB;
      double* acc = ws.knorm_acc.data();
#pragma omp simd
      for (int j = 0; j < kKB; ++j) acc[j] += static_cast<double>(row[j]) * row[j];
    }
    for (int j = 0; j < kKB; ++j) ws.knorm[j] = static_cast<T>(ws.knorm_acc[j]);

    for (int r0 = 0; r0 < rows; r0 += kMR) {
      logit_tile(ws.Qp.data() + static_cast<int64_t>(r0) * d, ws.Kt.data(), d, ws.knorm.data(), nk,
                 ws.c1.data() + r0, ws.c2.data() + r0, ws.S.data(), ws.bmax.data());
      const int mr = std::min(kMR, rows - r0);
      for (int m = 0; m < mr; ++m) {
        const int r = r0 + m;
        double* acc = pacc + static_cast<int64_t>(r) * C;
        const T* Sr = ws.S.data() + m * kKB;
        if (C == 1) fold_row<T, 1>(Sr, ws.bmax[m], ws, nk, pm[r], ps[r], acc, pbest[r], C);
        else if (C == 3) fold_row<T, 3>(Sr, ws.bmax[m], ws, nk, pm[r], ps[r], acc, pbest[r], C);
        else fold_row<T, 0>(Sr, ws.bmax[m], ws, nk, pm[r], ps[r], acc, pbest[r], C);
      }
    }
  }
}

}  // namespace

template <typename T>
void patch_softmax_cpu(const PatchSoftmaxArgs<T>& A) {
  if (A.k < 1 || A.k % 2 == 0) throw std::invalid_argument("patch size k must be odd and positive, got " + std::to_string(A.k));
  std::vector<std::vector<int64_t>> bs(static_cast<size_t>(A.n_groups));
  for (int64_t b = 0; b < A.B; ++b) {
    const int32_t g = A.group_of_b[b];
    if (g < 0 || g >= A.n_groups) throw std::invalid_argument("group_of_b out of range");
    bs[g].push_back(b);
  }
  // total work, to size the key ranges so that there are several items per thread
  double total_pairs = 0.0;
  for (int64_t g = 0; g < A.n_groups; ++g) {
    if (bs[g].empty()) continue;
    const int64_t nimg = A.grp_img_ptr[g + 1] - A.grp_img_ptr[g];
    if (nimg == 0) throw std::invalid_argument("an image group has no training images");
    for (int64_t c = 0; c < A.n_classes; ++c) {
      const int64_t npix = A.cls_qpix_ptr[c + 1] - A.cls_qpix_ptr[c];
      const int64_t npos = A.cls_kpos_ptr[c + 1] - A.cls_kpos_ptr[c];
      if (npix > 0 && npos == 0) throw std::invalid_argument("a query-pixel class has no key positions");
      total_pairs += static_cast<double>(bs[g].size() * npix) * static_cast<double>(nimg * npos);
    }
  }
  // A fixed number of work items (not one that depends on the thread count): the split of keys into
  // ranges, and so the order of floating-point sums, is the same whatever the number of threads.
  const double target = std::max(total_pairs / kTargetItems, 1.0);
  std::vector<Item> items;
  int64_t part_rows = 0;
  for (int64_t g = 0; g < A.n_groups; ++g) {
    if (bs[g].empty()) continue;
    const int64_t nimg = A.grp_img_ptr[g + 1] - A.grp_img_ptr[g];
    for (int64_t c = 0; c < A.n_classes; ++c) {
      const int64_t npix = A.cls_qpix_ptr[c + 1] - A.cls_qpix_ptr[c];
      if (npix == 0) continue;
      const int64_t nkeys = nimg * (A.cls_kpos_ptr[c + 1] - A.cls_kpos_ptr[c]);
      const int64_t nrows = static_cast<int64_t>(bs[g].size()) * npix;
      for (int64_t r0 = 0; r0 < nrows; r0 += kRowBlock) {
        const int64_t r1 = std::min(nrows, r0 + kRowBlock);
        const double pairs = static_cast<double>(r1 - r0) * static_cast<double>(nkeys);
        const int64_t max_chunks = (nkeys + kKB - 1) / kKB;
        const int64_t chunks = std::clamp<int64_t>(static_cast<int64_t>(pairs / target + 0.5), 1, max_chunks);
        const int64_t per = (max_chunks + chunks - 1) / chunks * kKB;  // keys per chunk, a multiple of kKB
        for (int64_t k0 = 0; k0 < nkeys; k0 += per) {
          items.push_back({g, c, r0, r1, k0, std::min(nkeys, k0 + per), part_rows});
          part_rows += r1 - r0;
        }
      }
    }
  }
  Partials P(part_rows, A.C);
  const int d = A.C * A.k * A.k;
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(items.size()));
#pragma omp parallel num_threads(nt)
  {
    Workspace<T> ws(d, A.C);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) run_item(A, items[i], bs, ws, P);
  }

  // merge the key-range partials of each (group, class, row block), in item order, and write out
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  const int C = A.C;
  std::vector<double> acc;
  for (size_t i = 0; i < items.size();) {
    size_t j = i + 1;
    while (j < items.size() && items[j].g == items[i].g && items[j].c == items[i].c && items[j].row0 == items[i].row0) ++j;
    const Item& it = items[i];
    const int64_t rows = it.row1 - it.row0;
    const int64_t npix = A.cls_qpix_ptr[it.c + 1] - A.cls_qpix_ptr[it.c];
    for (int64_t r = 0; r < rows; ++r) {
      RowState st;
      acc.assign(C, 0.0);
      for (size_t u = i; u < j; ++u) {
        const int64_t pr = items[u].part + r;
        if (P.s[pr] == 0.0) continue;
        const MergeFactors mf = merge_partial(st, P.m[pr], P.s[pr], P.best[pr]);
        for (int c = 0; c < C; ++c) acc[c] = acc[c] * mf.old_scale + P.acc[pr * C + c] * mf.part_scale;
      }
      const int64_t row = it.row0 + r;
      const int64_t b = bs[it.g][row / npix];
      const int64_t pix = A.cls_qpix[A.cls_qpix_ptr[it.c] + row % npix];
      for (int c = 0; c < C; ++c) A.out[(b * C + c) * HWq + pix] = static_cast<T>(acc[c] / st.s);
      if (A.arg_key) A.arg_key[b * HWq + pix] = st.best;
      if (A.arg_share) A.arg_share[b * HWq + pix] = static_cast<T>(1.0 / st.s);
    }
    i = j;
  }
}

template void patch_softmax_cpu<float>(const PatchSoftmaxArgs<float>&);
template void patch_softmax_cpu<double>(const PatchSoftmaxArgs<double>&);

}  // namespace patchmosaic
