// aligned_softmax.cu -- the CUDA kernels of the same-position machines (contract.hpp, AlignedCall), forward and
// backward; twins of cpu/aligned_softmax.cpp with the same contract.
//
// Forward: one thread per (row, query image, part of the images): it walks its part's training images, sums the
// weighted squared residual over its row's neighbourhood (in double) and folds the logit into its online softmax
// state (fold_key of softmax_state.hpp), its response sums in registers (up to kRegResp entries) or in a global
// scratch row it owns; a second kernel merges each row's parts in part order (merge_state).
//
// Backward, per chunk of kChunk images of every query's group, without atomics: (1) one thread per (row, query)
// computes c = w <g, phi[resp] - out> for each image of the chunk (the derivative of <g, out> by the logit) and
// adds -c d to its row's inv_2b2 partial; (2) one thread per (element, query) sums, over the rows whose
// neighbourhood holds the element (the transposed table), weight * c, and adds the element's query gradient and
// its a partial; (3) one block per query reduces the partials. Every sum runs in a fixed order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "cuda_check.cuh"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"

namespace patchmosaic {
namespace cuda {
namespace {

constexpr int kRows = 128;        // threads (rows) per block
constexpr int kRegResp = 4;       // response entries a thread keeps in registers
constexpr int64_t kPart = 256;    // fewest images per part
constexpr int kMaxParts = 64;     // parts of one group's images
constexpr int kChunk = 64;        // images per backward chunk
constexpr int kRed = 256;         // threads of the reduction

struct Table {
  int64_t n_rows, n_resp, D;
  const int64_t* hood_ptr;
  const int32_t* hood_elem;
  const double* hood_weight;
  const int64_t* resp_ptr;
  const int32_t* resp_elem;
  const int64_t* grp_ptr;
  const int32_t* grp_img;
  const int32_t* group_of_b;
  int parts;
};

template <typename T>
__device__ double row_distance(const Table& Tb, int64_t r, const T* __restrict__ x, const T* __restrict__ phi,
                               double a) {
  double d = 0.0;
  for (int64_t u = Tb.hood_ptr[r]; u < Tb.hood_ptr[r + 1]; ++u) {
    const int32_t e = Tb.hood_elem[u];
    const double diff = static_cast<double>(x[e]) - a * static_cast<double>(__ldg(phi + e));
    d = fma(Tb.hood_weight[u] * diff, diff, d);
  }
  return d;
}

// forward 1: each (row, query, part) folds its part's images; partial states (m, s, best) per (query, part, row)
// and response sums per (query, part, response entry)
template <typename T, bool REG>
__global__ void aligned_fold(const T* __restrict__ train, const T* __restrict__ query, const double* a,
                             const double* inv_2b2, Table Tb, double* __restrict__ pm, double* __restrict__ ps,
                             int64_t* __restrict__ pbest, double* __restrict__ pacc) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x;
  const int64_t b = blockIdx.y;
  const int p = blockIdx.z;
  if (r >= Tb.n_rows) return;
  const int g = Tb.group_of_b[b];
  const int64_t n = Tb.grp_ptr[g + 1] - Tb.grp_ptr[g];
  const int64_t i0 = Tb.grp_ptr[g] + n * p / Tb.parts, i1 = Tb.grp_ptr[g] + n * (p + 1) / Tb.parts;
  const T* x = query + b * Tb.D;
  const double ab = a[b], inv = inv_2b2[b];
  const int64_t j0 = Tb.resp_ptr[r], nj = Tb.resp_ptr[r + 1] - j0;
  const int64_t st = (b * Tb.parts + p) * Tb.n_rows + r;
  double* gacc = pacc + (b * Tb.parts + p) * Tb.n_resp + j0;  // this thread's own entries
  double racc[kRegResp];
  for (int j = 0; j < kRegResp; ++j) racc[j] = 0.0;
  if (!REG)
    for (int64_t j = 0; j < nj; ++j) gacc[j] = 0.0;
  double m = -INFINITY, s = 0.0;
  int64_t best = -1;
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t img = Tb.grp_img[i];
    const T* phi = train + static_cast<int64_t>(img) * Tb.D;
    const double l = -inv * row_distance(Tb, r, x, phi, ab);
    if (l > m) best = img;
    double f;
    const double w = fold_key<T>(m, s, l, f);
    if (REG) {
      for (int j = 0; j < kRegResp; ++j)
        if (j < nj) racc[j] = fma(w, static_cast<double>(__ldg(phi + Tb.resp_elem[j0 + j])), racc[j] * f);
    } else {
      for (int64_t j = 0; j < nj; ++j)
        gacc[j] = fma(w, static_cast<double>(__ldg(phi + Tb.resp_elem[j0 + j])), gacc[j] * f);
    }
  }
  pm[st] = m;
  ps[st] = s;
  pbest[st] = best;
  if (REG)
    for (int j = 0; j < kRegResp; ++j)
      if (j < nj) gacc[j] = racc[j];
}

// forward 2: one thread per (row, query) merges the parts in order, the running response sums in the first
// part's scratch (its own entries)
template <typename T>
__global__ void aligned_merge(Table Tb, const double* __restrict__ pm, const double* __restrict__ ps,
                              const int64_t* __restrict__ pbest, double* pacc, T* __restrict__ out,
                              double* __restrict__ stats, int64_t* __restrict__ arg_key, T* __restrict__ arg_share) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (r >= Tb.n_rows) return;
  const int64_t j0 = Tb.resp_ptr[r], j1 = Tb.resp_ptr[r + 1];
  double m = -INFINITY, s = 0.0;
  int64_t best = -1;
  double* acc = pacc + (b * Tb.parts) * Tb.n_resp;
  for (int p = 0; p < Tb.parts; ++p) {
    const int64_t st = (b * Tb.parts + p) * Tb.n_rows + r;
    const MergeFactors f = merge_state(m, s, best, pm[st], ps[st], pbest[st]);
    const double* other = pacc + (b * Tb.parts + p) * Tb.n_resp;  // the first part: acc itself (f = {0, 1})
    for (int64_t j = j0; j < j1; ++j) acc[j] = acc[j] * f.self + other[j] * f.other;
  }
  for (int64_t j = j0; j < j1; ++j) out[b * Tb.n_resp + j] = static_cast<T>(acc[j] / s);
  stats[2 * (b * Tb.n_rows + r)] = m;
  stats[2 * (b * Tb.n_rows + r) + 1] = s;
  if (arg_key) {
    arg_key[b * Tb.n_rows + r] = best;
    arg_share[b * Tb.n_rows + r] = static_cast<T>(1.0 / s);
  }
}

// backward 1: per (row, query) and image of the chunk, c = w <g, phi[resp] - out>; the inv_2b2 partial -sum c d
template <typename T>
__global__ void aligned_coef(const T* __restrict__ train, const T* __restrict__ query, const T* __restrict__ grad_out,
                             const T* __restrict__ out, const double* __restrict__ stats, const double* a,
                             const double* inv_2b2, Table Tb, int64_t c0, double* __restrict__ coef,
                             double* __restrict__ gs_part) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (r >= Tb.n_rows) return;
  const int g = Tb.group_of_b[b];
  const int64_t n = Tb.grp_ptr[g + 1] - Tb.grp_ptr[g];
  const T* x = query + b * Tb.D;
  const double ab = a[b], inv = inv_2b2[b];
  const double m = stats[2 * (b * Tb.n_rows + r)], s = stats[2 * (b * Tb.n_rows + r) + 1];
  double gs = 0.0;
  for (int jj = 0; jj < kChunk; ++jj) {
    const int64_t i = c0 + jj;
    double c = 0.0;
    if (i < n) {
      const T* phi = train + static_cast<int64_t>(Tb.grp_img[Tb.grp_ptr[g] + i]) * Tb.D;
      const double d = row_distance(Tb, r, x, phi, ab);
      const double w = cut_exp<T, double>(-inv * d - m) / s;
      if (w != 0.0) {
        double gv = 0.0;
        for (int64_t j = Tb.resp_ptr[r]; j < Tb.resp_ptr[r + 1]; ++j)
          gv += static_cast<double>(grad_out[b * Tb.n_resp + j]) *
                (static_cast<double>(__ldg(phi + Tb.resp_elem[j])) - static_cast<double>(out[b * Tb.n_resp + j]));
        c = w * gv;
        gs -= c * d;
      }
    }
    coef[(b * kChunk + jj) * Tb.n_rows + r] = c;
  }
  gs_part[b * Tb.n_rows + r] += gs;
}

// backward 2: per (element, query) the query gradient and the a partial of the chunk's images
template <typename T>
__global__ void aligned_elements(const T* __restrict__ train, const T* __restrict__ query, const double* a,
                                 const double* inv_2b2, Table Tb, const int64_t* __restrict__ tptr,
                                 const int32_t* __restrict__ trow, const double* __restrict__ tw, int64_t c0,
                                 const double* __restrict__ coef, double* __restrict__ gq, double* __restrict__ ga_part) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (e >= Tb.D) return;
  const int g = Tb.group_of_b[b];
  const int64_t n = Tb.grp_ptr[g + 1] - Tb.grp_ptr[g];
  const double xe = static_cast<double>(query[b * Tb.D + e]), ab = a[b], inv = inv_2b2[b];
  double gx = 0.0, gae = 0.0;
  for (int jj = 0; jj < kChunk && c0 + jj < n; ++jj) {
    const double phe = static_cast<double>(__ldg(train + static_cast<int64_t>(Tb.grp_img[Tb.grp_ptr[g] + c0 + jj]) * Tb.D + e));
    double G = 0.0;
    for (int64_t u = tptr[e]; u < tptr[e + 1]; ++u) G = fma(tw[u], coef[(b * kChunk + jj) * Tb.n_rows + trow[u]], G);
    const double delta = xe - ab * phe;
    gx -= 2.0 * inv * delta * G;
    gae += 2.0 * inv * phe * delta * G;
  }
  gq[b * Tb.D + e] += gx;
  ga_part[b * Tb.D + e] += gae;
}

// backward 3: per query, the query gradient in T and the a and inv_2b2 sums
template <typename T>
__global__ void aligned_finish(Table Tb, const double* __restrict__ gq, const double* __restrict__ ga_part,
                               const double* __restrict__ gs_part, T* __restrict__ grad_query, double* grad_a,
                               double* grad_s) {
  const int64_t b = blockIdx.x;
  __shared__ double sm[kRed];
  double va = 0.0, vs = 0.0;
  for (int64_t e = threadIdx.x; e < Tb.D; e += kRed) {
    grad_query[b * Tb.D + e] = static_cast<T>(gq[b * Tb.D + e]);
    va += ga_part[b * Tb.D + e];
  }
  for (int64_t r = threadIdx.x; r < Tb.n_rows; r += kRed) vs += gs_part[b * Tb.n_rows + r];
  const double ta = block_sum<kRed>(va, sm);
  const double ts = block_sum<kRed>(vs, sm);
  if (threadIdx.x == 0) {
    grad_a[b] = ta;
    grad_s[b] = ts;
  }
}

__global__ void fill_zero(double* __restrict__ v, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRed + threadIdx.x;
  if (i < n) v[i] = 0.0;
}

// the call's tables on the device
struct DeviceTable {
  DeviceBuffer<int64_t> hp, rp, gp;
  DeviceBuffer<int32_t> he, re, gi, gob;
  DeviceBuffer<double> hw;
  Table Tb;
  int64_t widest = 0;
  template <typename T>
  DeviceTable(const AlignedArgs<T>& A, cudaStream_t st)
      : hp(A.hood_ptr, A.n_rows + 1, st), rp(A.resp_ptr, A.n_rows + 1, st), gp(A.grp_img_ptr, A.n_groups + 1, st),
        he(A.hood_elem, A.hood_ptr[A.n_rows], st), re(A.resp_elem, A.n_resp, st),
        gi(A.grp_img, A.grp_img_ptr[A.n_groups], st), gob(A.group_of_b, A.B, st), hw(weights(A), st) {
    for (int64_t b = 0; b < A.B; ++b) {
      const int32_t g = A.group_of_b[b];
      widest = std::max(widest, A.grp_img_ptr[g + 1] - A.grp_img_ptr[g]);
    }
    const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxParts, widest / kPart)));
    Tb = Table{A.n_rows, A.n_resp, A.D, hp.get(), he.get(), hw.get(), rp.get(), re.get(), gp.get(), gi.get(),
               gob.get(), parts};
  }
  template <typename T>
  static std::vector<double> weights(const AlignedArgs<T>& A) {
    const int64_t n = A.hood_ptr[A.n_rows];
    if (A.hood_weight) return std::vector<double>(A.hood_weight, A.hood_weight + n);
    return std::vector<double>(n, 1.0);
  }
};

template <typename T>
bool responses_fit_registers(const AlignedArgs<T>& A) {
  for (int64_t r = 0; r < A.n_rows; ++r)
    if (A.resp_ptr[r + 1] - A.resp_ptr[r] > kRegResp) return false;
  return true;
}

}  // namespace
}  // namespace cuda

template <typename T>
void aligned_forward_cuda(const AlignedArgs<T>& A, void* stream, int device) {
  using namespace cuda;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  if (A.B > 65535) throw std::invalid_argument("too many query images for one call of the CUDA engine (at most 65535)");
  DeviceTable t(A, st);
  const int64_t P = t.Tb.parts;
  DeviceBuffer<double> pm(A.B * P * A.n_rows, st), ps(A.B * P * A.n_rows, st), pacc(A.B * P * A.n_resp, st);
  DeviceBuffer<int64_t> pbest(A.B * P * A.n_rows, st);
  const unsigned row_blocks = static_cast<unsigned>((A.n_rows + kRows - 1) / kRows);
  const dim3 grid(row_blocks, static_cast<unsigned>(A.B), static_cast<unsigned>(P));
  const auto fold = responses_fit_registers(A) ? &aligned_fold<T, true> : &aligned_fold<T, false>;
  PM_LAUNCH(fold, grid, kRows, 0, st)(A.train, A.query, A.a, A.inv_2b2, t.Tb, pm.get(), ps.get(), pbest.get(),
                                      pacc.get());
  check_launch("aligned_softmax (fold)");
  const auto merge = &aligned_merge<T>;
  PM_LAUNCH(merge, dim3(row_blocks, static_cast<unsigned>(A.B)), kRows, 0, st)(
      t.Tb, pm.get(), ps.get(), pbest.get(), pacc.get(), A.out, A.stats, A.arg_key, A.arg_share);
  check_launch("aligned_softmax (merge)");
}

template <typename T>
void aligned_backward_cuda(const AlignedArgs<T>& A, void* stream, int device) {
  using namespace cuda;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  if (A.B > 65535) throw std::invalid_argument("too many query images for one call of the CUDA engine (at most 65535)");
  DeviceTable t(A, st);
  const int64_t n_hood = A.hood_ptr[A.n_rows];
  DeviceBuffer<int64_t> tptr(A.hoodT_ptr, A.D + 1, st);
  DeviceBuffer<int32_t> trow(A.hoodT_row, n_hood, st);
  std::vector<double> ones;
  if (!A.hoodT_weight) ones.assign(n_hood, 1.0);
  DeviceBuffer<double> tw(A.hoodT_weight ? A.hoodT_weight : ones.data(), n_hood, st);
  DeviceBuffer<double> coef(A.B * kChunk * A.n_rows, st), gs_part(A.B * A.n_rows, st), gq(A.B * A.D, st),
      ga_part(A.B * A.D, st);
  for (auto* buf : {&gs_part, &gq, &ga_part}) {
    const int64_t n = buf == &gs_part ? A.B * A.n_rows : A.B * A.D;
    PM_LAUNCH(fill_zero, static_cast<unsigned>((n + kRed - 1) / kRed), kRed, 0, st)(buf->get(), n);
    check_launch("aligned_softmax backward (zero)");
  }
  const dim3 rows(static_cast<unsigned>((A.n_rows + kRows - 1) / kRows), static_cast<unsigned>(A.B));
  const dim3 elems(static_cast<unsigned>((A.D + kRows - 1) / kRows), static_cast<unsigned>(A.B));
  const auto coefs = &aligned_coef<T>;
  const auto elements = &aligned_elements<T>;
  const auto finish = &aligned_finish<T>;
  for (int64_t c0 = 0; c0 < t.widest; c0 += kChunk) {
    PM_LAUNCH(coefs, rows, kRows, 0, st)(A.train, A.query, A.grad_out, A.out, A.stats, A.a, A.inv_2b2, t.Tb,
                                                   c0, coef.get(), gs_part.get());
    check_launch("aligned_softmax backward (coefficients)");
    PM_LAUNCH(elements, elems, kRows, 0, st)(A.train, A.query, A.a, A.inv_2b2, t.Tb, tptr.get(), trow.get(),
                                                        tw.get(), c0, coef.get(), gq.get(), ga_part.get());
    check_launch("aligned_softmax backward (elements)");
  }
  PM_LAUNCH(finish, static_cast<unsigned>(A.B), kRed, 0, st)(t.Tb, gq.get(), ga_part.get(), gs_part.get(),
                                                                         A.grad_query, A.grad_a, A.grad_inv_2b2);
  check_launch("aligned_softmax backward (finish)");
}

template void aligned_forward_cuda<float>(const AlignedArgs<float>&, void*, int);
template void aligned_forward_cuda<double>(const AlignedArgs<double>&, void*, int);
template void aligned_backward_cuda<float>(const AlignedArgs<float>&, void*, int);
template void aligned_backward_cuda<double>(const AlignedArgs<double>&, void*, int);

}  // namespace patchmosaic
