// patch_softmax.cpp -- the CPU kernel of every local machine (LS, ELS, boundary-aware ELS).
//
// Work is split into items (image group, query-pixel class, block of query rows). Each item streams
// the class's keys in blocks of KB: gathers the key patches on the fly into a transposed buffer,
// computes the query x key dot products with a register-blocked micro-kernel, turns them into
// logits and folds them into each row's online softmax. Items run in parallel (OpenMP).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../patch_softmax.hpp"
#include "online_softmax.hpp"
#include "patch_gather.hpp"

namespace patchmosaic {
namespace {

constexpr int kMR = 4;     // query rows per micro-tile
constexpr int kQB = 64;    // query rows per work item
constexpr int kKB = 256;   // keys per streamed block

template <typename T> struct Tile;             // keys per micro-tile: two vector registers' worth
template <> struct Tile<float> { static constexpr int NR = 32; };
template <> struct Tile<double> { static constexpr int NR = 16; };

// S[r][j] = sum_dd Q[r][dd] * Kt[dd][j] for r < rows_padded (multiple of kMR), j < kKB.
template <typename T>
void dot_block(const T* Q, const T* Kt, int d, int rows_padded, T* S) {
  constexpr int NR = Tile<T>::NR;
  for (int r0 = 0; r0 < rows_padded; r0 += kMR) {
    for (int j0 = 0; j0 < kKB; j0 += NR) {
      T acc[kMR][NR] = {};
      for (int dd = 0; dd < d; ++dd) {
        const T* kv = Kt + static_cast<int64_t>(dd) * kKB + j0;
        for (int m = 0; m < kMR; ++m) {
          const T qv = Q[static_cast<int64_t>(r0 + m) * d + dd];
#pragma omp simd
          for (int j = 0; j < NR; ++j) acc[m][j] += qv * kv[j];
        }
      }
      for (int m = 0; m < kMR; ++m)
        std::memcpy(S + static_cast<int64_t>(r0 + m) * kKB + j0, acc[m], sizeof(T) * NR);
    }
  }
}

struct Item {
  int64_t g, c, row0, row1;
};

template <typename T>
struct Workspace {
  std::vector<T> Q, S, Kt, knorm, V, L;
  std::vector<int64_t> key_id;
  std::vector<double> acc;
  std::vector<RowState> st;
  std::vector<T> c1, c2;
  std::vector<int64_t> row_b, row_pix;
  Workspace(int d, int C) {
    Q.assign(static_cast<size_t>(kQB) * d, T(0));
    S.assign(static_cast<size_t>(kQB) * kKB, T(0));
    Kt.assign(static_cast<size_t>(d) * kKB, T(0));
    knorm.assign(kKB, T(0));
    V.assign(static_cast<size_t>(C) * kKB, T(0));
    L.assign(kKB, T(0));
    key_id.assign(kKB, 0);
    acc.assign(static_cast<size_t>(kQB) * C, 0.0);
    st.assign(kQB, RowState{});
    c1.assign(kQB, T(0));
    c2.assign(kQB, T(0));
    row_b.assign(kQB, 0);
    row_pix.assign(kQB, 0);
  }
};

template <typename T>
void run_item(const PatchSoftmaxArgs<T>& A, const Item& it, const std::vector<std::vector<int64_t>>& bs,
              Workspace<T>& ws) {
  const int C = A.C, k = A.k;
  const int d = C * k * k;
  const int64_t HW = static_cast<int64_t>(A.H) * A.W;
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  const int64_t q0 = A.cls_qpix_ptr[it.c], npix = A.cls_qpix_ptr[it.c + 1] - q0;
  const int64_t p0 = A.cls_kpos_ptr[it.c], npos = A.cls_kpos_ptr[it.c + 1] - p0;
  const int64_t i0 = A.grp_img_ptr[it.g], nimg = A.grp_img_ptr[it.g + 1] - i0;
  const int rows = static_cast<int>(it.row1 - it.row0);
  const int rows_padded = (rows + kMR - 1) / kMR * kMR;

  // gather the query rows
  std::fill(ws.Q.begin(), ws.Q.end(), T(0));
  for (int r = 0; r < rows; ++r) {
    const int64_t row = it.row0 + r;
    const int64_t b = bs[it.g][row / npix];
    const int64_t pix = A.cls_qpix[q0 + row % npix];
    ws.row_b[r] = b;
    ws.row_pix[r] = pix;
    gather_patch(A.query + b * C * HWq, C, A.Hq, A.Wq, static_cast<int>(pix / A.Wq),
                 static_cast<int>(pix % A.Wq), k, A.query_pad, ws.Q.data() + static_cast<int64_t>(r) * d, 1);
    const double a = A.a[b], s = A.inv_2b2[b];
    ws.c1[r] = static_cast<T>(2.0 * a * s);
    ws.c2[r] = static_cast<T>(a * a * s);
    ws.st[r] = RowState{};
    std::fill(ws.acc.begin() + static_cast<int64_t>(r) * C, ws.acc.begin() + static_cast<int64_t>(r + 1) * C, 0.0);
  }

  const int64_t nkeys = nimg * npos;
  for (int64_t kb0 = 0; kb0 < nkeys; kb0 += kKB) {
    const int nk = static_cast<int>(std::min<int64_t>(kKB, nkeys - kb0));
    // gather the key block: Kt[dd][j], norms, centre values V[c][j], global ids
    for (int j = 0; j < nk; ++j) {
      const int64_t kk = kb0 + j;
      const int64_t n = A.grp_img[i0 + kk / npos];
      const int64_t pos = A.cls_kpos[p0 + kk % npos];
      const T* img = A.train + n * C * HW;
      const int ci = static_cast<int>(pos / A.W), cj = static_cast<int>(pos % A.W);
      gather_patch(img, C, A.H, A.W, ci, cj, k, A.key_pad, ws.Kt.data() + j, kKB);
      double nrm = 0.0;
      for (int dd = 0; dd < d; ++dd) {
        const double v = ws.Kt[static_cast<int64_t>(dd) * kKB + j];
        nrm += v * v;
      }
      ws.knorm[j] = static_cast<T>(nrm);
      for (int c = 0; c < C; ++c) ws.V[static_cast<int64_t>(c) * kKB + j] = img[c * HW + pos];
      ws.key_id[j] = n * HW + pos;
    }
    for (int j = nk; j < kKB; ++j)
      for (int dd = 0; dd < d; ++dd) ws.Kt[static_cast<int64_t>(dd) * kKB + j] = T(0);

    dot_block(ws.Q.data(), ws.Kt.data(), d, rows_padded, ws.S.data());

    for (int r = 0; r < rows; ++r) {
      const T* Sr = ws.S.data() + static_cast<int64_t>(r) * kKB;
      const T c1 = ws.c1[r], c2 = ws.c2[r];
      T* L = ws.L.data();
      T bmax = -std::numeric_limits<T>::infinity();
      int barg = 0;
      for (int j = 0; j < nk; ++j) {
        L[j] = c1 * Sr[j] - c2 * ws.knorm[j];
        if (L[j] > bmax) { bmax = L[j]; barg = j; }
      }
      RowState& st = ws.st[r];
      double* acc = ws.acc.data() + static_cast<int64_t>(r) * C;
      const double f = rescale_for(st, bmax, ws.key_id[barg]);
      if (f != 1.0) {
        st.s *= f;
        for (int c = 0; c < C; ++c) acc[c] *= f;
      }
      const T m = static_cast<T>(st.m);
      T wsum = T(0);
#pragma omp simd reduction(+ : wsum)
      for (int j = 0; j < nk; ++j) {
        L[j] = exp_nonpos(L[j] - m);
        wsum += L[j];
      }
      st.s += wsum;
      for (int c = 0; c < C; ++c) {
        const T* Vc = ws.V.data() + static_cast<int64_t>(c) * kKB;
        T vsum = T(0);
#pragma omp simd reduction(+ : vsum)
        for (int j = 0; j < nk; ++j) vsum += L[j] * Vc[j];
        acc[c] += vsum;
      }
    }
  }

  for (int r = 0; r < rows; ++r) {
    const int64_t b = ws.row_b[r], pix = ws.row_pix[r];
    const RowState& st = ws.st[r];
    const double* acc = ws.acc.data() + static_cast<int64_t>(r) * C;
    for (int c = 0; c < C; ++c) A.out[(b * C + c) * HWq + pix] = static_cast<T>(acc[c] / st.s);
    if (A.arg_key) A.arg_key[b * HWq + pix] = st.best;
    if (A.arg_share) A.arg_share[b * HWq + pix] = static_cast<T>(1.0 / st.s);
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
  std::vector<Item> items;
  for (int64_t g = 0; g < A.n_groups; ++g) {
    if (bs[g].empty()) continue;
    if (A.grp_img_ptr[g + 1] == A.grp_img_ptr[g]) throw std::invalid_argument("an image group has no training images");
    for (int64_t c = 0; c < A.n_classes; ++c) {
      const int64_t npix = A.cls_qpix_ptr[c + 1] - A.cls_qpix_ptr[c];
      if (npix == 0) continue;
      if (A.cls_kpos_ptr[c + 1] == A.cls_kpos_ptr[c]) throw std::invalid_argument("a query-pixel class has no key positions");
      const int64_t nrows = static_cast<int64_t>(bs[g].size()) * npix;
      for (int64_t r0 = 0; r0 < nrows; r0 += kQB) items.push_back({g, c, r0, std::min<int64_t>(nrows, r0 + kQB)});
    }
  }
  const int d = A.C * A.k * A.k;
  int nt = A.n_threads;
#ifdef _OPENMP
  if (nt <= 0) nt = omp_get_max_threads();
#else
  nt = 1;
#endif
  nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, static_cast<int64_t>(items.size()))));
#pragma omp parallel num_threads(nt)
  {
    Workspace<T> ws(d, A.C);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) run_item(A, items[i], bs, ws);
  }
}

template void patch_softmax_cpu<float>(const PatchSoftmaxArgs<float>&);
template void patch_softmax_cpu<double>(const PatchSoftmaxArgs<double>&);

}  // namespace patchmosaic
