// patch_softmax_multi.cpp -- the CPU kernel of the local machines at several patch sizes in one pass
// (forward only, no provenance): a calibration sweep evaluates the same queries at k = 3, 5, ..., k_max.
//
// The squared distance of two patches of size ks[j] is that of size ks[j-1] plus the sum over the ring of
// elements between the two sizes (the smaller patch is the centre of the larger one, under zero padding and
// circular wrap alike). So patch elements are visited ring by ring (smallest size first), in "ring order":
// the register tile of dot products that the single-size kernel turns into logits once is turned into
// logits after each ring, one tile of logits per size, with the keys' squared norms likewise accumulated
// ring by ring. The logits of each size fold into that size's own online softmax state.
//
// Key sets may depend on the size (the padding signatures of boundary-aware ELS, the fully-inside patches
// of periodic ELS): each key position carries a mask of the sizes it serves (contract.hpp,
// PM_LOCAL_MULTI_FIELDS), and a class computes the sizes its key positions serve (their union). A key outside
// a size's set gets the logit -inf there: weight 0, exactly as if it were absent. Patches are gathered only
// as large as needed: an item's query patches at the largest size of its class, each block of keys at the
// largest size any of its keys serves (the ring order of a smaller size is a prefix of a larger one's), and
// the dot products of a block stop there too.
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

// The elements of a patch of size ks[t] in ring order, for every t: first those of the patch of size ks[0],
// then the ring that grows it to ks[1], and so on up to ks[t] (within a ring: channel, row, column).
// perm[t][dd] is the index in the engines' order (channel, row, column) of ring position dd in the patch of
// size ks[t]; end[j] = C ks[j]^2 is where size j's prefix ends (the same for every t >= j).
struct RingOrder {
  std::vector<std::vector<int>> perm;
  std::vector<int> end;
  RingOrder(int C, const int32_t* ks, int n_ks) : perm(n_ks), end(n_ks) {
    for (int t = 0; t < n_ks; ++t) {
      const int k = ks[t], R = k / 2;
      for (int j = 0; j <= t; ++j) {
        const int lo = j == 0 ? -1 : ks[j - 1] / 2, hi = ks[j] / 2;
        for (int c = 0; c < C; ++c)
          for (int di = 0; di < k; ++di)
            for (int dj = 0; dj < k; ++dj) {
              const int ring = std::max(std::abs(di - R), std::abs(dj - R));
              if (ring > lo && ring <= hi) perm[t].push_back((c * k + di) * k + dj);
            }
      }
      end[t] = static_cast<int>(perm[t].size());
    }
  }
};

// The largest size index of a nonzero mask of sizes.
inline int top_size(uint32_t sizes) { return 31 - __builtin_clz(sizes); }

// Logits of one tile of kMR query rows against a block of keys that all serve the sizes of `sizes` (top: the
// largest): L[(j kMR + m) kKB + i] = c1[m] <Q_m, K_i>_j - c2[m] |K_i|^2_j for every size j of `sizes`, where
// <,>_j runs over the first end[j] elements in ring order. Entries of keys i >= nk are not meaningful. Q: one
// tile in ring order ([dd][kMR]); Kr: the block in ring order ([dd][kKB]).
template <typename T>
inline void logit_tile_multi(const T* __restrict Q, const T* __restrict Kr, const int* __restrict end,
                             uint32_t sizes, const T* __restrict kn, int nk, const T* __restrict c1,
                             const T* __restrict c2, T* __restrict L) {
  constexpr int NR = cpu::Tile<T>::NR;
  static_assert(kKB % NR == 0, "tile sizes");
  const int top = top_size(sizes);
  for (int j0 = 0; j0 < nk; j0 += NR) {
    T acc[kMR][NR] = {};
    int dd = 0;
    for (int j = 0; j <= top; ++j) {
      for (; dd < end[j]; ++dd) {
        const T* kv = Kr + static_cast<int64_t>(dd) * kKB + j0;
        const T* qv = Q + static_cast<int64_t>(dd) * kMR;
        for (int m = 0; m < kMR; ++m) {
          const T q = qv[m];
#pragma omp simd
          for (int i = 0; i < NR; ++i) acc[m][i] += q * kv[i];
        }
      }
      if (!((sizes >> j) & 1u)) continue;
      const T* knj = kn + static_cast<int64_t>(j) * kKB + j0;
      for (int m = 0; m < kMR; ++m) {
        T* Lm = L + static_cast<int64_t>(j * kMR + m) * kKB + j0;
#pragma omp simd
        for (int i = 0; i < NR; ++i) Lm[i] = c1[m] * acc[m][i] - c2[m] * knj[i];
      }
    }
  }
}

// The largest of L[0..n): an element-wise maximum over lanes (vectorised without a reduction the
// auto-vectoriser would have to recognise), then over the lanes.
template <typename T>
inline T row_max(const T* __restrict L, int n) {
  constexpr int kLanes = 64 / sizeof(T);
  const T ninf = -std::numeric_limits<T>::infinity();
  T lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = ninf;
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] = L[i + l] > lanes[l] ? L[i + l] : lanes[l];
  T r = ninf;
  for (int l = 0; l < kLanes; ++l) r = lanes[l] > r ? lanes[l] : r;
  for (; i < n; ++i) r = L[i] > r ? L[i] : r;
  return r;
}

// Segments of the key positions: maximal runs of one class's positions with the same mask of sizes (the
// positions of a class come sorted by mask, tables.MultiKeySet), as a CSR over cls_kpos. An item enumerates
// its keys segment by segment (within a segment: image, then position), so that every block of keys serves
// one set of sizes and is gathered, multiplied and folded only at those.
struct Segments {
  std::vector<int64_t> ptr;    // segment s: key positions ptr[s] .. ptr[s + 1] of cls_kpos
  std::vector<int64_t> first;  // the first segment of each class (n_classes + 1 entries)
  Segments(const int64_t* kp, const uint32_t* mask, int64_t n_classes) : first(n_classes + 1) {
    for (int64_t c = 0; c < n_classes; ++c) {
      first[c] = static_cast<int64_t>(ptr.size());
      for (int64_t e = kp[c]; e < kp[c + 1]; ++e)
        if (e == kp[c] || mask[e] != mask[e - 1]) ptr.push_back(e);
    }
    first[n_classes] = static_cast<int64_t>(ptr.size());
    ptr.push_back(kp[n_classes]);
  }
};

template <typename T>
struct MultiWorkspace {
  cpu::QueryTiles<T> q;
  cpu::KeyBlock<T> keys;
  std::vector<T> Qr, Kr, L, W, kn;  // Qr, Kr: the query tiles and the key block in ring order
  std::vector<double> kn_acc;
  MultiWorkspace(int d, int C, int n_ks)
      : keys(d, C), Kr(static_cast<size_t>(d) * kKB), L(static_cast<size_t>(n_ks) * kMR * kKB), W(kKB),
        kn(static_cast<size_t>(n_ks) * kKB), kn_acc(kKB) {}
};

// Partial states of every row of every item, at every size: entry (slot + r) * n_ks + j.
struct MultiPartials {
  std::vector<double> m, s, acc;
  MultiPartials(int64_t rows, int n_ks, int C)
      : m(static_cast<size_t>(rows) * n_ks, -std::numeric_limits<double>::infinity()),
        s(static_cast<size_t>(rows) * n_ks, 0.0), acc(static_cast<size_t>(rows) * n_ks * C, 0.0) {}
};

// Whether every key position of pos[0..n) has the same padding signature at size k (zero padding), so the
// key gather may use one pattern of padded entries for all.
inline bool same_signature(const int32_t* pos, int64_t n, int H, int W, int k) {
  const int r = k / 2;
  auto sig = [&](int32_t p) {
    const int i = p / W, j = p % W;
    return std::array<int, 4>{std::max(0, r - i), std::max(0, i + r - (H - 1)), std::max(0, r - j),
                              std::max(0, j + r - (W - 1))};
  };
  const auto s0 = sig(pos[0]);
  for (int64_t i = 1; i < n; ++i)
    if (sig(pos[i]) != s0) return false;
  return true;
}

// The single-size view of the call at size ks[t] (what the gathers read).
template <typename T>
PatchSoftmaxArgs<T> at_size(const MultiKArgs<T>& M, int t) {
  PatchSoftmaxArgs<T> A = M.base;
  A.k = M.ks[t];
  return A;
}

template <typename T>
void run_item_multi(const MultiKArgs<T>& M, const RingOrder& ring, const Segments& seg,
                    const std::vector<uint32_t>& cls_sizes, const QueryGroups& qg, const WorkItem& it, MultiWorkspace<T>& ws, MultiPartials& P) {
  const PatchSoftmaxArgs<T>& A = M.base;
  const int C = A.C, K = M.n_ks;
  const int64_t p0 = A.cls_kpos_ptr[it.c];
  // the query patches at the class's largest size, repacked in ring order
  const int ctop = top_size(cls_sizes[it.c]);
  ws.q.gather(at_size(M, ctop), qg, it);
  const int rows = ws.q.rows, dq = ring.end[ctop];
  {
    const int* perm = ring.perm[ctop].data();
    const int tiles = (rows + kMR - 1) / kMR;
    ws.Qr.resize(static_cast<size_t>(tiles) * kMR * dq);
    for (int tl = 0; tl < tiles; ++tl) {
      const T* src = ws.q.Qp.data() + static_cast<int64_t>(tl) * kMR * dq;
      T* dst = ws.Qr.data() + static_cast<int64_t>(tl) * kMR * dq;
      for (int dd = 0; dd < dq; ++dd) std::memcpy(dst + dd * kMR, src + static_cast<int64_t>(perm[dd]) * kMR, sizeof(T) * kMR);
    }
  }
  const int64_t nimg = A.grp_img_ptr[it.g + 1] - A.grp_img_ptr[it.g];
  PatchSoftmaxArgs<T> As = A;  // the view whose classes are the segments (what the key gather reads)
  As.cls_kpos_ptr = seg.ptr.data();
  int64_t s = seg.first[it.c];
  for (int64_t u = it.k0; u < it.k1;) {
    // the segment of key u: keys (seg.ptr[s] - p0) nimg .. (seg.ptr[s + 1] - p0) nimg of the item's pair
    while ((seg.ptr[s + 1] - p0) * nimg <= u) ++s;
    const int64_t len = seg.ptr[s + 1] - seg.ptr[s], base = (seg.ptr[s] - p0) * nimg;
    const int64_t stop = std::min(it.k1, base + len * nimg);
    const uint32_t sizes = M.cls_kmask[seg.ptr[s]];
    if (sizes == 0) {  // positions that serve no size
      u = stop;
      continue;
    }
    const int top = top_size(sizes);
    As.k = M.ks[top];
    WorkItem its = it;
    its.c = s;
    int64_t img_i = (u - base) / len, pos_i = (u - base) % len;
    // whether every position of the segment has the same padding signature at the gather's size
    const bool uniform = A.key_pad != kPadZeros || same_signature(A.cls_kpos + seg.ptr[s], len, A.H, A.W, As.k);
    const int* perm = ring.perm[top].data();
    for (; u < stop;) {
      const int nk = static_cast<int>(std::min<int64_t>(kKB, stop - u));
      ws.keys.gather(As, its, nk, img_i, pos_i, uniform, false);
      u += nk;
      // the block in ring order: the columns the tiles read (nk rounded up to a tile; the gather zeroed those
      // past nk)
      const int ncol = std::min(kKB, (nk + cpu::Tile<T>::NR - 1) / cpu::Tile<T>::NR * cpu::Tile<T>::NR);
      for (int dd = 0; dd < ring.end[top]; ++dd)
        std::memcpy(ws.Kr.data() + static_cast<int64_t>(dd) * kKB,
                    ws.keys.Kt.data() + static_cast<int64_t>(perm[dd]) * kKB, sizeof(T) * ncol);
      // the keys' squared norms at each size, ring by ring (accumulated in double)
      std::fill(ws.kn_acc.begin(), ws.kn_acc.end(), 0.0);
      for (int j = 0, dd = 0; j <= top; ++j) {
        for (; dd < ring.end[j]; ++dd) {
          const T* row = ws.Kr.data() + static_cast<int64_t>(dd) * kKB;
          double* acc = ws.kn_acc.data();
#pragma omp simd
          for (int i = 0; i < ncol; ++i) acc[i] += static_cast<double>(row[i]) * row[i];
        }
        T* knj = ws.kn.data() + static_cast<int64_t>(j) * kKB;
        for (int i = 0; i < ncol; ++i) knj[i] = static_cast<T>(ws.kn_acc[i]);
      }
      for (int r0 = 0; r0 < rows; r0 += kMR) {
        logit_tile_multi(ws.Qr.data() + static_cast<int64_t>(r0) * dq, ws.Kr.data(), ring.end.data(), sizes,
                         ws.kn.data(), nk, ws.q.c1.data() + r0, ws.q.c2.data() + r0, ws.L.data());
        const int mr = std::min(kMR, rows - r0);
        for (int j = 0; j <= top; ++j) {
          if (!((sizes >> j) & 1u)) continue;
          for (int m = 0; m < mr; ++m) {
            const T* Lr = ws.L.data() + static_cast<int64_t>(j * kMR + m) * kKB;
            const T bm = row_max(Lr, nk);
            const int64_t e = (it.slot + r0 + m) * K + j;
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
}

// ------------------------------------------------------------------------------------------------ LS
// The LS key set (every pixel its own class, attending to the same pixel of every training image, zero
// padding on both sides, training-size queries) has one query row per (query image, pixel) and each key
// patch serves the rows of one pixel only: tiles of query rows against gathered key blocks, the shape of
// the general kernel, spend their time gathering patches each used once (with labels, the query rows of a
// class are the few query images of one label: a tile of kMR rows holds one). Instead, for a query image b
// and a training image n the squared distances at every pixel and every size are box sums of one image,
//     E(y, x) = sum_c (x_b(c, y, x) - a_b phi_n(c, y, x))^2,
// (zero padding adds (0 - a 0)^2 = 0), read off its summed-area table in O(1) per pixel and size. The
// differences are taken directly and summed in double (no cancellation), so float32 inputs get
// double-precision logits.
template <typename T>
bool is_same_location(const MultiKArgs<T>& M) {
  const PatchSoftmaxArgs<T>& A = M.base;
  const int64_t HW = static_cast<int64_t>(A.H) * A.W;
  if (A.Hq != A.H || A.Wq != A.W || A.query_pad != kPadZeros || A.key_pad != kPadZeros || A.n_classes != HW)
    return false;
  const uint32_t all = M.n_ks == 32 ? 0xFFFFFFFFu : ((uint32_t(1) << M.n_ks) - 1);
  for (int64_t c = 0; c < HW; ++c) {
    if (A.cls_qpix_ptr[c + 1] - A.cls_qpix_ptr[c] != 1 || A.cls_kpos_ptr[c + 1] - A.cls_kpos_ptr[c] != 1) return false;
    const int64_t e = A.cls_kpos_ptr[c];
    if (A.cls_qpix[A.cls_qpix_ptr[c]] != A.cls_kpos[e] || M.cls_kmask[e] != all) return false;
  }
  return true;
}

template <typename T>
void same_location_multi(const MultiKArgs<T>& M) {
  const PatchSoftmaxArgs<T>& A = M.base;
  const int K = M.n_ks, C = A.C, H = A.H, W = A.W;
  const int64_t HW = static_cast<int64_t>(H) * W, B = A.B;
  const int64_t per_state = HW * K;  // (pixel, size) states of one task
  // tasks: (query image, range of its group's training images); the split depends on B and the group sizes
  // only, and the ranges of one query image merge in order, so results do not depend on the thread count.
  struct Task { int64_t b, n0, n1, slot; };
  std::vector<Task> tasks;
  std::vector<int64_t> first_task(B + 1);
  const int64_t want = std::max<int64_t>(1, (64 + B - 1) / B);
  for (int64_t b = 0; b < B; ++b) {
    first_task[b] = static_cast<int64_t>(tasks.size());
    const int64_t g = A.group_of_b[b], ng = A.grp_img_ptr[g + 1] - A.grp_img_ptr[g];
    const int64_t nch = std::min(want, ng), per = (ng + nch - 1) / nch;
    for (int64_t n0 = 0; n0 < ng; n0 += per)
      tasks.push_back({b, n0, std::min(ng, n0 + per), static_cast<int64_t>(tasks.size()) * per_state});
  }
  first_task[B] = static_cast<int64_t>(tasks.size());
  const int64_t nstates = static_cast<int64_t>(tasks.size()) * per_state;
  std::vector<double> Pm(nstates, -std::numeric_limits<double>::infinity()), Ps(nstates, 0.0), Pacc(nstates * C, 0.0);
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(tasks.size()));
  FirstError error;
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> S, Qd;
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < static_cast<int64_t>(tasks.size()); ++ti)
      error.run([&] {
        const Task& tk = tasks[ti];
        const int64_t b = tk.b, g = A.group_of_b[b];
        const double a = A.a[b], inv = A.inv_2b2[b];
        S.assign(static_cast<size_t>(H + 1) * (W + 1), 0.0);
        Qd.resize(static_cast<size_t>(C) * HW);
        for (int64_t e = 0; e < C * HW; ++e) Qd[e] = static_cast<double>(A.query[b * C * HW + e]);
        for (int64_t u = tk.n0; u < tk.n1; ++u) {
          const T* phi = A.train + static_cast<int64_t>(A.grp_img[A.grp_img_ptr[g] + u]) * C * HW;
          // summed-area table of E: S[(y + 1) (W + 1) + x + 1] = sum of E over rows < y + 1, columns < x + 1
          for (int y = 0; y < H; ++y) {
            double row = 0.0;
            for (int x = 0; x < W; ++x) {
              double e = 0.0;
              for (int c = 0; c < C; ++c) {
                const int64_t at = c * HW + static_cast<int64_t>(y) * W + x;
                const double dlt = Qd[at] - a * static_cast<double>(phi[at]);
                e += dlt * dlt;
              }
              row += e;
              S[static_cast<size_t>(y + 1) * (W + 1) + x + 1] = S[static_cast<size_t>(y) * (W + 1) + x + 1] + row;
            }
          }
          for (int y = 0; y < H; ++y)
            for (int x = 0; x < W; ++x) {
              const int64_t p = static_cast<int64_t>(y) * W + x;
              for (int j = 0; j < K; ++j) {
                const int r = M.ks[j] / 2;
                const int y0 = std::max(0, y - r), y1 = std::min(H, y + r + 1);
                const int x0 = std::max(0, x - r), x1 = std::min(W, x + r + 1);
                const double dist = S[static_cast<size_t>(y1) * (W + 1) + x1] - S[static_cast<size_t>(y0) * (W + 1) + x1] -
                                    S[static_cast<size_t>(y1) * (W + 1) + x0] + S[static_cast<size_t>(y0) * (W + 1) + x0];
                const double l = -dist * inv;
                const int64_t st = tk.slot + p * K + j;
                double& m = Pm[st];
                double& s = Ps[st];
                double* acc = Pacc.data() + st * C;
                double f;
                const double w = fold_key<double>(m, s, l, f);
                if (f != 1.0)
                  for (int c = 0; c < C; ++c) acc[c] *= f;
                if (w == 0.0) continue;
                for (int c = 0; c < C; ++c) acc[c] += w * static_cast<double>(phi[c * HW + p]);
              }
            }
        }
      });
  }
  error.rethrow();
  std::vector<double> acc(C);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < HW; ++p)
      for (int j = 0; j < K; ++j) {
        double m = -std::numeric_limits<double>::infinity(), s = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t ti = first_task[b]; ti < first_task[b + 1]; ++ti) {
          const int64_t st = tasks[ti].slot + p * K + j;
          if (Ps[st] == 0.0) continue;
          const MergeFactors f = merge_state(m, s, Pm[st], Ps[st]);
          for (int c = 0; c < C; ++c) acc[c] = acc[c] * f.self + Pacc[st * C + c] * f.other;
        }
        T* out = M.out + (static_cast<int64_t>(j) * B + b) * C * HW + p;
        for (int c = 0; c < C; ++c) out[c * HW] = static_cast<T>(acc[c] / s);
      }
}

}  // namespace

template <typename T>
void local_forward_multi_cpu(const MultiKArgs<T>& M) {
  if (is_same_location(M)) {
    same_location_multi(M);
    return;
  }
  const PatchSoftmaxArgs<T>& A = M.base;
  const int K = M.n_ks, C = A.C;
  const RingOrder ring(C, M.ks, K);
  // the sizes each class computes: those its key positions serve
  const Segments seg(A.cls_kpos_ptr, M.cls_kmask, A.n_classes);
  std::vector<uint32_t> cls_sizes(A.n_classes, 0);
  for (int64_t c = 0; c < A.n_classes; ++c)
    for (int64_t e = A.cls_kpos_ptr[c]; e < A.cls_kpos_ptr[c + 1]; ++e) cls_sizes[c] |= M.cls_kmask[e];
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
      error.run([&] { run_item_multi(M, ring, seg, cls_sizes, qg, plan.items[i], *ws, P); });
  }
  error.rethrow();

  // merge the key-range partials of each row block and size, in item order, and write out the sizes its class
  // computes (others are left as they are)
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  std::vector<double> acc(C);
  for (const RowBlock& rb : plan.blocks) {
    const uint32_t sizes = cls_sizes[rb.c];
    for (int64_t r = 0; r < rb.row1 - rb.row0; ++r) {
      const int64_t row = rb.row0 + r;
      const int64_t b = row_image(A, qg, rb.g, rb.c, row);
      const int64_t pix = row_pixel(A, rb.c, row);
      for (int j = 0; j < K; ++j) {
        if (!((sizes >> j) & 1u)) continue;
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
