// ideal_score.cu -- the CUDA kernels of the ideal score machine (IS, eq. 3-4), forward and backward; twins
// of cpu/ideal_score.cpp with the same contract.
//
// Forward, three passes over one (query image, training images of its group) row each:
//   1. logits: one warp per (row, training image), the distance sum (x - a phi)^2 computed directly
//      (not by expansion, which cancels badly over whole images at small t), differences in T, their
//      squares summed in double;
//   2. per row: the maximum logit, its first training image, and sum exp(logit - max) (one block);
//   3. per row and image element: sum_j w_j phi_j[e] / sum, accumulated in double.
// The logits buffer is (rows, images of the group): the IS keys are whole images, so this is the
// N-vector per query, not the [B, keys, H, W] tensor of the local machines.
//
// Backward (engines.hpp with K = V = phi): <g, out> per row; per (row, image) the same distance again,
// <g, phi> and <x - a phi, phi>, and p = w delta; per (row, element) G = sum_j p_j (a phi_j - x); per row
// the a and s sums. Every sum runs in a fixed order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cuda_check.cuh"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"

namespace patchmosaic {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // warps (training images) per block in pass 1
constexpr int kRed = 256;  // threads per row in pass 2
constexpr int kAcc = 256;  // image elements per block in pass 3
constexpr int kJ = 256;    // weights staged in shared memory per round of pass 3

struct Rows {
  const int64_t* grp_ptr;
  const int32_t* grp_img;
  const int32_t* group_of_b;
  int64_t stride;  // of the per-(row, image) buffers
};

template <typename T>
__global__ void is_logits(const T* __restrict__ train, const T* __restrict__ query, int64_t D, const double* a,
                          const double* s2, Rows R, double* __restrict__ logits) {
  const int64_t b = blockIdx.x;
  const int g = R.group_of_b[b];
  const int64_t n_img = R.grp_ptr[g + 1] - R.grp_ptr[g];
  const int lane = threadIdx.x % 32;
  const T* x = query + b * D;
  const T af = static_cast<T>(a[b]);
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32; j < n_img;
       j += static_cast<int64_t>(gridDim.y) * kWarps) {
    const T* phi = train + static_cast<int64_t>(R.grp_img[R.grp_ptr[g] + j]) * D;
    double part = 0.0;  // each lane sums D / 32 squares: in double, as the CPU's runs end in double
    for (int64_t e = lane; e < D; e += 32) {
      const T diff = x[e] - af * __ldg(phi + e);
      part = fma(static_cast<double>(diff), static_cast<double>(diff), part);
    }
    for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
    if (lane == 0) logits[b * R.stride + j] = -part * s2[b];
  }
}

__global__ void is_normalise(Rows R, const double* __restrict__ logits, double* __restrict__ row_max,
                             int64_t* __restrict__ row_arg, double* __restrict__ row_sum) {
  const int64_t b = blockIdx.x;
  const int g = R.group_of_b[b];
  const int64_t n = R.grp_ptr[g + 1] - R.grp_ptr[g];
  const double* l = logits + b * R.stride;
  __shared__ double sm[kRed];
  __shared__ int64_t sa[kRed];
  double mx = -INFINITY;
  int64_t arg = -1;
  for (int64_t j = threadIdx.x; j < n; j += kRed)
    if (l[j] > mx) {
      mx = l[j];
      arg = j;
    }
  sm[threadIdx.x] = mx;
  sa[threadIdx.x] = arg;
  __syncthreads();
  for (int w = kRed / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      const double mo = sm[threadIdx.x + w];
      const int64_t ao = sa[threadIdx.x + w];
      if (mo > sm[threadIdx.x] || (mo == sm[threadIdx.x] && ao >= 0 && ao < sa[threadIdx.x])) {
        sm[threadIdx.x] = mo;
        sa[threadIdx.x] = ao;
      }
    }
    __syncthreads();
  }
  const double M = sm[0];
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kRed) sum += exp(l[j] - M);
  __syncthreads();
  sm[threadIdx.x] = sum;
  __syncthreads();
  for (int w = kRed / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sm[threadIdx.x] += sm[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    row_max[b] = M;
    row_arg[b] = sa[0];
    row_sum[b] = sm[0];
  }
}

template <typename T>
__global__ void is_accumulate(const T* __restrict__ train, int64_t D, Rows R, const double* __restrict__ logits,
                              const double* row_max, const int64_t* row_arg, const double* row_sum, T* __restrict__ out,
                              double* __restrict__ stats, int64_t* __restrict__ arg_key, T* __restrict__ arg_share) {
  const int64_t b = blockIdx.x;
  const int g = R.group_of_b[b];
  const int64_t n = R.grp_ptr[g + 1] - R.grp_ptr[g];
  const double M = row_max[b];
  __shared__ double w[kJ];
  __shared__ int32_t img[kJ];
  for (int64_t e0 = static_cast<int64_t>(blockIdx.y) * kAcc; e0 < D; e0 += static_cast<int64_t>(gridDim.y) * kAcc) {
    const int64_t e = e0 + threadIdx.x;
    double acc = 0.0;
    for (int64_t j0 = 0; j0 < n; j0 += kJ) {
      __syncthreads();
      for (int u = threadIdx.x; u < kJ; u += kAcc) {
        const int64_t j = j0 + u;
        w[u] = j < n ? exp(logits[b * R.stride + j] - M) : 0.0;
        img[u] = j < n ? R.grp_img[R.grp_ptr[g] + j] : 0;
      }
      __syncthreads();
      if (e < D) {
        const int64_t m = n - j0 < kJ ? n - j0 : kJ;
        for (int64_t u = 0; u < m; ++u)
          if (w[u] != 0.0) acc += w[u] * static_cast<double>(__ldg(train + static_cast<int64_t>(img[u]) * D + e));
      }
    }
    if (e < D) out[b * D + e] = static_cast<T>(acc / row_sum[b]);
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    stats[2 * b] = M;
    stats[2 * b + 1] = row_sum[b];
    if (arg_key) {
      arg_key[b] = R.grp_img[R.grp_ptr[g] + row_arg[b]];
      arg_share[b] = static_cast<T>(1.0 / row_sum[b]);
    }
  }
}

// backward 1: <g, out> of each row
template <typename T>
__global__ void is_dot(const T* __restrict__ grad_out, const T* __restrict__ out, int64_t D, double* __restrict__ dot) {
  const int64_t b = blockIdx.x;
  __shared__ double sm[kRed];
  double v = 0.0;
  for (int64_t e = threadIdx.x; e < D; e += kRed)
    v += static_cast<double>(grad_out[b * D + e]) * static_cast<double>(out[b * D + e]);
  const double total = block_sum<kRed>(v, sm);
  if (threadIdx.x == 0) dot[b] = total;
}

// backward 2: per (row, image) p = w delta and its a and s terms
template <typename T>
__global__ void is_backward_keys(const T* __restrict__ train, const T* __restrict__ query, const T* __restrict__ grad_out,
                                 int64_t D, const double* a, const double* s2, const double* stats, const double* dot,
                                 Rows R, double* __restrict__ p, double* __restrict__ pa, double* __restrict__ ps) {
  const int64_t b = blockIdx.x;
  const int g = R.group_of_b[b];
  const int64_t n_img = R.grp_ptr[g + 1] - R.grp_ptr[g];
  const int lane = threadIdx.x % 32;
  const T* x = query + b * D;
  const T* gr = grad_out + b * D;
  const double ad = a[b];
  const T af = static_cast<T>(ad);
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32; j < n_img;
       j += static_cast<int64_t>(gridDim.y) * kWarps) {
    const T* phi = train + static_cast<int64_t>(R.grp_img[R.grp_ptr[g] + j]) * D;
    double dist = 0.0, gphi = 0.0, dphi = 0.0;
    for (int64_t e = lane; e < D; e += 32) {
      const T ph = __ldg(phi + e);
      const T diff = x[e] - af * ph;
      dist = fma(static_cast<double>(diff), static_cast<double>(diff), dist);
      gphi = fma(static_cast<double>(gr[e]), static_cast<double>(ph), gphi);
      dphi = fma(static_cast<double>(x[e]) - ad * static_cast<double>(ph), static_cast<double>(ph), dphi);
    }
    for (int off = 16; off > 0; off >>= 1) {
      dist += __shfl_xor_sync(0xffffffffu, dist, off);
      gphi += __shfl_xor_sync(0xffffffffu, gphi, off);
      dphi += __shfl_xor_sync(0xffffffffu, dphi, off);
    }
    if (lane == 0) {
      const double w = exp(-dist * s2[b] - stats[2 * b]) / stats[2 * b + 1];
      const double pj = w * (gphi - dot[b]);
      p[b * R.stride + j] = pj;
      pa[b * R.stride + j] = pj * 2.0 * s2[b] * dphi;
      ps[b * R.stride + j] = -pj * dist;
    }
  }
}

// backward 3: per (row, element) the query gradient 2 s sum_j p_j (a phi_j - x)
template <typename T>
__global__ void is_backward_accumulate(const T* __restrict__ train, const T* __restrict__ query, int64_t D,
                                       const double* a, const double* s2, Rows R, const double* __restrict__ p,
                                       T* __restrict__ grad_query) {
  const int64_t b = blockIdx.x;
  const int g = R.group_of_b[b];
  const int64_t n = R.grp_ptr[g + 1] - R.grp_ptr[g];
  const double ad = a[b];
  __shared__ double w[kJ];
  __shared__ int32_t img[kJ];
  for (int64_t e0 = static_cast<int64_t>(blockIdx.y) * kAcc; e0 < D; e0 += static_cast<int64_t>(gridDim.y) * kAcc) {
    const int64_t e = e0 + threadIdx.x;
    const double xe = e < D ? static_cast<double>(query[b * D + e]) : 0.0;
    double acc = 0.0;
    for (int64_t j0 = 0; j0 < n; j0 += kJ) {
      __syncthreads();
      for (int u = threadIdx.x; u < kJ; u += kAcc) {
        const int64_t j = j0 + u;
        w[u] = j < n ? p[b * R.stride + j] : 0.0;
        img[u] = j < n ? R.grp_img[R.grp_ptr[g] + j] : 0;
      }
      __syncthreads();
      if (e < D) {
        const int64_t m = n - j0 < kJ ? n - j0 : kJ;
        for (int64_t u = 0; u < m; ++u)
          if (w[u] != 0.0)
            acc += w[u] * fma(ad, static_cast<double>(__ldg(train + static_cast<int64_t>(img[u]) * D + e)), -xe);
      }
    }
    if (e < D) grad_query[b * D + e] = static_cast<T>(2.0 * s2[b] * acc);
  }
}

// backward 4: per row the a and s gradients
__global__ void is_backward_coefficients(Rows R, const double* __restrict__ pa, const double* __restrict__ ps,
                                         double* __restrict__ grad_a, double* __restrict__ grad_s) {
  const int64_t b = blockIdx.x;
  const int g = R.group_of_b[b];
  const int64_t n = R.grp_ptr[g + 1] - R.grp_ptr[g];
  __shared__ double sm[kRed];
  double va = 0.0, vs = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += kRed) {
    va += pa[b * R.stride + j];
    vs += ps[b * R.stride + j];
  }
  const double ta = block_sum<kRed>(va, sm);
  const double ts = block_sum<kRed>(vs, sm);
  if (threadIdx.x == 0) {
    grad_a[b] = ta;
    grad_s[b] = ts;
  }
}

// the index arrays of a call on the device
struct DeviceRows {
  DeviceBuffer<int64_t> gp;
  DeviceBuffer<int32_t> gi, gob;
  Rows R;
  int64_t widest;
  template <typename T>
  DeviceRows(const IdealScoreArgs<T>& A, cudaStream_t st)
      : gp(A.grp_img_ptr, A.n_groups + 1, st), gi(A.grp_img, A.grp_img_ptr[A.n_groups], st), gob(A.group_of_b, A.B, st) {
    widest = 0;
    for (int64_t b = 0; b < A.B; ++b) {
      const int32_t g = A.group_of_b[b];
      widest = std::max(widest, A.grp_img_ptr[g + 1] - A.grp_img_ptr[g]);
    }
    R = Rows{gp.get(), gi.get(), gob.get(), widest};
  }
};

}  // namespace
}  // namespace cuda

template <typename T>
void ideal_forward_cuda(const IdealScoreArgs<T>& A, void* stream, int device) {
  using namespace cuda;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  if (A.B > 2147483647) throw std::invalid_argument("too many query images for one call");
  DeviceRows rows(A, st);
  DeviceBuffer<double> logits(A.B * rows.widest, st), mx(A.B, st), sum(A.B, st);
  DeviceBuffer<int64_t> arg(A.B, st);
  const dim3 g1(static_cast<unsigned>(A.B), static_cast<unsigned>(std::min<int64_t>(65535, (rows.widest + kWarps - 1) / kWarps)));
  PM_LAUNCH(is_logits<T>, g1, kWarps * 32, 0, st)(A.train, A.query, A.D, A.a, A.inv_2b2, rows.R, logits.get());
  check_launch("ideal_score (logits)");
  PM_LAUNCH(is_normalise, static_cast<unsigned>(A.B), kRed, 0, st)(rows.R, logits.get(), mx.get(), arg.get(), sum.get());
  check_launch("ideal_score (normalise)");
  const dim3 g3(static_cast<unsigned>(A.B), static_cast<unsigned>(std::min<int64_t>(65535, (A.D + kAcc - 1) / kAcc)));
  PM_LAUNCH(is_accumulate<T>, g3, kAcc, 0, st)(A.train, A.D, rows.R, logits.get(), mx.get(), arg.get(), sum.get(), A.out,
                                               A.stats, A.arg_key, A.arg_share);
  check_launch("ideal_score (accumulate)");
}

template <typename T>
void ideal_backward_cuda(const IdealScoreArgs<T>& A, void* stream, int device) {
  using namespace cuda;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  if (A.B > 2147483647) throw std::invalid_argument("too many query images for one call");
  DeviceRows rows(A, st);
  DeviceBuffer<double> dot(A.B, st), p(A.B * rows.widest, st), pa(A.B * rows.widest, st), ps(A.B * rows.widest, st);
  PM_LAUNCH(is_dot<T>, static_cast<unsigned>(A.B), kRed, 0, st)(A.grad_out, A.out, A.D, dot.get());
  check_launch("ideal_score backward (dot)");
  const dim3 g1(static_cast<unsigned>(A.B), static_cast<unsigned>(std::min<int64_t>(65535, (rows.widest + kWarps - 1) / kWarps)));
  PM_LAUNCH(is_backward_keys<T>, g1, kWarps * 32, 0, st)(A.train, A.query, A.grad_out, A.D, A.a, A.inv_2b2, A.stats,
                                                         dot.get(), rows.R, p.get(), pa.get(), ps.get());
  check_launch("ideal_score backward (keys)");
  const dim3 g3(static_cast<unsigned>(A.B), static_cast<unsigned>(std::min<int64_t>(65535, (A.D + kAcc - 1) / kAcc)));
  PM_LAUNCH(is_backward_accumulate<T>, g3, kAcc, 0, st)(A.train, A.query, A.D, A.a, A.inv_2b2, rows.R, p.get(),
                                                        A.grad_query);
  check_launch("ideal_score backward (accumulate)");
  PM_LAUNCH(is_backward_coefficients, static_cast<unsigned>(A.B), kRed, 0, st)(rows.R, pa.get(), ps.get(), A.grad_a,
                                                                               A.grad_inv_2b2);
  check_launch("ideal_score backward (coefficients)");
}

template void ideal_forward_cuda<float>(const IdealScoreArgs<float>&, void*, int);
template void ideal_forward_cuda<double>(const IdealScoreArgs<double>&, void*, int);
template void ideal_backward_cuda<float>(const IdealScoreArgs<float>&, void*, int);
template void ideal_backward_cuda<double>(const IdealScoreArgs<double>&, void*, int);

}  // namespace patchmosaic
