// cuda_check.cuh -- CUDA errors as C++ exceptions, and stream-ordered device buffers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

// Kernel launches and dynamic shared memory go through these two macros so that the same sources also
// build for the CPU under the test suite's emulator (cpp/cuda/emulation/cuda_runtime.h, which defines
// its own). A template kernel is launched through a function pointer (commas in a macro argument).
#ifndef PM_LAUNCH
#define PM_LAUNCH(kernel, grid, dim, shared, stream) kernel<<<grid, dim, shared, stream>>>
#define PM_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace patchmosaic {

// The sum of v over a block of NT threads (a power of two), in a fixed tree order; every thread gets the total.
// sm: NT doubles of shared memory.
template <int NT>
__device__ double block_sum(double v, double* sm) {
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int w = NT / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) sm[threadIdx.x] += sm[threadIdx.x + w];
    __syncthreads();
  }
  const double total = sm[0];
  __syncthreads();
  return total;
}

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// Whether the current device has stream-ordered memory pools (not every virtualised GPU exposes them).
inline bool pools_supported() {
  int dev = 0, yes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&yes, cudaDevAttrMemoryPoolsSupported, dev) != cudaSuccess) return false;
  return yes != 0;
}

// A device allocation for work on one stream: cudaMallocAsync / cudaFreeAsync where memory pools exist
// (freed in stream order, so a kernel enqueued before the destructor runs still sees valid memory),
// else cudaMalloc / cudaFree (cudaFree waits for the device, so the same holds).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer(int64_t n, cudaStream_t st) : n_(n), st_(st), pooled_(pools_supported()) {
    if (n_ <= 0) return;
    if (pooled_)
      check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&p_), sizeof(T) * n_, st_), "cudaMallocAsync");
    else
      check_cuda(cudaMalloc(reinterpret_cast<void**>(&p_), sizeof(T) * n_), "cudaMalloc");
  }
  // a copy of n host values
  DeviceBuffer(const T* host, int64_t n, cudaStream_t st) : DeviceBuffer(n, st) {
    if (n_ > 0) check_cuda(cudaMemcpyAsync(p_, host, sizeof(T) * n_, cudaMemcpyHostToDevice, st_), "cudaMemcpyAsync");
  }
  DeviceBuffer(const std::vector<T>& host, cudaStream_t st) : DeviceBuffer(host.data(), static_cast<int64_t>(host.size()), st) {}
  ~DeviceBuffer() {
    if (!p_) return;
    if (pooled_)
      cudaFreeAsync(p_, st_);
    else
      cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }

 private:
  T* p_ = nullptr;
  int64_t n_;
  cudaStream_t st_;
  bool pooled_;
};

}  // namespace patchmosaic
