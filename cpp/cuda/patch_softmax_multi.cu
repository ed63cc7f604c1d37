// patch_softmax_multi.cu -- the CUDA kernel of the local machines at several patch sizes in one pass (forward
// only, no provenance, no statistics): the twin of cpu/patch_softmax_multi.cpp, with the same contract
// (contract.hpp, PM_LOCAL_MULTI_FIELDS; validate.hpp).
//
// The squared distance of two patches at size ks[j] is the one at ks[j-1] plus the sum over the ring of elements
// between the two sizes (the smaller patch is the centre of the larger one, under zero padding and circular wrap
// alike). So each key's patch elements are visited in "ring order" (those of the patch of size ks[0], then the
// ring that grows it to ks[1], ...), and after ring j the distance so far is the distance at size ks[j]: it
// becomes that size's logit, folded into that size's own online softmax state. A key visits rings only up to
// the largest size it serves (bit j of cls_kmask: the key position is in its class's key set at size ks[j]),
// and folds only into the sizes it serves, so each size sees exactly its own key set (the padding signatures
// of boundary-aware ELS, the fully-inside patches of periodic ELS).
//
// Work is split as for the single-size kernel (plan.hpp, plan_cuda): items of up to BM query rows of one
// (image group, class) pair against a range of its keys. A simple design: one thread block of BM threads per
// item, one thread per query row, every thread walking the item's keys in the same order (the keys' indices,
// masks and elements are the same for all threads of a block: uniform loads, no divergence but at the
// padding of the query patches), its query patch gathered once into shared memory where it fits. Items write partial states per row and size; a second kernel merges the
// key ranges of each row in a fixed order, so results do not depend on scheduling.
//
// Numerics: the distance |P_p(x) - a K|^2 is summed from the differences themselves in double (float32 inputs
// get double-precision logits, as the CPU engine's LS pass), logits l = -dist / (2 b^2); weights below the
// working type's exponent cut (softmax_state.hpp, ExpCut) are exactly 0; sums and weighted centres in double.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "local_tile.cuh"
#include "patchmosaic/engines.hpp"
#include "patchmosaic/softmax_state.hpp"
#include "patchmosaic/validate.hpp"  // kMaxMultiK

namespace patchmosaic {
namespace cuda {
namespace {

// The sizes of a call: end[j] = C ks[j]^2, where size j's prefix of the ring order ends.
struct Sizes {
  int n;
  int end[kMaxMultiK];
};

struct MultiPartials {
  double* m;    // (slots, n_ks)
  double* s;    // (slots, n_ks)
  double* acc;  // (slots, n_ks, C)
};

// Element codes (patch_geometry.hpp) of the patch of size ks[n_ks - 1] in ring order: first the elements of the
// patch of size ks[0], then the ring to ks[1], and so on; within a ring: channel, row, column.
std::vector<int32_t> ring_codes(int C, const int32_t* ks, int n_ks, Sizes& sizes) {
  const int k = ks[n_ks - 1], R = k / 2;
  std::vector<int32_t> codes;
  codes.reserve(static_cast<size_t>(C) * k * k);
  sizes.n = n_ks;
  for (int j = 0; j < n_ks; ++j) {
    const int lo = j == 0 ? -1 : ks[j - 1] / 2, hi = ks[j] / 2;
    for (int c = 0; c < C; ++c)
      for (int di = 0; di < k; ++di)
        for (int dj = 0; dj < k; ++dj) {
          const int ring = std::max(std::abs(di - R), std::abs(dj - R));
          if (ring > lo && ring <= hi) codes.push_back(element_code((c * k + di) * k + dj, k));
        }
    sizes.end[j] = static_cast<int>(codes.size());
  }
  return codes;
}

// The largest size index of a nonzero mask of sizes.
__device__ __forceinline__ int top_size(uint32_t sizes) {
#if defined(__CUDA_ARCH__)
  return 31 - __clz(static_cast<int>(sizes));
#else
  return 31 - __builtin_clz(sizes);
#endif
}

// One thread per query row of the item: the row's online softmax state at every size over the item's keys.
// QRES: each thread keeps its query patch (ring order) in its own column of dynamic shared memory, (d, BM)
// elements, gathered once (no barrier: a thread reads only what it wrote); otherwise it gathers the query's
// elements again for every key.
template <typename T, int CC, bool QRES>
__global__ void __launch_bounds__(BM) multi_items(Geometry<T> G, Sizes S, const uint32_t* __restrict__ kmask,
                                                  const Item* __restrict__ items, MultiPartials P) {
  const Item it = items[blockIdx.x];
  const int r = threadIdx.x;
  const int rows = static_cast<int>(it.row1 - it.row0);
  if (r >= rows) return;  // no barriers below
  const int half = G.k / 2, K = S.n;
  const int64_t HW = static_cast<int64_t>(G.H) * G.W, HWq = static_cast<int64_t>(G.Hq) * G.Wq;
  const int64_t q0 = G.cls_qpix_ptr[it.c], npix = G.cls_qpix_ptr[it.c + 1] - q0;
  const int64_t p0 = G.cls_kpos_ptr[it.c], npos = G.cls_kpos_ptr[it.c + 1] - p0;
  const int64_t i0 = G.grp_img_ptr[it.g], b0 = G.grp_b_ptr[it.g];
  const int64_t row = it.row0 + r;
  const int b = G.grp_b[b0 + row / npix];
  const int pix = G.cls_qpix[q0 + row % npix];
  const T* qimg = G.query + static_cast<int64_t>(b) * G.C * HWq;
  const int qi = pix / G.Wq, qj = pix % G.Wq;
  const double a = G.a[b], inv = G.inv_2b2[b];
  PM_DYNAMIC_SHARED(resident);
  T* const Qall = reinterpret_cast<T*>(resident);
  if constexpr (QRES)
    for (int dd = 0; dd < S.end[K - 1]; ++dd)
      Qall[dd * BM + r] = patch_elem(qimg, G.Hq, G.Wq, qi, qj, __ldg(G.elem + dd), half, G.query_pad);

  double m[kMaxMultiK], s[kMaxMultiK], acc[kMaxMultiK][CC];
  for (int j = 0; j < K; ++j) {
    m[j] = -INFINITY;
    s[j] = 0.0;
    for (int ch = 0; ch < CC; ++ch) acc[j][ch] = 0.0;
  }
  for (int64_t u = it.k0; u < it.k1; ++u) {
    const int64_t e = p0 + u % npos;
    const uint32_t sizes = kmask[e];
    if (sizes == 0) continue;
    const int top = top_size(sizes);
    const T* kimg = G.train + static_cast<int64_t>(G.grp_img[i0 + u / npos]) * G.C * HW;
    const int pos = G.cls_kpos[e];
    const int ki = pos / G.W, kj = pos % G.W;
    double v[CC];
    for (int ch = 0; ch < CC; ++ch) v[ch] = static_cast<double>(__ldg(kimg + ch * HW + pos));
    double dist = 0.0;
    int dd = 0;
    for (int j = 0; j <= top; ++j) {
      for (; dd < S.end[j]; ++dd) {
        const int32_t code = __ldg(G.elem + dd);
        T q;
        if constexpr (QRES) q = Qall[dd * BM + r];
        else q = patch_elem(qimg, G.Hq, G.Wq, qi, qj, code, half, G.query_pad);
        const double dq = static_cast<double>(q);
        const double dk = static_cast<double>(patch_elem(kimg, G.H, G.W, ki, kj, code, half, G.key_pad));
        const double diff = dq - a * dk;
        dist = fma(diff, diff, dist);
      }
      if (!((sizes >> j) & 1u)) continue;
      const double l = -dist * inv;
      double f;
      const double w = fold_key<T>(m[j], s[j], l, f);  // exactly 0 below the cut, as in the other kernels
      if (f != 1.0)
        for (int ch = 0; ch < CC; ++ch) acc[j][ch] *= f;
      if (w == 0.0) continue;
      for (int ch = 0; ch < CC; ++ch) acc[j][ch] = fma(w, v[ch], acc[j][ch]);
    }
  }
  const int64_t slot = it.slot + r;
  for (int j = 0; j < K; ++j) {
    P.m[slot * K + j] = m[j];
    P.s[slot * K + j] = s[j];
    for (int ch = 0; ch < CC; ++ch) P.acc[(slot * K + j) * CC + ch] = acc[j][ch];
  }
}

// One thread per row: merge the row's partial states over its key splits, in split order, at every size its
// class computes (cls_sizes), and write them to out (n_ks, B, C, Hq, Wq); other sizes are left as they are.
template <typename T, int CC>
__global__ void merge_multi_rows(Geometry<T> G, Sizes S, const uint32_t* __restrict__ cls_sizes,
                                 const RowBlock* __restrict__ blocks, MultiPartials P, int64_t B, T* __restrict__ out) {
  const RowBlock rb = blocks[blockIdx.x];
  const int r = threadIdx.x;
  const int rows = static_cast<int>(rb.row1 - rb.row0);
  if (r >= rows) return;
  const int K = S.n;
  const int64_t HWq = static_cast<int64_t>(G.Hq) * G.Wq;
  const int64_t q0 = G.cls_qpix_ptr[rb.c], npix = G.cls_qpix_ptr[rb.c + 1] - q0;
  const int64_t row = rb.row0 + r;
  const int64_t b = G.grp_b[G.grp_b_ptr[rb.g] + row / npix];
  const int64_t pix = G.cls_qpix[q0 + row % npix];
  const uint32_t sizes = cls_sizes[rb.c];
  for (int j = 0; j < K; ++j) {
    if (!((sizes >> j) & 1u)) continue;
    double m = -INFINITY, s = 0.0, acc[CC];
    for (int ch = 0; ch < CC; ++ch) acc[ch] = 0.0;
    for (int sp = 0; sp < rb.n_split; ++sp) {
      const int64_t st = (rb.slot + static_cast<int64_t>(sp) * rows + r) * K + j;
      const MergeFactors f = merge_state(m, s, P.m[st], P.s[st]);
      for (int ch = 0; ch < CC; ++ch) acc[ch] = acc[ch] * f.self + P.acc[st * CC + ch] * f.other;
    }
    T* o = out + ((static_cast<int64_t>(j) * B + b) * G.C) * HWq + pix;
    for (int ch = 0; ch < CC; ++ch) o[ch * HWq] = static_cast<T>(s > 0 ? acc[ch] / s : 0.0);
  }
}

// Bytes of dynamic shared memory for resident query patches, or 0 to gather them with every key: resident up to
// PATCHMOSAIC_CUDA_QUERY_SMEM_KB per block (default 48, as the single-size kernel; 0 turns it off), and only
// where that needs no opt-in (48 KB with the kernel's static shared memory).
template <typename T, int CC>
size_t multi_resident_bytes(int d) {
  const size_t bytes = static_cast<size_t>(d) * BM * sizeof(T);
  size_t cap = 48 * 1024;
  if (const char* env = std::getenv("PATCHMOSAIC_CUDA_QUERY_SMEM_KB")) cap = static_cast<size_t>(std::atol(env)) * 1024;
  if (bytes > cap) return 0;
  cudaFuncAttributes fa{};
  check_cuda(cudaFuncGetAttributes(&fa, multi_items<T, CC, true>), "cudaFuncGetAttributes");
  return bytes + fa.sharedSizeBytes <= 48 * 1024 ? bytes : 0;
}

template <typename T, int CC>
void launch_multi(const MultiKArgs<T>& M, const DeviceCall<T>& D, const Sizes& S, const uint32_t* kmask,
                  const uint32_t* cls_sizes, cudaStream_t st) {
  const int64_t states = D.slots * S.n;
  DeviceBuffer<double> m(states, st), s(states, st), acc(states * CC, st);
  MultiPartials P{m.get(), s.get(), acc.get()};
  if (const size_t bytes = multi_resident_bytes<T, CC>(S.end[S.n - 1]); bytes > 0) {
    const auto items = &multi_items<T, CC, true>;
    PM_LAUNCH(items, static_cast<unsigned>(D.n_items), BM, bytes, st)(D.G, S, kmask, D.items.get(), P);
  } else {
    const auto items = &multi_items<T, CC, false>;
    PM_LAUNCH(items, static_cast<unsigned>(D.n_items), BM, 0, st)(D.G, S, kmask, D.items.get(), P);
  }
  check_launch("patch_softmax_multi (items)");
  const auto merge = &merge_multi_rows<T, CC>;
  PM_LAUNCH(merge, static_cast<unsigned>(D.n_blocks), BM, 0, st)(D.G, S, cls_sizes, D.blocks.get(), P, M.base.B,
                                                                 M.out);
  check_launch("patch_softmax_multi (merge)");
}

}  // namespace
}  // namespace cuda

template <typename T>
void local_forward_multi_cuda(const MultiKArgs<T>& M, void* stream, int device) {
  using namespace cuda;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto st = static_cast<cudaStream_t>(stream);
  const PatchSoftmaxArgs<T>& A = M.base;  // k = the largest size
  const QueryGroups qg = queries_by_group(A.group_of_b, A.B, A.n_groups);
  const Plan plan = plan_cuda(A, qg);
  if (plan.items.empty()) return;
  if (plan.items.size() > 2147483647u || plan.blocks.size() > 2147483647u)
    throw std::invalid_argument("too many work items for one call; split the batch");
  Sizes S{};
  const std::vector<int32_t> codes = ring_codes(A.C, M.ks, M.n_ks, S);
  // the sizes each class computes: those its key positions serve
  std::vector<uint32_t> cls_sizes(A.n_classes, 0);
  for (int64_t c = 0; c < A.n_classes; ++c)
    for (int64_t e = A.cls_kpos_ptr[c]; e < A.cls_kpos_ptr[c + 1]; ++e) cls_sizes[c] |= M.cls_kmask[e];
  const DeviceCall<T> D(A, qg, plan, codes, st);
  const DeviceBuffer<uint32_t> kmask(M.cls_kmask, A.cls_kpos_ptr[A.n_classes], st);
  const DeviceBuffer<uint32_t> sizes(cls_sizes, st);
  switch (A.C) {
    case 1: launch_multi<T, 1>(M, D, S, kmask.get(), sizes.get(), st); break;
    case 2: launch_multi<T, 2>(M, D, S, kmask.get(), sizes.get(), st); break;
    case 3: launch_multi<T, 3>(M, D, S, kmask.get(), sizes.get(), st); break;
    default: launch_multi<T, 4>(M, D, S, kmask.get(), sizes.get(), st); break;
  }
}

template void local_forward_multi_cuda<float>(const MultiKArgs<float>&, void*, int);
template void local_forward_multi_cuda<double>(const MultiKArgs<double>&, void*, int);

}  // namespace patchmosaic
