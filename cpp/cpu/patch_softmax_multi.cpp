// patch_softmax_multi.cpp -- the CPU kernel of the local machines at several patch sizes in one pass
// (forward only, no provenance): a calibration sweep evaluates the same queries at k = 3, 5, ..., k_max.
//
// The squared distance of two patches of size ks[j] is that of size ks[j-1] plus the sum over the ring of
// elements between the two sizes (the smaller patch is the centre of the larger one, under zero padding and
// circular wrap alike). So the query and key patches are gathered once, at the largest size, and their
// elements are visited ring by ring (smallest size first): the register tile of dot products that the
// single-size kernel turns into logits once is turned into logits after each ring, one tile of logits per
// size, with the keys' squared norms likewise accumulated ring by ring. The logits of each size fold into
// that size's own online softmax state.
//
// Key sets may depend on the size (the padding signatures of boundary-aware ELS, the fully-inside patches
// of periodic ELS): a class here is a set of query pixels that share a class at every size, its key
// positions are the union over the sizes, and each key position carries a mask of the sizes it serves
// (contract.hpp, PM_LOCAL_MULTI_FIELDS). A key outside a size's set gets the logit -inf there: weight 0,
// exactly as if it were absent. Within a block, the dot products stop after the largest size any of its
// keys serves.
//
// Work items, their fixed split and the fixed merge order are those of the single-size kernel (plan.hpp),
// so results do not depend on the number of threads.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "fold_row.hpp"
#include "key_block.hpp"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

using cpu::kKB;
using cpu::kMR;

// The elements of a patch of size ks[last] in ring order: first those of the patch of size ks[0], then the
// ring that grows it to ks[1], and so on (within a ring: channel, row, column). perm[e] is the element's
// index in the engines' order (channel, row, column); end[j] = C ks[j]^2 is where size j's prefix ends.
struct RingOrder {
  std::vector<int> perm, end;
  RingOrder(int C, const int32_t* ks, int n_ks) {
    const int k = ks[n_ks - 1], R = k / 2;
    for (int j = 0; j < n_ks; ++j) {
      const int lo = j == 0 ? -1 : ks[j - 1] / 2, hi = ks[j] / 2;
      for (int c = 0; c < C; ++c)
        for (int di = 0; di < k; ++di)
          for (int dj = 0; dj < k; ++dj) {
            const int ring = std::max(std::abs(di - R), std::abs(dj - R));
            if (ring > lo && ring <= hi) perm.push_back((c * k + di) * k + dj);
          }
      end.push_back(static_cast<int>(perm.size()));
    }
  }
};

// Logits of one tile of kMR query rows against a block of keys at sizes 0..top, and each row's block maximum
// per size: L[(j kMR + m) kKB + i] = c1[m] <Q_m, K_i>_j - c2[m] |K_i|^2_j, where <,>_j runs over the first
// end[j] elements in ring order; -inf for keys beyond nk or outside size j's key set.
template <typename T>
inline void logit_tile_multi(const T* __restrict Q, const T* __restrict Kt, const RingOrder& ring, int top,
                             const T* __restrict kn, const uint32_t* __restrict mask, int nk, const T* __restrict c1,
                             const T* __restrict c2, T* __restrict L, T* __restrict bmax) {
  constexpr int NR = cpu::Tile<T>::NR;
  constexpr int kLanes = 64 / sizeof(T);
  static_assert(NR % kLanes == 0 && kKB % NR == 0, "tile sizes");
  const T ninf = -std::numeric_limits<T>::infinity();
  const int* perm = ring.perm.data();
  for (int i = 0; i < (top + 1) * kMR; ++i) bmax[i] = ninf;
  for (int j0 = 0; j0 < kKB && j0 < nk; j0 += NR) {
    T acc[kMR][NR] = {};
    int dd = 0;
    for (int j = 0; j <= top; ++j) {
      for (; dd < ring.end[j]; ++dd) {
        const int e = perm[dd];
        const T* kv = Kt + static_cast<int64_t>(e) * kKB + j0;
        const T* qv = Q + static_cast<int64_t>(e) * kMR;
        for (int m = 0; m < kMR; ++m) {
          const T q = qv[m];
#pragma omp simd
          for (int i = 0; i < NR; ++i) acc[m][i] += q * kv[i];
        }
      }
      const T* knj = kn + static_cast<int64_t>(j) * kKB + j0;
      for (int m = 0; m < kMR; ++m) {
        T* Lm = L + static_cast<int64_t>(j * kMR + m) * kKB + j0;
        T mx = ninf;
        for (int i = 0; i < NR; ++i) {
          const T v = c1[m] * acc[m][i] - c2[m] * knj[i];
          const bool valid = j0 + i < nk && ((mask[j0 + i] >> j) & 1u);
          Lm[i] = valid ? v : ninf;
          mx = Lm[i] > mx ? Lm[i] : mx;
        }
        T& b = bmax[j * kMR + m];
        b = mx > b ? mx : b;
      }
    }
  }
}

template <typename T>
struct MultiWorkspace {
  cpu::QueryTiles<T> q;
  cpu::KeyBlock<T> keys;
  std::vector<T> L, W, bmax, kn;
  std::vector<double> kn_acc;
  std::vector<uint32_t> mask;
  MultiWorkspace(int d, int C, int n_ks)
      : keys(d, C), L(static_cast<size_t>(n_ks) * kMR * kKB), W(kKB), bmax(static_cast<size_t>(n_ks) * kMR),
        kn(static_cast<size_t>(n_ks) * kKB), kn_acc(kKB), mask(kKB) {}
};

// Partial states of every row of every item, at every size: entry (slot + r) * n_ks + j.
struct MultiPartials {
  std::vector<double> m, s, acc;
  MultiPartials(int64_t rows, int n_ks, int C)
      : m(static_cast<size_t>(rows) * n_ks, -std::numeric_limits<double>::infinity()),
        s(static_cast<size_t>(rows) * n_ks, 0.0), acc(static_cast<size_t>(rows) * n_ks * C, 0.0) {}
};

// Whether every key position of the block has the same padding signature at size k (zero padding), so the
// key gather may use one pattern of padded entries for all.
inline bool same_signature(const int32_t* pos, int n, int H, int W, int k) {
  const int r = k / 2;
  auto sig = [&](int32_t p) {
    const int i = p / W, j = p % W;
    return std::array<int, 4>{std::max(0, r - i), std::max(0, i + r - (H - 1)), std::max(0, r - j),
                              std::max(0, j + r - (W - 1))};
  };
  const auto s0 = sig(pos[0]);
  for (int i = 1; i < n; ++i)
    if (sig(pos[i]) != s0) return false;
  return true;
}

template <typename T>
void run_item_multi(const MultiKArgs<T>& M, const RingOrder& ring, const QueryGroups& qg, const WorkItem& it,
                    MultiWorkspace<T>& ws, MultiPartials& P) {
  const PatchSoftmaxArgs<T>& A = M.base;
  const int C = A.C, K = M.n_ks;
  const int64_t p0 = A.cls_kpos_ptr[it.c], npos = A.cls_kpos_ptr[it.c + 1] - p0;
  ws.q.gather(A, qg, it);
  const int rows = ws.q.rows;
  const int d = C * A.k * A.k;
  std::vector<int32_t> pos(kKB);
  int64_t img_i = it.k0 / npos, pos_i = it.k0 % npos;
  for (int64_t kb0 = it.k0; kb0 < it.k1; kb0 += kKB) {
    const int nk = static_cast<int>(std::min<int64_t>(kKB, it.k1 - kb0));
    // the block's key positions and their masks of sizes; the largest size any of them serves
    uint32_t any = 0;
    {
      int64_t pi = pos_i;
      for (int j = 0; j < nk; ++j) {
        pos[j] = A.cls_kpos[p0 + pi];
        ws.mask[j] = M.cls_kmask[p0 + pi];
        any |= ws.mask[j];
        if (++pi == npos) pi = 0;
      }
    }
    const bool uniform = A.key_pad != kPadZeros || same_signature(pos.data(), nk, A.H, A.W, A.k);
    ws.keys.gather(A, it, nk, img_i, pos_i, uniform, false);
    if (any == 0) continue;
    const int top = 31 - __builtin_clz(any);
    // the keys' squared norms at each size, ring by ring (accumulated in double)
    std::fill(ws.kn_acc.begin(), ws.kn_acc.end(), 0.0);
    for (int j = 0, dd = 0; j <= top; ++j) {
      for (; dd < ring.end[j]; ++dd) {
        const T* row = ws.keys.Kt.data() + static_cast<int64_t>(ring.perm[dd]) * kKB;
        double* acc = ws.kn_acc.data();
#pragma omp simd
        for (int i = 0; i < kKB; ++i) acc[i] += static_cast<double>(row[i]) * row[i];
      }
      T* knj = ws.kn.data() + static_cast<int64_t>(j) * kKB;
      for (int i = 0; i < kKB; ++i) knj[i] = static_cast<T>(ws.kn_acc[i]);
    }
    for (int r0 = 0; r0 < rows; r0 += kMR) {
      logit_tile_multi(ws.q.Qp.data() + static_cast<int64_t>(r0) * d, ws.keys.Kt.data(), ring, top, ws.kn.data(),
                       ws.mask.data(), nk, ws.q.c1.data() + r0, ws.q.c2.data() + r0, ws.L.data(), ws.bmax.data());
      const int mr = std::min(kMR, rows - r0);
      for (int j = 0; j <= top; ++j) {
        for (int m = 0; m < mr; ++m) {
          const T bm = ws.bmax[j * kMR + m];
          if (!(bm > -std::numeric_limits<T>::infinity())) continue;  // no key of the block at this size
          const int64_t e = (it.slot + r0 + m) * K + j;
          const T* Lr = ws.L.data() + static_cast<int64_t>(j * kMR + m) * kKB;
          int64_t best = -1;
          double* acc = P.acc.data() + e * C;
          if (C == 1) cpu::fold_row<T, 1>(Lr, bm, ws.keys, ws.W.data(), P.m[e], P.s[e], acc, best, C);
          else if (C == 3) cpu::fold_row<T, 3>(Lr, bm, ws.keys, ws.W.data(), P.m[e], P.s[e], acc, best, C);
          else cpu::fold_row<T, 0>(Lr, bm, ws.keys, ws.W.data(), P.m[e], P.s[e], acc, best, C);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void local_forward_multi_cpu(const MultiKArgs<T>& M) {
  const PatchSoftmaxArgs<T>& A = M.base;
  const int K = M.n_ks, C = A.C;
  const RingOrder ring(C, M.ks, K);
  const QueryGroups qg = queries_by_group(A.group_of_b, A.B, A.n_groups);
  const Plan plan = plan_cpu(A, qg);
  MultiPartials P(plan.slots, K, C);
  const int d = C * A.k * A.k;
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(plan.items.size()));
  FirstError error;
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<MultiWorkspace<T>> ws;
    error.run([&] { ws = std::make_unique<MultiWorkspace<T>>(d, C, K); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(plan.items.size()); ++i)
      error.run([&] { run_item_multi(M, ring, qg, plan.items[i], *ws, P); });
  }
  error.rethrow();

  // merge the key-range partials of each row block and size, in item order, and write out
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  std::vector<double> acc(C);
  for (const RowBlock& rb : plan.blocks) {
    for (int64_t r = 0; r < rb.row1 - rb.row0; ++r) {
      const int64_t row = rb.row0 + r;
      const int64_t b = row_image(A, qg, rb.g, rb.c, row);
      const int64_t pix = row_pixel(A, rb.c, row);
      for (int j = 0; j < K; ++j) {
        double m = -std::numeric_limits<double>::infinity(), s = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t u = rb.item0; u < rb.item1; ++u) {
          const int64_t e = (plan.items[u].slot + r) * K + j;
          if (P.s[e] == 0.0) continue;  // a key range without keys of this size, or all weights exactly 0
          const MergeFactors f = merge_state(m, s, P.m[e], P.s[e]);
          for (int c = 0; c < C; ++c) acc[c] = acc[c] * f.self + P.acc[e * C + c] * f.other;
        }
        T* out = M.out + (static_cast<int64_t>(j) * A.B + b) * C * HWq + pix;
        for (int c = 0; c < C; ++c) out[c * HWq] = static_cast<T>(acc[c] / s);
      }
    }
  }
}

template void local_forward_multi_cpu<float>(const MultiKArgs<float>&);
template void local_forward_multi_cpu<double>(const MultiKArgs<double>&);

}  // namespace patchmosaic
