// ideal_score.cu -- the CUDA kernel of the ideal score machine (IS, eq. 3-4); twin of
// cpu/ideal_score.cpp with the same contract.
//
// Three passes over one (query image, training images of its group) row each:
//   1. logits: one warp per (row, training image), the distance sum (x - a phi)^2 computed directly
//      (not by expansion, which cancels badly over whole images at small t), differences in T, their
//      squares summed in double;
//   2. per row: the maximum logit, its first training image, and sum exp(logit - max) (one block);
//   3. per row and image element: sum_j w_j phi_j[e] / sum, accumulated in double.
// The logits buffer is (rows, images of the group): the IS keys are whole images, so this is the
// N-vector per query, not the [B, keys, H, W] tensor of the local machines.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../patch_softmax.hpp"
#include "cuda_check.cuh"

namespace patchmosaic {
namespace {

constexpr int kWarps = 8;  // warps (training images) per block in pass 1
constexpr int kRed = 256;  // threads per row in pass 2
constexpr int kAcc = 256;  // image elements per block in pass 3
constexpr int kJ = 256;    // weights staged in shared memory per round of pass 3

template <typename T>
__global__ void is_logits(const T* __restrict__ train, const T* __restrict__ query, int64_t D, const double* a,
                          const double* s2, const int64_t* grp_ptr, const int32_t* grp_img, const int32_t* group_of_b,
                          int64_t stride, double* __restrict__ logits) {
  const int64_t b = blockIdx.x;
  const int g = group_of_b[b];
  const int64_t n_img = grp_ptr[g + 1] - grp_ptr[g];
  const int lane = threadIdx.x % 32;
  const T* x = query + b * D;
  const T af = static_cast<T>(a[b]);
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32; j < n_img;
       j += static_cast<int64_t>(gridDim.y) * kWarps) {
    const T* phi = train + static_cast<int64_t>(grp_img[grp_ptr[g] + j]) * D;
    double part = 0.0;  // each lane sums D / 32 squares: in double, as the CPU's runs end in double
    for (int64_t e = lane; e < D; e += 32) {
      const T diff = x[e] - af * __ldg(phi + e);
      part = fma(static_cast<double>(diff), static_cast<double>(diff), part);
    }
    for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
    if (lane == 0) logits[b * stride + j] = -part * s2[b];
  }
}

__global__ void is_normalise(const int64_t* grp_ptr, const int32_t* group_of_b, int64_t stride,
                             const double* __restrict__ logits, double* __restrict__ row_max, int64_t* __restrict__ row_arg,
                             double* __restrict__ row_sum) {
  const int64_t b = blockIdx.x;
  const int g = group_of_b[b];
  const int64_t n = grp_ptr[g + 1] - grp_ptr[g];
  const double* l = logits + b * stride;
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
__global__ void is_accumulate(const T* __restrict__ train, int64_t D, const int64_t* grp_ptr, const int32_t* grp_img,
                              const int32_t* group_of_b, int64_t stride, const double* __restrict__ logits,
                              const double* row_max, const int64_t* row_arg, const double* row_sum, T* __restrict__ out,
                              int64_t* __restrict__ arg_key, T* __restrict__ arg_share) {
  const int64_t b = blockIdx.x;
  const int g = group_of_b[b];
  const int64_t n = grp_ptr[g + 1] - grp_ptr[g];
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
        w[u] = j < n ? exp(logits[b * stride + j] - M) : 0.0;
        img[u] = j < n ? grp_img[grp_ptr[g] + j] : 0;
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
  if (arg_key && blockIdx.y == 0 && threadIdx.x == 0) {
    arg_key[b] = grp_img[grp_ptr[g] + row_arg[b]];
    arg_share[b] = static_cast<T>(1.0 / row_sum[b]);
  }
}

}  // namespace

template <typename T>
void ideal_score_cuda(const IdealScoreArgs<T>& A, void* stream, int device) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  int64_t widest = 0;
  for (int64_t b = 0; b < A.B; ++b) {
    const int32_t g = A.group_of_b[b];
    if (g < 0 || g >= A.n_groups) throw std::invalid_argument("group_of_b out of range");
    const int64_t n = A.grp_img_ptr[g + 1] - A.grp_img_ptr[g];
    if (n == 0) throw std::invalid_argument("an image group has no training images");
    widest = std::max(widest, n);
  }
  if (A.B == 0 || A.D == 0) return;
  if (A.B > 2147483647) throw std::invalid_argument("too many query images for one call");
  DeviceBuffer<double> a(A.a, A.B, st), s2(A.inv_2b2, A.B, st);
  DeviceBuffer<int64_t> gp(A.grp_img_ptr, A.n_groups + 1, st);
  DeviceBuffer<int32_t> gi(A.grp_img, A.grp_img_ptr[A.n_groups], st), gob(A.group_of_b, A.B, st);
  DeviceBuffer<double> logits(A.B * widest, st), mx(A.B, st), sum(A.B, st);
  DeviceBuffer<int64_t> arg(A.B, st);
  const dim3 g1(static_cast<unsigned>(A.B), static_cast<unsigned>(std::min<int64_t>(65535, (widest + kWarps - 1) / kWarps)));
  PM_LAUNCH(is_logits<T>, g1, kWarps * 32, 0, st)(A.train, A.query, A.D, a.get(), s2.get(), gp.get(), gi.get(), gob.get(),
                                           widest, logits.get());
  check_launch("ideal_score (logits)");
  PM_LAUNCH(is_normalise, static_cast<unsigned>(A.B), kRed, 0, st)(gp.get(), gob.get(), widest, logits.get(), mx.get(),
                                                            arg.get(), sum.get());
  check_launch("ideal_score (normalise)");
  const dim3 g3(static_cast<unsigned>(A.B), static_cast<unsigned>(std::min<int64_t>(65535, (A.D + kAcc - 1) / kAcc)));
  PM_LAUNCH(is_accumulate<T>, g3, kAcc, 0, st)(A.train, A.D, gp.get(), gi.get(), gob.get(), widest, logits.get(), mx.get(),
                                        arg.get(), sum.get(), A.out, A.arg_key, A.arg_share);
  check_launch("ideal_score (accumulate)");
}

template void ideal_score_cuda<float>(const IdealScoreArgs<float>&, void*, int);
template void ideal_score_cuda<double>(const IdealScoreArgs<double>&, void*, int);

}  // namespace patchmosaic
