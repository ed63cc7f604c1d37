// patch_softmax.cpp -- the CPU kernel of every local machine (LS, ELS, boundary-aware ELS), forward pass.
//
// Work is split into items (plan.hpp): (image group g, query-pixel class c, block of query rows, range
// of keys). An item gathers its query patches once, then streams its keys in blocks of kKB: each key
// block is gathered on the fly (key_block.hpp), and every tile of kMR query rows is multiplied against
// it by a register-blocked micro-kernel; the resulting logits fold into each row's online softmax
// (softmax_state.hpp). Items over different key ranges of the same rows produce partial states (max,
// sum, weighted centres, arg-max) that merge at the end in a fixed order, so results do not depend on
// the number of threads or their scheduling.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "fold_row.hpp"
#include "key_block.hpp"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"
#include "simd_exp.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

using cpu::kKB;
using cpu::kMR;

constexpr int64_t kRowBlock = 4096;  // query rows per item at most (bounds the query-patch buffer)
constexpr double kTargetItems = 64;  // work items per call, roughly: enough to balance 2..32 threads

struct Partials {
  std::vector<double> m, s, acc;
  std::vector<int64_t> best;
  Partials(int64_t rows, int C)
      : m(rows, -std::numeric_limits<double>::infinity()), s(rows, 0.0), acc(static_cast<size_t>(rows) * C, 0.0),
        best(rows, -1) {}
};

template <typename T>
struct Workspace {
  cpu::QueryTiles<T> q;
  cpu::KeyBlock<T> keys;
  std::vector<T> L, W, bmax;
  Workspace(int d, int C) : keys(d, C), L(static_cast<size_t>(kMR) * kKB), W(kKB), bmax(kMR) {}
};

template <typename T>
void run_item(const PatchSoftmaxArgs<T>& A, const QueryGroups& qg, const WorkItem& it, Workspace<T>& ws, Partials& P) {
  const int C = A.C, d = class_elements(A, it.c).n;
  const int64_t npos = A.cls_kpos_ptr[it.c + 1] - A.cls_kpos_ptr[it.c];
  ws.q.gather(A, qg, it);
  const int rows = ws.q.rows;
  double* pm = P.m.data() + it.slot;
  double* ps = P.s.data() + it.slot;
  double* pacc = P.acc.data() + it.slot * C;
  int64_t* pbest = P.best.data() + it.slot;
  int64_t img_i = it.k0 / npos, pos_i = it.k0 % npos;
  for (int64_t kb0 = it.k0; kb0 < it.k1; kb0 += kKB) {
    ws.keys.gather(A, it, static_cast<int>(std::min<int64_t>(kKB, it.k1 - kb0)), img_i, pos_i);
    for (int r0 = 0; r0 < rows; r0 += kMR) {
      cpu::logit_tile(ws.q.Qp.data() + static_cast<int64_t>(r0) * d, ws.keys.Kt.data(), d, ws.keys.knorm.data(),
                      ws.keys.nk, ws.q.c1.data() + r0, ws.q.c2.data() + r0, ws.L.data(), ws.bmax.data());
      const int mr = std::min(kMR, rows - r0);
      for (int m = 0; m < mr; ++m) {
        const int r = r0 + m;
        double* acc = pacc + static_cast<int64_t>(r) * C;
        const T* Lr = ws.L.data() + m * kKB;
        if (C == 1) cpu::fold_row<T, 1>(Lr, ws.bmax[m], ws.keys, ws.W.data(), pm[r], ps[r], acc, pbest[r], C);
        else if (C == 3) cpu::fold_row<T, 3>(Lr, ws.bmax[m], ws.keys, ws.W.data(), pm[r], ps[r], acc, pbest[r], C);
        else cpu::fold_row<T, 0>(Lr, ws.bmax[m], ws.keys, ws.W.data(), pm[r], ps[r], acc, pbest[r], C);
      }
    }
  }
}

}  // namespace

// The CPU's split of a row block's keys: a fixed number of items per call (not one that depends on the
// thread count), each key range a multiple of the key block.
template <typename T>
Plan plan_cpu(const PatchSoftmaxArgs<T>& A, const QueryGroups& qg) {
  double total_pairs = 0.0;
  for (int64_t g = 0; g < A.n_groups; ++g)
    for (int64_t c = 0; c < A.n_classes; ++c)
      total_pairs += static_cast<double>(pair_rows(A, qg, g, c)) * static_cast<double>(pair_keys(A, g, c));
  const double target = std::max(total_pairs / kTargetItems, 1.0);
  return plan_items(A, qg, kRowBlock, [&](int64_t rows, int64_t nkeys) {
    const double pairs = static_cast<double>(rows) * static_cast<double>(nkeys);
    const int64_t max_chunks = (nkeys + kKB - 1) / kKB;
    const int64_t chunks = std::clamp<int64_t>(static_cast<int64_t>(pairs / target + 0.5), 1, max_chunks);
    return (max_chunks + chunks - 1) / chunks * kKB;
  });
}
template Plan plan_cpu<float>(const PatchSoftmaxArgs<float>&, const QueryGroups&);
template Plan plan_cpu<double>(const PatchSoftmaxArgs<double>&, const QueryGroups&);

template <typename T>
void local_forward_cpu(const PatchSoftmaxArgs<T>& A) {
  const QueryGroups qg = queries_by_group(A.group_of_b, A.B, A.n_groups);
  const Plan plan = plan_cpu(A, qg);
  Partials P(plan.slots, A.C);
  const int d = patch_dim(A);
  const int nt = resolve_threads(A.n_threads, static_cast<int64_t>(plan.items.size()));
  FirstError error;
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<Workspace<T>> ws;
    error.run([&] { ws = std::make_unique<Workspace<T>>(d, A.C); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(plan.items.size()); ++i)
      error.run([&] { run_item(A, qg, plan.items[i], *ws, P); });
  }
  error.rethrow();

  // merge the key-range partials of each row block, in item order, and write out
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  const int C = A.C;
  std::vector<double> acc;
  for (const RowBlock& rb : plan.blocks) {
    for (int64_t r = 0; r < rb.row1 - rb.row0; ++r) {
      double m = -std::numeric_limits<double>::infinity(), s = 0.0;
      int64_t best = -1;
      acc.assign(C, 0.0);
      for (int64_t u = rb.item0; u < rb.item1; ++u) {
        const int64_t pr = plan.items[u].slot + r;
        if (P.s[pr] == 0.0) continue;  // a key range whose weights are all exactly 0
        const MergeFactors f = merge_state(m, s, best, P.m[pr], P.s[pr], P.best[pr]);
        for (int c = 0; c < C; ++c) acc[c] = acc[c] * f.self + P.acc[pr * C + c] * f.other;
      }
      const int64_t row = rb.row0 + r;
      const int64_t b = row_image(A, qg, rb.g, rb.c, row);
      const int64_t pix = row_pixel(A, rb.c, row);
      for (int c = 0; c < C; ++c) A.out[(b * C + c) * HWq + pix] = static_cast<T>(acc[c] / s);
      A.stats[2 * (b * HWq + pix)] = m;
      A.stats[2 * (b * HWq + pix) + 1] = s;
      if (A.arg_key) A.arg_key[b * HWq + pix] = best;
      if (A.arg_share) A.arg_share[b * HWq + pix] = static_cast<T>(1.0 / s);
    }
  }
}

template void local_forward_cpu<float>(const PatchSoftmaxArgs<float>&);
template void local_forward_cpu<double>(const PatchSoftmaxArgs<double>&);

}  // namespace patchmosaic
