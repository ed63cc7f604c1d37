// cuda_runtime.h (emulation) -- just enough of CUDA to run the kernels of cpp/cuda on the CPU, for the
// test suite on machines without a GPU (tests/cuda_emulation.py builds them with this directory first on
// the include path). Not part of the package.
//
// A launch runs its blocks one after another; the threads of a block are fibers (ucontext) on the
// calling thread, switched only at __syncthreads and at warp shuffles (in ascending, then descending
// order of thread index, alternately), so a block's `__shared__` arrays (function-level statics here)
// are shared exactly as on a GPU. A barrier that not every thread
// reaches (divergent __syncthreads) is reported as an error instead of hanging. "Device memory" is host
// memory; fresh dynamic shared memory and cudaMalloc'd buffers are filled with 0xFF bytes (NaN for
// floats), so a kernel that reads what it never wrote shows up in the results. A launch asking for more
// dynamic shared memory than the kernel may take (48 KB with its static arrays, unless raised by
// cudaFuncSetAttribute) fails, as on a GPU.
//
// What this cannot show: speed, the GPU memory model, warp-synchronous code without shuffles, races
// between blocks (they never run at once), and reads past the end of a buffer that stay inside host memory.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <math.h>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaDeviceAttr {
  cudaDevAttrMemoryPoolsSupported,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrReservedSharedMemoryPerBlock,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
};

namespace pm_emu {

// ----------------------------------------------------------------------------------------------- fibers
struct Barrier {
  unsigned expected = 0, arrived = 0;
  uint64_t gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  unsigned tid = 0;
  bool done = false;
  const Barrier* waiting = nullptr;  // the barrier it waits at, or null when runnable
  uint64_t wait_gen = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;  // one 8-byte slot per thread, for shuffles
  std::vector<unsigned char> dynamic_shared;
  dim3 grid, dim;
  uint3 block_idx;
  std::string error;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}

inline void wait_at(Barrier& bar) {
  Block& B = *block();
  Fiber& f = *B.current;
  if (++bar.arrived == bar.expected) {  // the last one releases the others and goes on
    bar.arrived = 0;
    ++bar.gen;
    return;
  }
  f.waiting = &bar;
  f.wait_gen = bar.gen;
  swapcontext(&f.ctx, &B.scheduler);
}

inline bool runnable(const Fiber& f) {
  return !f.done && (f.waiting == nullptr || f.waiting->gen != f.wait_gen);
}

template <typename F>
struct Entry {
  static void run(unsigned lo, unsigned hi) {
    const auto* fn = reinterpret_cast<const F*>((static_cast<uintptr_t>(hi) << 32) | lo);
    (*fn)();
    Block& B = *block();
    B.current->done = true;
    swapcontext(&B.current->ctx, &B.scheduler);
  }
};

// Run one block: every thread calls body(), switching only at barriers, until all have returned. The
// threads run in ascending order on one pass and descending on the next (`flip` picks the first), so a
// read of shared memory that a missing barrier leaves unordered sees stale data in one of the two.
template <typename F>
void run_block(Block& B, const F& body, bool flip) {
  const unsigned n = B.dim.x * B.dim.y * B.dim.z;
  constexpr size_t kStack = 128 * 1024;
  static std::vector<std::unique_ptr<char[]>> stacks;  // kept for later launches (no fresh pages each time)
  while (stacks.size() < n) stacks.emplace_back(new char[kStack]);
  B.fibers.resize(n);
  B.block_barrier = {n, 0, 0};
  B.warp_barriers.assign((n + 31) / 32, Barrier{});
  for (unsigned w = 0; w < B.warp_barriers.size(); ++w) B.warp_barriers[w].expected = std::min(32u, n - 32 * w);
  B.exchange.assign(n, 0);
  const auto addr = reinterpret_cast<uintptr_t>(&body);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = B.fibers[t];
    f.stack = stacks[t].get();
    f.tid = t;
    f.done = false;
    f.waiting = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&Entry<F>::run), 2, static_cast<unsigned>(addr & 0xffffffffu),
                static_cast<unsigned>(addr >> 32));
  }
  for (bool down = flip;; down = !down) {
    bool progress = false, all_done = true;
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = B.fibers[down ? n - 1 - i : i];
      if (f.done) continue;
      all_done = false;
      if (!runnable(f)) continue;
      f.waiting = nullptr;
      B.current = &f;
      swapcontext(&B.scheduler, &f.ctx);
      progress = true;
    }
    if (all_done) return;
    if (!progress) {
      B.error = "emulated kernel: a barrier that not every thread of the block reaches (divergent __syncthreads or shuffle)";
      return;
    }
  }
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline std::string& last_message() {
  static std::string m;
  return m;
}

inline void fill_garbage(void* p, size_t bytes) { std::memset(p, 0xFF, bytes); }

// Shared memory limits as on an H100 / H200: every kernel reports kStatic bytes of static shared
// memory, may take 48 KB - kStatic of dynamic shared memory unless cudaFuncSetAttribute raised it.
constexpr int kStatic = 16 * 1024, kOptin = 232448;
inline std::map<const void*, int>& dynamic_limit() {
  static std::map<const void*, int> m;
  return m;
}

// kernel<<<grid, dim, shared, stream>>>(args...), blocks in order
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 dim, size_t shared, A&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || dim.x * dim.y * dim.z == 0 ||
      dim.x * dim.y * dim.z > 1024 || dim.z > 64) {
    last_error() = cudaErrorInvalidValue;
    last_message() = "invalid configuration argument (grid or block dimensions out of a GPU's range)";
    return;
  }
  const auto it = dynamic_limit().find(reinterpret_cast<const void*>(kernel));
  if (shared > static_cast<size_t>(it == dynamic_limit().end() ? 48 * 1024 - kStatic : it->second)) {
    last_error() = cudaErrorInvalidValue;
    last_message() = "too many resources requested for launch (dynamic shared memory above the kernel's limit)";
    return;
  }
  Block B;
  B.grid = grid;
  B.dim = dim;
  B.dynamic_shared.resize(shared + 16);
  block() = &B;
  const std::tuple<std::decay_t<A>...> tup(std::forward<A>(args)...);
  auto body = [&] { std::apply([&](const auto&... a) { kernel(a...); }, tup); };
  bool flip = false;
  for (unsigned z = 0; z < grid.z && B.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && B.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && B.error.empty(); ++x) {
        B.block_idx = {x, y, z};
        fill_garbage(B.dynamic_shared.data(), B.dynamic_shared.size());
        run_block(B, body, flip = !flip);
      }
  block() = nullptr;
  if (!B.error.empty()) {
    last_error() = cudaErrorLaunchFailure;
    last_message() = B.error;
  }
}

inline uint3 thread_idx() {
  const Block& B = *block();
  const unsigned t = B.current->tid;
  return {t % B.dim.x, (t / B.dim.x) % B.dim.y, t / (B.dim.x * B.dim.y)};
}

}  // namespace pm_emu

#define threadIdx (::pm_emu::thread_idx())
#define blockIdx (::pm_emu::block()->block_idx)
#define blockDim (::pm_emu::block()->dim)
#define gridDim (::pm_emu::block()->grid)
#define PM_DYNAMIC_SHARED(name) unsigned char* const name = ::pm_emu::block()->dynamic_shared.data()
#define PM_LAUNCH(kernel, grid, dim, shared, stream) ::pm_emu::Launch((kernel), (grid), (dim), (shared))

namespace pm_emu {
template <typename K>
struct Launch {
  K kernel;
  dim3 grid, dim;
  size_t shared;
  Launch(K k, dim3 g, dim3 d, size_t s) : kernel(k), grid(g), dim(d), shared(s) {}
  template <typename... A>
  void operator()(A&&... args) const {
    launch(kernel, grid, dim, shared, std::forward<A>(args)...);
  }
};
}  // namespace pm_emu

inline void __syncthreads() { ::pm_emu::wait_at(::pm_emu::block()->block_barrier); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  auto& B = *::pm_emu::block();
  const unsigned t = B.current->tid, w = t / 32;
  uint64_t slot = 0;
  std::memcpy(&slot, &v, sizeof(T));
  B.exchange[t] = slot;
  ::pm_emu::wait_at(B.warp_barriers[w]);
  const unsigned src = (t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask));
  T out;
  std::memcpy(&out, &B.exchange[src], sizeof(T));
  ::pm_emu::wait_at(B.warp_barriers[w]);  // every lane has read before the slots are written again
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ------------------------------------------------------------------------------------------ runtime API
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : (::pm_emu::last_message().empty() ? "emulated error" : ::pm_emu::last_message().c_str());
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::pm_emu::last_error();
  ::pm_emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
// an H100 / H200's limits, so that the same launch decisions are taken as there
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMemoryPoolsSupported: *v = 1; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 232448; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 233472; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *v = 1024; break;
  }
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorInvalidValue;
  ::pm_emu::fill_garbage(*p, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->sharedSizeBytes = ::pm_emu::kStatic;  // about what ptxas reports for the local kernels
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute, int value) {
  if (value < 0 || value + ::pm_emu::kStatic > ::pm_emu::kOptin) return cudaErrorInvalidValue;
  ::pm_emu::dynamic_limit()[reinterpret_cast<const void*>(f)] = value;
  return cudaSuccess;
}
