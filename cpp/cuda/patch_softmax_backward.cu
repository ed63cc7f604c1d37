// patch_softmax_backward.cu -- the CUDA backward pass of the local machines; the twin of
// cpu/patch_softmax_backward.cpp (engines.hpp gives the formula).
//
// The forward's work items again (plan.hpp, local_tile.cuh), one per thread block. For every key tile a
// block recomputes the 64 x 64 logits exactly as the forward kernel does (the same products in the same
// order), turns them into weights with the forward's row statistics, and keeps the tile of
// p = w delta in shared memory; then, chunk by chunk of patch elements, each thread adds
//     G[row][e] += sum_keys p (a K[e] - Q[e])          (a K - Q by one fused multiply-add)
// for its rows and element into the item's rows of a partial buffer in global memory (each (row, e)
// belongs to one thread: no atomics). Per row it also sums p, p |K|^2 and p <Q, K> (merged over the
// 16 threads of a row by shuffles), from which the a and s gradients follow. A second kernel adds the
// patch gradients back onto the query pixels they were gathered from (each output pixel sums its
// contributions in a fixed order), a third sums the a and s gradients per image: the same bits whatever
// the scheduling.
#include <cstdlib>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "local_tile.cuh"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"

namespace patchmosaic {
namespace cuda {
namespace {

constexpr int64_t kScratchBytes = int64_t(8) << 30;  // partial sums of one call at most

// The limit on a backward call's partial sums: kScratchBytes, or PATCHMOSAIC_CUDA_SCRATCH_BYTES where set (a test
// of the limit's plan on small calls).
inline int64_t scratch_bytes() {
  const char* v = std::getenv("PATCHMOSAIC_CUDA_SCRATCH_BYTES");
  const long long n = v ? std::atoll(v) : 0;
  return n > 0 ? static_cast<int64_t>(n) : kScratchBytes;
}

struct Sums {
  double* G;   // (slots, d)
  double* ga;  // (slots,)
  double* gs;  // (slots,)
};

template <typename T, int CC>
__global__ void __launch_bounds__(NT) backward_items(Geometry<T> G, const Item* __restrict__ items,
                                                     const T* __restrict__ out, const T* __restrict__ grad_out,
                                                     const double* __restrict__ stats, Sums S) {
  const Item it = items[blockIdx.x];
  const int tid = threadIdx.x;
  const int64_t e0 = class_elem0(G, it.c);  // this class's part of the element table
  const int d = class_dim(G, it.c), half = G.k / 2;
  const int64_t HW = static_cast<int64_t>(G.H) * G.W, HWq = static_cast<int64_t>(G.Hq) * G.Wq;
  const int64_t q0 = G.cls_qpix_ptr[it.c], npix = G.cls_qpix_ptr[it.c + 1] - q0;
  const int64_t p0 = G.cls_kpos_ptr[it.c], npos = G.cls_kpos_ptr[it.c + 1] - p0;
  const int64_t i0 = G.grp_img_ptr[it.g], b0 = G.grp_b_ptr[it.g];
  const int rows = static_cast<int>(it.row1 - it.row0);

  __shared__ T Qs[BK][BM];
  __shared__ T Ks[BK][BN];
  __shared__ T V[CC][BN];
  __shared__ T kn[BN];
  __shared__ double knd[BN];
  __shared__ T c1[BM], c2[BM], ar[BM], mt[BM], inv_s[BM], Dr[BM], gr[CC][BM];
  __shared__ double qn[BM];
  __shared__ const T* qimg[BM];
  __shared__ const T* kimg[BN];
  __shared__ int qi[BM], qj[BM], ki[BN], kj[BN];
  PM_DYNAMIC_SHARED(tile);
  T (*Pt)[BN] = reinterpret_cast<T (*)[BN]>(tile);  // [BM][BN]: p of the current key tile

  if (tid < BM) {
    if (tid < rows) {
      const int64_t row = it.row0 + tid;
      const int b = G.grp_b[b0 + row / npix];
      const int pix = G.cls_qpix[q0 + row % npix];
      qimg[tid] = G.query + static_cast<int64_t>(b) * G.C * HWq;
      qi[tid] = pix / G.Wq;
      qj[tid] = pix % G.Wq;
      const double a = G.a[b], s = G.inv_2b2[b];
      c1[tid] = static_cast<T>(2.0 * a * s);
      c2[tid] = static_cast<T>(a * a * s);
      ar[tid] = static_cast<T>(a);
      const int64_t at = static_cast<int64_t>(b) * HWq + pix;
      mt[tid] = static_cast<T>(stats[2 * at]);
      inv_s[tid] = static_cast<T>(1.0 / stats[2 * at + 1]);
      double D = 0.0;
      for (int ch = 0; ch < CC; ++ch) {
        const int64_t e = (static_cast<int64_t>(b) * G.C + ch) * HWq + pix;
        gr[ch][tid] = grad_out[e];
        D += static_cast<double>(grad_out[e]) * static_cast<double>(out[e]);
      }
      Dr[tid] = static_cast<T>(D);
      double q2 = 0.0;
      for (int e = 0; e < d; ++e) {
        const double q = call_elem(G, qimg[tid], G.Hq, G.Wq, qi[tid], qj[tid], e0 + e, half, G.query_pad);
        q2 += q * q;
      }
      qn[tid] = q2;
    } else {
      qimg[tid] = nullptr;
      qi[tid] = qj[tid] = 0;
      c1[tid] = c2[tid] = ar[tid] = mt[tid] = inv_s[tid] = Dr[tid] = T(0);
      for (int ch = 0; ch < CC; ++ch) gr[ch][tid] = T(0);
      qn[tid] = 0.0;
    }
  }
  // this item's rows of the partial sums start at zero
  for (int64_t e = tid; e < static_cast<int64_t>(rows) * G.stride; e += NT) S.G[it.slot * G.stride + e] = 0.0;

  const int ty = tid / 16, tx = tid % 16;
  double z[4], u2[4], wq[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) z[u] = u2[u] = wq[u] = 0.0;

  // patch elements d0 .. d0 + BK - 1 of the tile's keys and the item's queries into shared memory
  auto gather_chunk = [&](int d0) {
    for (int e = tid; e < BK * BM; e += NT) {
      const int dd = e / BM, r = e % BM;
      Qs[dd][r] = (qimg[r] != nullptr && d0 + dd < d)
                      ? call_elem(G, qimg[r], G.Hq, G.Wq, qi[r], qj[r], e0 + d0 + dd, half, G.query_pad)
                      : T(0);
    }
    for (int e = tid; e < BK * BN; e += NT) {
      const int dd = e / BN, col = e % BN;
      Ks[dd][col] = (kimg[col] != nullptr && d0 + dd < d)
                        ? call_elem(G, kimg[col], G.H, G.W, ki[col], kj[col], e0 + d0 + dd, half, G.key_pad)
                        : T(0);
    }
  };

  for (int64_t kt = it.k0; kt < it.k1; kt += BN) {
    const int nk = static_cast<int>(it.k1 - kt < BN ? it.k1 - kt : BN);
    __syncthreads();
    if (tid < BN) {
      if (tid < nk) {
        const int64_t j = kt + tid;
        const int64_t n = G.grp_img[i0 + j / npos];
        const int pos = G.cls_kpos[p0 + j % npos];
        kimg[tid] = G.train + n * G.C * HW;
        ki[tid] = pos / G.W;
        kj[tid] = pos % G.W;
        for (int ch = 0; ch < CC; ++ch) V[ch][tid] = kimg[tid][ch * HW + pos];
      } else {
        kimg[tid] = nullptr;
        ki[tid] = kj[tid] = 0;
        for (int ch = 0; ch < CC; ++ch) V[ch][tid] = T(0);
      }
      knd[tid] = 0.0;
    }
    // the forward's products, in its order
    T prod[4][4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) prod[u][v] = T(0);
    for (int d0 = 0; d0 < d; d0 += BK) {
      __syncthreads();
      gather_chunk(d0);
      __syncthreads();
      const int nd = d - d0 < BK ? d - d0 : BK;
      for (int dd = 0; dd < nd; ++dd) {
        T qa[4], kb[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) qa[u] = Qs[dd][ty * 4 + u];
#pragma unroll
        for (int v = 0; v < 4; ++v) kb[v] = Ks[dd][tx * 4 + v];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) prod[u][v] = fma(qa[u], kb[v], prod[u][v]);
      }
      if (tid < BN) {
        double sq = knd[tid];
        for (int dd = 0; dd < nd; ++dd) sq = fma(static_cast<double>(Ks[dd][tid]), static_cast<double>(Ks[dd][tid]), sq);
        knd[tid] = sq;
      }
    }
    if (tid < BN) kn[tid] = static_cast<T>(knd[tid]);
    __syncthreads();
    // weights and p = w delta of the tile
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int r = ty * 4 + u;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int col = tx * 4 + v;
        T p = T(0);
        if (r < rows && col < nk) {
          const T l = c1[r] * prod[u][v] - c2[r] * kn[col];
          T gv = T(0);
          for (int ch = 0; ch < CC; ++ch) gv += gr[ch][r] * V[ch][col];
          p = static_cast<T>(clamped_exp<T>(l - mt[r])) * inv_s[r] * (gv - Dr[r]);
          z[u] += p;
          u2[u] += static_cast<double>(p) * kn[col];
          wq[u] += static_cast<double>(p) * prod[u][v];
        }
        Pt[r][col] = p;
      }
    }
    // G[row][e] += sum_col p (a K[e] - Q[e]): thread (ty, tx) takes element tx of each chunk, rows 4 ty ..
    for (int d0 = 0; d0 < d; d0 += BK) {
      __syncthreads();
      gather_chunk(d0);
      __syncthreads();
      const int dd = tx;
      if (d0 + dd < d) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int r = ty * 4 + u;
          if (r >= rows) continue;
          const T am = ar[r], qm = Qs[dd][r];
          T acc = T(0);
          for (int col = 0; col < nk; ++col) acc += Pt[r][col] * fma(am, Ks[dd][col], -qm);
          S.G[(it.slot + r) * G.stride + d0 + dd] += static_cast<double>(acc);
        }
      }
    }
  }
  // the 16 threads of each row: sum z, u2, w; then the row's a and s gradients
#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) {
      z[u] += __shfl_xor_sync(0xffffffffu, z[u], off);
      u2[u] += __shfl_xor_sync(0xffffffffu, u2[u], off);
      wq[u] += __shfl_xor_sync(0xffffffffu, wq[u], off);
    }
    const int r = ty * 4 + u;
    if (tx == 0 && r < rows) {
      const int64_t row = it.row0 + r;
      const int b = G.grp_b[b0 + row / npix];
      const double a = G.a[b], s = G.inv_2b2[b];
      S.ga[it.slot + r] = 2.0 * s * (wq[u] - a * u2[u]);
      S.gs[it.slot + r] = -(qn[r] * z[u] - 2.0 * a * wq[u] + a * a * u2[u]);
    }
  }
}

// Where each query pixel's row lives: its first slot (-1: no row), the number of key splits and the
// stride between them.
struct RowSlots {
  const int64_t* first;
  const int32_t* n_split;
  const int32_t* stride;
  const int32_t* cls;  // the class of each query pixel's row (read with a masked patch per class)
};

// One thread per element (b, c, y, x) of the query gradient: every patch element that read the pixel adds
// its row's partial sums, in (di, dj, split) order.
template <typename T>
__global__ void fold_patches(Geometry<T> G, int64_t B, RowSlots R, Sums S, T* __restrict__ grad_query) {
  const int64_t HWq = static_cast<int64_t>(G.Hq) * G.Wq;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * G.C * HWq) return;
  const int64_t b = e / (G.C * HWq);
  const int c = static_cast<int>((e / HWq) % G.C);
  const int y = static_cast<int>((e % HWq) / G.Wq), x = static_cast<int>(e % G.Wq);
  const int k = G.k, half = k / 2, d = G.stride;
  double acc = 0.0;
  for (int di = 0; di < k; ++di) {
    int py = y - di + half;
    if (py < 0 || py >= G.Hq) {
      if (G.query_pad != kPadCircular) continue;
      py = wrap_index(py, G.Hq);
    }
    for (int dj = 0; dj < k; ++dj) {
      int px = x - dj + half;
      if (px < 0 || px >= G.Wq) {
        if (G.query_pad != kPadCircular) continue;
        px = wrap_index(px, G.Wq);
      }
      const int64_t at = b * HWq + static_cast<int64_t>(py) * G.Wq + px;
      const int64_t first = R.first[at];
      if (first < 0) continue;
      int dd = (c * k + di) * k + dj;
      int64_t e0 = 0;
      if (G.slot_of) {  // a masked patch: its table entry (in the row's class's part), if the mask has the element
        const int cls = G.cls_elem_ptr ? R.cls[at] : 0;
        dd = G.slot_of[static_cast<int64_t>(cls) * G.C * k * k + dd];
        if (dd < 0) continue;
        e0 = class_elem0(G, cls);
      }
      const double* Gp = S.G + dd;
      if (!G.scale) {
        for (int sp = 0; sp < R.n_split[at]; ++sp) acc += Gp[(first + static_cast<int64_t>(sp) * R.stride[at]) * d];
      } else {  // a weighted patch: the gradient of the scaled element
        double part = 0.0;
        for (int sp = 0; sp < R.n_split[at]; ++sp) part += Gp[(first + static_cast<int64_t>(sp) * R.stride[at]) * d];
        acc += part * static_cast<double>(G.scale[e0 + dd]);
      }
    }
  }
  grad_query[e] = static_cast<T>(2.0 * G.inv_2b2[b] * acc);
}

// One thread per query image: its rows' a and s gradients, summed in pixel and split order.
template <typename T>
__global__ void sum_coefficients(Geometry<T> G, int64_t B, RowSlots R, Sums S, double* __restrict__ grad_a,
                                 double* __restrict__ grad_s) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t HWq = static_cast<int64_t>(G.Hq) * G.Wq;
  double ga = 0.0, gs = 0.0;
  for (int64_t p = 0; p < HWq; ++p) {
    const int64_t at = b * HWq + p;
    if (R.first[at] < 0) continue;
    for (int sp = 0; sp < R.n_split[at]; ++sp) {
      const int64_t slot = R.first[at] + static_cast<int64_t>(sp) * R.stride[at];
      ga += S.ga[slot];
      gs += S.gs[slot];
    }
  }
  grad_a[b] = ga;
  grad_s[b] = gs;
}

template <typename T, int CC>
void launch_backward(const PatchSoftmaxArgs<T>& A, const DeviceCall<T>& D, const Plan& plan, const QueryGroups& qg,
                     cudaStream_t st, int device) {
  const int d = patch_dim(A);
  const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
  const double scratch = static_cast<double>(D.slots) * (d + 2) * sizeof(double);
  const int64_t limit = scratch_bytes();
  if (scratch > static_cast<double>(limit))  // (the plan's fewest slots: one per row)
    throw std::invalid_argument("the CUDA backward pass of this call needs " + std::to_string(scratch / (1 << 30)) +
                                " GiB of partial sums (limit " + std::to_string(limit / double(1 << 30)) +
                                " GiB); split the batch");
  // the row of every query pixel (host)
  std::vector<int64_t> first(static_cast<size_t>(A.B) * HWq, -1);
  std::vector<int32_t> n_split(first.size(), 0), stride(first.size(), 0), cls(first.size(), 0);
  for (const patchmosaic::RowBlock& rb : plan.blocks) {
    const int64_t rows = rb.row1 - rb.row0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = rb.row0 + r;
      const int64_t at = row_image(A, qg, rb.g, rb.c, row) * HWq + row_pixel(A, rb.c, row);
      first[at] = plan.items[rb.item0].slot + r;
      n_split[at] = static_cast<int32_t>(rb.item1 - rb.item0);
      cls[at] = static_cast<int32_t>(rb.c);
      stride[at] = static_cast<int32_t>(rows);
    }
  }
  DeviceBuffer<int64_t> d_first(first, st);
  DeviceBuffer<int32_t> d_split(n_split, st), d_stride(stride, st);
  DeviceBuffer<double> Gbuf(D.slots * d, st), ga(D.slots, st), gs(D.slots, st);
  const Sums S{Gbuf.get(), ga.get(), gs.get()};
  DeviceBuffer<int32_t> d_cls(A.cls_elem_ptr ? cls : std::vector<int32_t>(), st);
  const RowSlots R{d_first.get(), d_split.get(), d_stride.get(), d_cls.get()};

  const size_t tile_bytes = static_cast<size_t>(BM) * BN * sizeof(T);
  const auto kernel = &backward_items<T, CC>;
  cudaFuncAttributes fa{};
  check_cuda(cudaFuncGetAttributes(&fa, kernel), "cudaFuncGetAttributes");
  if (tile_bytes + fa.sharedSizeBytes > 48 * 1024) {
    int optin = 0;
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    optin - static_cast<int>(fa.sharedSizeBytes)),
               "cudaFuncSetAttribute");
  }
  if (D.n_items > 0) {
    PM_LAUNCH(kernel, static_cast<unsigned>(D.n_items), NT, tile_bytes, st)(D.G, D.items.get(), A.out, A.grad_out,
                                                                           A.stats, S);
    check_launch("patch_softmax backward (items)");
  }
  const int64_t n_elem = A.B * A.C * HWq;
  constexpr int kThreads = 256;
  if ((n_elem + kThreads - 1) / kThreads > 2147483647)
    throw std::invalid_argument("the query batch is too large for one CUDA backward call; split the batch");
  const auto fold = &fold_patches<T>;
  PM_LAUNCH(fold, static_cast<unsigned>((n_elem + kThreads - 1) / kThreads), kThreads, 0, st)(D.G, A.B, R, S,
                                                                                             A.grad_query);
  check_launch("patch_softmax backward (fold)");
  const auto sum = &sum_coefficients<T>;
  PM_LAUNCH(sum, static_cast<unsigned>((A.B + kThreads - 1) / kThreads), kThreads, 0, st)(D.G, A.B, R, S, A.grad_a,
                                                                                         A.grad_inv_2b2);
  check_launch("patch_softmax backward (coefficients)");
}

}  // namespace
}  // namespace cuda

template <typename T>
void local_backward_cuda(const PatchSoftmaxArgs<T>& A, void* stream, int device) {
  using namespace cuda;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  const QueryGroups qg = queries_by_group(A.group_of_b, A.B, A.n_groups);
  // partial sums of a whole patch per slot: as many key ranges per row block as the scratch limit allows
  const Plan plan = plan_cuda(A, qg, static_cast<double>(scratch_bytes()) / ((patch_dim(A) + 2) * sizeof(double)));
  if (plan.items.size() > 2147483647u) throw std::invalid_argument("too many work items for one call; split the batch");
  const DeviceCall<T> D(A, qg, plan, element_codes(A), st, /*with_slots=*/true);
  switch (A.C) {
    case 1: launch_backward<T, 1>(A, D, plan, qg, st, device); break;
    case 2: launch_backward<T, 2>(A, D, plan, qg, st, device); break;
    case 3: launch_backward<T, 3>(A, D, plan, qg, st, device); break;
    default: launch_backward<T, 4>(A, D, plan, qg, st, device); break;
  }
}

template void local_backward_cuda<float>(const PatchSoftmaxArgs<float>&, void*, int);
template void local_backward_cuda<double>(const PatchSoftmaxArgs<double>&, void*, int);

}  // namespace patchmosaic
