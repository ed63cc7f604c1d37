// patch_softmax.cu -- the CUDA kernel of every local machine (LS, ELS, boundary-aware ELS), forward pass;
// the twin of cpu/patch_softmax.cpp with the same contract (contract.hpp, engines.hpp).
//
// Work is split into items, as on the CPU (plan.hpp): (image group g, query-pixel class c, block of BM
// query rows, range of keys). One thread block runs one item: it streams its keys in tiles of BN, gathering
// each tile's key patches straight from the training images into shared memory in chunks of BK patch
// elements (patches never exist in global memory), multiplies them against the item's query patches
// (gathered once per item into dynamic shared memory when all BM of them fit there, else chunk by
// chunk with the keys) with a register-tiled 4x4-per-thread float product, turns the dot products
// into logits and folds them into per-thread online softmax states (each thread: 4 rows x its 4 keys
// of every tile). The 16 partial states of a row are merged by warp shuffles at the end of the item;
// items over different key ranges of the same rows write partial states (max, sum, weighted centres,
// arg-max) that a second kernel merges in a fixed order, so results do not depend on scheduling.
//
// Numerics: distances in the working type T (float32 by default: no tf32, no bf16), logits
// c1 * <q, p> - c2 * |p|^2 exactly as on the CPU, sums and weighted centres accumulated in double.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "local_tile.cuh"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"

namespace patchmosaic {
namespace cuda {
namespace {

struct Partials {
  double* m;
  double* s;
  double* acc;   // (slots, C)
  int64_t* best; // key index within the (group, class) key list
};

// QRES: the item's query patches stay in dynamic shared memory, (ceil(d / BK) * BK, BM) elements,
// gathered once; otherwise each chunk of them is gathered again for every key tile.
template <typename T, int CC, bool QRES>
__global__ void __launch_bounds__(NT) local_items(Geometry<T> G, const Item* __restrict__ items, Partials P) {
  const Item it = items[blockIdx.x];
  const int tid = threadIdx.x;
  const int64_t e0 = class_elem0(G, it.c);  // this class's part of the element table
  const int d = class_dim(G, it.c), half = G.k / 2;
  const int64_t HW = static_cast<int64_t>(G.H) * G.W, HWq = static_cast<int64_t>(G.Hq) * G.Wq;
  const int64_t q0 = G.cls_qpix_ptr[it.c], npix = G.cls_qpix_ptr[it.c + 1] - q0;
  const int64_t p0 = G.cls_kpos_ptr[it.c], npos = G.cls_kpos_ptr[it.c + 1] - p0;
  const int64_t i0 = G.grp_img_ptr[it.g], b0 = G.grp_b_ptr[it.g];
  const int rows = static_cast<int>(it.row1 - it.row0);

  __shared__ T Qs[QRES ? 1 : BK][BM];
  PM_DYNAMIC_SHARED(resident);
  T* const Qall = reinterpret_cast<T*>(resident);
  __shared__ T Ks[BK][BN];
  __shared__ T V[CC][BN];
  __shared__ T kn[BN];
  __shared__ double knd[BN];  // key norms accumulated in double, rounded once (as on the CPU)
  __shared__ T c1[BM], c2[BM];
  __shared__ const T* qimg[BM];
  __shared__ const T* kimg[BN];
  __shared__ int qi[BM], qj[BM], ki[BN], kj[BN];

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
    } else {
      qimg[tid] = nullptr;
      qi[tid] = qj[tid] = 0;
      c1[tid] = c2[tid] = T(0);
    }
  }
  if constexpr (QRES) {
    __syncthreads();  // query descriptors written; the key loop syncs again before Qall is read
    const int dpad = (d + BK - 1) / BK * BK;
    for (int e = tid; e < dpad * BM; e += NT) {
      const int dd = e / BM, r = e % BM;
      Qall[e] = (qimg[r] != nullptr && dd < d)
                    ? call_elem(G, qimg[r], G.Hq, G.Wq, qi[r], qj[r], e0 + dd, half, G.query_pad)
                    : T(0);
    }
  }

  // thread (ty, tx) computes the products of rows 4 ty .. 4 ty + 3 with keys 4 tx .. 4 tx + 3 of every
  // tile, and keeps an online softmax state per row over those keys
  const int ty = tid / 16, tx = tid % 16;
  double m[4], s[4], acc[4][CC];
  int64_t best[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    m[u] = -INFINITY;
    s[u] = 0.0;
    best[u] = -1;
    for (int ch = 0; ch < CC; ++ch) acc[u][ch] = 0.0;
  }

  for (int64_t kt = it.k0; kt < it.k1; kt += BN) {
    const int nk = static_cast<int>(it.k1 - kt < BN ? it.k1 - kt : BN);
    __syncthreads();  // the previous tile's L, V and key descriptors are no longer read
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
    T prod[4][4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 4; ++v) prod[u][v] = T(0);

    for (int d0 = 0; d0 < d; d0 += BK) {
      __syncthreads();  // descriptors written / previous chunk consumed
      if constexpr (!QRES) {
        for (int e = tid; e < BK * BM; e += NT) {
          const int dd = e / BM, r = e % BM;
          Qs[dd][r] = (qimg[r] != nullptr && d0 + dd < d)
                          ? call_elem(G, qimg[r], G.Hq, G.Wq, qi[r], qj[r], e0 + d0 + dd, half, G.query_pad)
                          : T(0);
        }
      }
      for (int e = tid; e < BK * BN; e += NT) {
        const int dd = e / BN, col = e % BN;
        Ks[dd][col] = (kimg[col] != nullptr && d0 + dd < d)
                          ? call_elem(G, kimg[col], G.H, G.W, ki[col], kj[col], e0 + d0 + dd, half, G.key_pad)
                          : T(0);
      }
      __syncthreads();
      // element dd of the chunk into the 4x4 products
      auto product = [&](int dd) {
        T qa[4], kb[4];
        if constexpr (QRES) {
#pragma unroll
          for (int u = 0; u < 4; ++u) qa[u] = Qall[(d0 + dd) * BM + ty * 4 + u];
        } else {
#pragma unroll
          for (int u = 0; u < 4; ++u) qa[u] = Qs[dd][ty * 4 + u];
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) kb[v] = Ks[dd][tx * 4 + v];
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) prod[u][v] = fma(qa[u], kb[v], prod[u][v]);
      };
      // the last chunk of a patch stops at its d - d0 elements (the rest are zero padding: k = 7 has 49
      // of 64, k = 3 9 of 16); the products are the same, in the same order, as with the padding
      const int nd = d - d0 < BK ? d - d0 : BK;
      if (nd == BK) {
#pragma unroll
        for (int dd = 0; dd < BK; ++dd) product(dd);
      } else {
        for (int dd = 0; dd < nd; ++dd) product(dd);
      }
      if (tid < BN) {
        double sq = knd[tid];
        for (int dd = 0; dd < nd; ++dd) sq = fma(static_cast<double>(Ks[dd][tid]), static_cast<double>(Ks[dd][tid]), sq);
        knd[tid] = sq;
      }
    }
    if (tid < BN) kn[tid] = static_cast<T>(knd[tid]);
    __syncthreads();  // key norms complete
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int r = ty * 4 + u;
      if (r >= rows) continue;
      T lv[4];
      T lm = static_cast<T>(-INFINITY);
      int la = -1;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int col = tx * 4 + v;
        lv[v] = col < nk ? c1[r] * prod[u][v] - c2[r] * kn[col] : static_cast<T>(-INFINITY);
        if (lv[v] > lm) {
          lm = lv[v];
          la = v;
        }
      }
      if (la < 0) continue;
      if (static_cast<double>(lm) > m[u]) {
        best[u] = kt + tx * 4 + la;
        const double f = raise_max(m[u], s[u], static_cast<double>(lm));
        for (int ch = 0; ch < CC; ++ch) acc[u][ch] *= f;
      }
      const T mt = static_cast<T>(m[u]);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int col = tx * 4 + v;
        if (col >= nk) break;
        const double w = clamped_exp<T>(lv[v] - mt);
        s[u] += w;
        for (int ch = 0; ch < CC; ++ch) acc[u][ch] += w * static_cast<double>(V[ch][col]);
      }
    }
  }

  // merge the 16 threads (tx) that share each row: lanes of one half-warp; ties go to the earlier key
#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) {
      const double mo = __shfl_xor_sync(0xffffffffu, m[u], off);
      const double so = __shfl_xor_sync(0xffffffffu, s[u], off);
      const long long bo = __shfl_xor_sync(0xffffffffu, static_cast<long long>(best[u]), off);
      double ao[CC];
      for (int ch = 0; ch < CC; ++ch) ao[ch] = __shfl_xor_sync(0xffffffffu, acc[u][ch], off);
      const MergeFactors f = merge_state(m[u], s[u], best[u], mo, so, static_cast<int64_t>(bo), true);
      for (int ch = 0; ch < CC; ++ch) acc[u][ch] = acc[u][ch] * f.self + ao[ch] * f.other;
    }
    const int r = ty * 4 + u;
    if (tx == 0 && r < rows) {
      const int64_t slot = it.slot + r;
      P.m[slot] = m[u];
      P.s[slot] = s[u];
      for (int ch = 0; ch < CC; ++ch) P.acc[slot * CC + ch] = acc[u][ch];
      P.best[slot] = best[u];
    }
  }
}

// One thread per row: merge the row's partial states over its key splits, in split order.
template <typename T, int CC>
__global__ void merge_rows(Geometry<T> G, const RowBlock* __restrict__ blocks, Partials P, T* __restrict__ out,
                           double* __restrict__ stats, int64_t* __restrict__ arg_key, T* __restrict__ arg_share) {
  const RowBlock rb = blocks[blockIdx.x];
  const int r = threadIdx.x;
  const int rows = static_cast<int>(rb.row1 - rb.row0);
  if (r >= rows) return;
  double m = -INFINITY, s = 0.0, acc[CC];
  for (int ch = 0; ch < CC; ++ch) acc[ch] = 0.0;
  int64_t best = -1;
  for (int sp = 0; sp < rb.n_split; ++sp) {
    const int64_t slot = rb.slot + static_cast<int64_t>(sp) * rows + r;
    const MergeFactors f = merge_state(m, s, best, P.m[slot], P.s[slot], P.best[slot]);
    for (int ch = 0; ch < CC; ++ch) acc[ch] = acc[ch] * f.self + P.acc[slot * CC + ch] * f.other;
  }
  const int64_t HW = static_cast<int64_t>(G.H) * G.W, HWq = static_cast<int64_t>(G.Hq) * G.Wq;
  const int64_t q0 = G.cls_qpix_ptr[rb.c];
  const int64_t npix = G.cls_qpix_ptr[rb.c + 1] - q0;
  const int64_t p0 = G.cls_kpos_ptr[rb.c], npos = G.cls_kpos_ptr[rb.c + 1] - p0;
  const int64_t row = rb.row0 + r;
  const int64_t b = G.grp_b[G.grp_b_ptr[rb.g] + row / npix];
  const int64_t pix = G.cls_qpix[q0 + row % npix];
  for (int ch = 0; ch < CC; ++ch) out[(b * G.C + ch) * HWq + pix] = static_cast<T>(s > 0 ? acc[ch] / s : 0.0);
  stats[2 * (b * HWq + pix)] = m;
  stats[2 * (b * HWq + pix) + 1] = s;
  if (arg_key) {
    arg_key[b * HWq + pix] = best < 0 ? -1
                                      : static_cast<int64_t>(G.grp_img[G.grp_img_ptr[rb.g] + best / npos]) * HW +
                                            G.cls_kpos[p0 + best % npos];
    arg_share[b * HWq + pix] = static_cast<T>(s > 0 ? 1.0 / s : 0.0);
  }
}

// Bytes of dynamic shared memory for resident query patches, or 0 to gather them chunk by chunk.
// Resident only up to PATCHMOSAIC_CUDA_QUERY_SMEM_KB per block (default 48: shared memory taken from
// a multiprocessor is L1 cache lost to the key gathers, which reuse overlapping patches; 0 turns it
// off), and only where the device allows it with two blocks per multiprocessor.
template <typename T, int CC>
size_t resident_bytes(int d, int device) {
  const size_t bytes = static_cast<size_t>((d + BK - 1) / BK * BK) * BM * sizeof(T);
  size_t cap = 48 * 1024;
  if (const char* env = std::getenv("PATCHMOSAIC_CUDA_QUERY_SMEM_KB")) cap = static_cast<size_t>(std::atol(env)) * 1024;
  if (bytes > cap) return 0;
  int optin = 0, per_sm = 0, reserved = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device), "cudaDeviceGetAttribute");
  cudaFuncAttributes fa{};
  check_cuda(cudaFuncGetAttributes(&fa, local_items<T, CC, true>), "cudaFuncGetAttributes");
  if (bytes + fa.sharedSizeBytes > static_cast<size_t>(optin) ||
      2 * (bytes + fa.sharedSizeBytes + reserved) > static_cast<size_t>(per_sm))
    return 0;
  // static + dynamic above 48 KB needs the opt-in; raised to the same value on every call (no race)
  if (bytes + fa.sharedSizeBytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(local_items<T, CC, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    optin - static_cast<int>(fa.sharedSizeBytes)),
               "cudaFuncSetAttribute");
  return bytes;
}

template <typename T, int CC>
void launch(const PatchSoftmaxArgs<T>& A, const DeviceCall<T>& D, cudaStream_t st, int device) {
  DeviceBuffer<double> m(D.slots, st), s(D.slots, st), acc(D.slots * CC, st);
  DeviceBuffer<int64_t> best(D.slots, st);
  Partials P{m.get(), s.get(), acc.get(), best.get()};
  const auto n_items = static_cast<unsigned>(D.n_items);
  if (const size_t bytes = resident_bytes<T, CC>(patch_dim(A), device); bytes > 0) {
    const auto kernel = &local_items<T, CC, true>;
    PM_LAUNCH(kernel, n_items, NT, bytes, st)(D.G, D.items.get(), P);
  } else {
    const auto kernel = &local_items<T, CC, false>;
    PM_LAUNCH(kernel, n_items, NT, 0, st)(D.G, D.items.get(), P);
  }
  check_launch("patch_softmax (items)");
  const auto merge = &merge_rows<T, CC>;
  PM_LAUNCH(merge, static_cast<unsigned>(D.n_blocks), BM, 0, st)(D.G, D.blocks.get(), P, A.out, A.stats, A.arg_key,
                                                                 A.arg_share);
  check_launch("patch_softmax (merge)");
}

}  // namespace
}  // namespace cuda

template <typename T>
void local_forward_cuda(const PatchSoftmaxArgs<T>& A, void* stream, int device) {
  using namespace cuda;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  const QueryGroups qg = queries_by_group(A.group_of_b, A.B, A.n_groups);
  const Plan plan = plan_cuda(A, qg);
  if (plan.items.empty()) return;
  if (plan.items.size() > 2147483647u || plan.blocks.size() > 2147483647u)
    throw std::invalid_argument("too many work items for one call; split the batch");
  const DeviceCall<T> D(A, qg, plan, element_codes(A), st);
  switch (A.C) {
    case 1: launch<T, 1>(A, D, st, device); break;
    case 2: launch<T, 2>(A, D, st, device); break;
    case 3: launch<T, 3>(A, D, st, device); break;
    default: launch<T, 4>(A, D, st, device); break;
  }
}

template void local_forward_cuda<float>(const PatchSoftmaxArgs<float>&, void*, int);
template void local_forward_cuda<double>(const PatchSoftmaxArgs<double>&, void*, int);

}  // namespace patchmosaic
