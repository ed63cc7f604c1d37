// patch_softmax_backward.cpp -- the CPU backward pass of the local machines (LS, ELS, boundary-aware ELS).
//
// The vector-Jacobian product of engines.hpp, computed as flash-attention's backward pass is: the same
// work items as the forward pass (plan.hpp) recompute each tile of logits exactly as the forward pass
// did, turn them into the softmax weights with the forward's row statistics (m, s), and accumulate per
// row, over the item's keys,
//     G = sum_q w_q delta_q (a K_q - Q)    (a patch-sized vector; a K_q - Q by one fused multiply-add)
//     z = sum_q w_q delta_q,  u2 = sum_q w_q delta_q |K_q|^2,  w = sum_q w_q delta_q <Q, K_q>
// in double across key blocks. Items run in waves whose partial sums fit a memory budget; after each wave
// the items' partials are added, in item order, onto the query gradient (the adjoint of the patch
// gather) and the per-image sums for a and 1 / (2 b^2): the same bits for any number of threads.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "key_block.hpp"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"
#include "simd_exp.hpp"
#include "threads.hpp"

namespace patchmosaic {
namespace {

using cpu::kKB;
using cpu::kMR;

constexpr int64_t kWaveBytes = int64_t(256) << 20;  // partial sums held at once

template <typename T>
struct Workspace {
  cpu::QueryTiles<T> q;
  cpu::KeyBlock<T> keys;
  std::vector<T> L, R, Pw, bmax, g, a, mt, inv_s, Dr;
  std::vector<double> z, u2, w;
  Workspace(int d, int C)
      : keys(d, C), L(static_cast<size_t>(kMR) * kKB), R(static_cast<size_t>(kMR) * kKB),
        Pw(static_cast<size_t>(kMR) * kKB), bmax(kMR) {}
};

// Partial sums of one item: G (rows x d), and per row the a and s gradients.
struct ItemSums {
  double* G;
  double* ga;
  double* gs;
};

template <typename T>
void run_item(const PatchSoftmaxArgs<T>& A, const QueryGroups& qg, const WorkItem& it, Workspace<T>& ws, ItemSums out) {
  const int C = A.C, d = class_elements(A, it.c).n;
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  const int64_t npos = A.cls_kpos_ptr[it.c + 1] - A.cls_kpos_ptr[it.c];
  ws.q.gather(A, qg, it);
  const int rows = ws.q.rows;
  // per row: the forward's statistics, the output gradient and delta's offset D = <g, out>
  ws.g.assign(static_cast<size_t>(rows) * C, T(0));
  ws.a.resize(rows);
  ws.mt.resize(rows);
  ws.inv_s.resize(rows);
  ws.Dr.resize(rows);
  std::vector<double> m(rows);
  for (int r = 0; r < rows; ++r) {
    const int64_t b = ws.q.image[r], pix = ws.q.pixel[r];
    m[r] = A.stats[2 * (b * HWq + pix)];
    ws.mt[r] = static_cast<T>(m[r]);
    ws.inv_s[r] = static_cast<T>(1.0 / A.stats[2 * (b * HWq + pix) + 1]);
    ws.a[r] = static_cast<T>(A.a[b]);
    double D = 0.0;
    for (int c = 0; c < C; ++c) {
      const int64_t e = (b * C + c) * HWq + pix;
      ws.g[static_cast<size_t>(r) * C + c] = A.grad_out[e];
      D += static_cast<double>(A.grad_out[e]) * static_cast<double>(A.out[e]);
    }
    ws.Dr[r] = static_cast<T>(D);
  }
  ws.z.assign(rows, 0.0);
  ws.u2.assign(rows, 0.0);
  ws.w.assign(rows, 0.0);
  std::fill(out.G, out.G + static_cast<int64_t>(rows) * d, 0.0);

  int64_t img_i = it.k0 / npos, pos_i = it.k0 % npos;
  const T* Kt = ws.keys.Kt.data();
  for (int64_t kb0 = it.k0; kb0 < it.k1; kb0 += kKB) {
    ws.keys.gather(A, it, static_cast<int>(std::min<int64_t>(kKB, it.k1 - kb0)), img_i, pos_i);
    const int nk = ws.keys.nk;
    const T* V = ws.keys.V.data();
    const T* kn = ws.keys.knorm.data();
    for (int r0 = 0; r0 < rows; r0 += kMR) {
      cpu::logit_tile<T, true>(ws.q.Qp.data() + static_cast<int64_t>(r0) * d, Kt, d, kn, nk, ws.q.c1.data() + r0,
                               ws.q.c2.data() + r0, ws.L.data(), ws.bmax.data(), ws.R.data());
      const int mr = std::min(kMR, rows - r0);
      bool active[kMR] = {};
      for (int mm = 0; mm < mr; ++mm) {
        const int r = r0 + mm;
        if (static_cast<double>(ws.bmax[mm]) < m[r] - ExpCut<T>::value) continue;  // every weight is exactly 0
        active[mm] = true;
        const T* Lr = ws.L.data() + mm * kKB;
        const T* Rr = ws.R.data() + mm * kKB;
        T* P = ws.Pw.data() + mm * kKB;
        const T* gr = ws.g.data() + static_cast<size_t>(r) * C;
        const T mt = ws.mt[r], is = ws.inv_s[r], D = ws.Dr[r];
        T zs = T(0), u2s = T(0), ws_ = T(0);
        for (int j = 0; j < nk; ++j) {
          T gv = T(0);
          for (int c = 0; c < C; ++c) gv += gr[c] * V[static_cast<int64_t>(c) * kKB + j];
          const T p = exp_nonpos(Lr[j] - mt) * is * (gv - D);
          P[j] = p;
          zs += p;
          u2s += p * kn[j];
          ws_ += p * Rr[j];
        }
        std::fill(P + nk, P + kKB, T(0));
        ws.z[r] += zs;
        ws.u2[r] += u2s;
        ws.w[r] += ws_;
      }
      // G[r][dd] += sum_j P[r][j] (a_r K[dd][j] - Q[r][dd]): the key block row dd once for the tile's rows
      const T* Qtile = ws.q.Qp.data() + static_cast<int64_t>(r0) * d;
      for (int dd = 0; dd < d; ++dd) {
        const T* krow = Kt + static_cast<int64_t>(dd) * kKB;
        for (int mm = 0; mm < mr; ++mm) {
          if (!active[mm]) continue;
          const T* P = ws.Pw.data() + mm * kKB;
          const T am = ws.a[r0 + mm], qm = Qtile[static_cast<int64_t>(dd) * kMR + mm];
          T acc = T(0);
#pragma omp simd reduction(+ : acc)
          for (int j = 0; j < kKB; ++j) acc += P[j] * std::fma(am, krow[j], -qm);
          out.G[static_cast<int64_t>(r0 + mm) * d + dd] += acc;
        }
      }
    }
  }
  // the a and s gradients of each row (engines.hpp), from z, u2, w and |Q|^2
  for (int r = 0; r < rows; ++r) {
    const int64_t b = ws.q.image[r];
    const double a = A.a[b], s = A.inv_2b2[b];
    double qn = 0.0;
    for (int dd = 0; dd < d; ++dd) {
      const double q = ws.q.at(r, dd, d);
      qn += q * q;
    }
    out.ga[r] = 2.0 * s * (ws.w[r] - a * ws.u2[r]);
    out.gs[r] = -(qn * ws.z[r] - 2.0 * a * ws.w[r] + a * a * ws.u2[r]);
  }
}

}  // namespace

template <typename T>
void local_backward_cpu(const PatchSoftmaxArgs<T>& A) {
  const QueryGroups qg = queries_by_group(A.group_of_b, A.B, A.n_groups);
  const Plan plan = plan_cpu(A, qg);
  const int C = A.C, d = patch_dim(A);
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  std::vector<double> gx(static_cast<size_t>(A.B) * C * HWq, 0.0), ga(A.B, 0.0), gs(A.B, 0.0);
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  for (int64_t w0 = 0; w0 < n_items;) {
    // a wave: consecutive items whose partial sums fit the budget (at least one item)
    int64_t w1 = w0, bytes = 0;
    std::vector<int64_t> offset;
    while (w1 < n_items) {
      const int64_t rows = plan.items[w1].row1 - plan.items[w1].row0;
      const int64_t need = rows * (class_elements(A, plan.items[w1].c).n + 2) * static_cast<int64_t>(sizeof(double));
      if (w1 > w0 && bytes + need > kWaveBytes) break;
      offset.push_back(bytes / static_cast<int64_t>(sizeof(double)));
      bytes += need;
      ++w1;
    }
    std::vector<double> buf(bytes / sizeof(double));
    auto sums = [&](int64_t i) {
      const int64_t rows = plan.items[i].row1 - plan.items[i].row0;
      const int64_t di = class_elements(A, plan.items[i].c).n;
      double* base = buf.data() + offset[i - w0];
      return ItemSums{base, base + rows * di, base + rows * (di + 1)};
    };
    const int nt = resolve_threads(A.n_threads, w1 - w0);
    FirstError error;
#pragma omp parallel num_threads(nt)
    {
      std::unique_ptr<Workspace<T>> ws;
      error.run([&] { ws = std::make_unique<Workspace<T>>(d, C); });
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = w0; i < w1; ++i) error.run([&] { run_item(A, qg, plan.items[i], *ws, sums(i)); });
    }
    error.rethrow();
    // add the wave's partials, in item order: patch gradients back onto their query images
    for (int64_t i = w0; i < w1; ++i) {
      const WorkItem& it = plan.items[i];
      const ItemSums s = sums(i);
      const ClassElements el = class_elements(A, it.c);
      for (int64_t r = 0; r < it.row1 - it.row0; ++r) {
        const int64_t row = it.row0 + r;
        const int64_t b = row_image(A, qg, it.g, it.c, row), pix = row_pixel(A, it.c, row);
        if (el.code)
          scatter_elements(gx.data() + b * C * HWq, A.Hq, A.Wq, static_cast<int>(pix / A.Wq),
                           static_cast<int>(pix % A.Wq), A.k / 2, A.query_pad, el.code, el.scale, el.n,
                           s.G + r * el.n, 2.0 * A.inv_2b2[b]);
        else
          scatter_patch(gx.data() + b * C * HWq, C, A.Hq, A.Wq, static_cast<int>(pix / A.Wq),
                        static_cast<int>(pix % A.Wq), A.k, A.query_pad, s.G + r * d, 2.0 * A.inv_2b2[b]);
        ga[b] += s.ga[r];
        gs[b] += s.gs[r];
      }
    }
    w0 = w1;
  }
  for (size_t e = 0; e < gx.size(); ++e) A.grad_query[e] = static_cast<T>(gx[e]);
  for (int64_t b = 0; b < A.B; ++b) {
    A.grad_a[b] = ga[b];
    A.grad_inv_2b2[b] = gs[b];
  }
}

template void local_backward_cpu<float>(const PatchSoftmaxArgs<float>&);
template void local_backward_cpu<double>(const PatchSoftmaxArgs<double>&);

}  // namespace patchmosaic
