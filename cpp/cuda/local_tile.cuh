// local_tile.cuh -- what the forward and backward CUDA kernels of the local machines share: the call's
// geometry on the device, work items, and the gather of patch elements into shared memory.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda_check.cuh"
#include "patchmosaic/contract.hpp"
#include "patchmosaic/patch_geometry.hpp"
#include "patchmosaic/plan.hpp"

namespace patchmosaic {
namespace cuda {

constexpr int BM = 64;   // query rows per item
constexpr int BN = 64;   // keys per tile
constexpr int BK = 16;   // patch elements per chunk
constexpr int NT = 256;  // threads per block: 16 x 16 threads of 4 x 4 products

// A work item of plan.hpp as the device reads it.
struct Item {
  int64_t row0, row1, k0, k1;  // rows of the (group, class) pair, keys of it
  int64_t slot;                // first partial-state row of this item
  int32_t g, c;
};

struct RowBlock {
  int64_t row0, row1, slot;  // slot of split 0; split s starts at slot + s * (row1 - row0)
  int32_t g, c, n_split;
};

template <typename T>
struct Geometry {
  const T* train;
  const T* query;
  int64_t N;
  int C, H, W, Hq, Wq, k, query_pad, key_pad;
  const double* a;        // device (B,)
  const double* inv_2b2;  // device (B,)
  const int64_t* cls_qpix_ptr;
  const int32_t* cls_qpix;
  const int64_t* cls_kpos_ptr;
  const int32_t* cls_kpos;
  const int64_t* grp_img_ptr;
  const int32_t* grp_img;
  const int64_t* grp_b_ptr;  // query images of each group (CSR)
  const int32_t* grp_b;
  const int32_t* elem;       // element_code of patch element e < d (the square's, or a masked patch's table)
  int d;                     // elements per patch: C k^2, or the masked patch's n_elem
  const T* scale;            // masked patch: sqrt weight of element e (null: all 1)
  const int32_t* slot_of;    // masked patch: the table entry of square element (c k + di) k + dj, or -1 (null: square);
                             // with a patch per class, n_classes such maps (the entry within the class's part)
  const int64_t* cls_elem_ptr;  // a masked patch per class: each class's part of elem and scale (null: all of it)
  int stride;                // the largest patch of the call (rows of per-element partial sums)
};

// The part of the element table of class c: its first entry and its size.
template <typename T>
__device__ __forceinline__ int64_t class_elem0(const Geometry<T>& G, int c) {
  return G.cls_elem_ptr ? G.cls_elem_ptr[c] : 0;
}
template <typename T>
__device__ __forceinline__ int class_dim(const Geometry<T>& G, int c) {
  return G.cls_elem_ptr ? static_cast<int>(G.cls_elem_ptr[c + 1] - G.cls_elem_ptr[c]) : G.d;
}

// Element `code` of the patch of `img` (C, Hs, Ws) centred at (ci, cj), zero or circular padded.
template <typename T>
__device__ __forceinline__ T patch_elem(const T* __restrict__ img, int Hs, int Ws, int ci, int cj, int32_t code,
                                        int half, int pad) {
  const int ch = code_channel(code);
  int y = ci + code_row(code) - half;
  int x = cj + code_col(code) - half;
  if (y < 0 || y >= Hs || x < 0 || x >= Ws) {
    if (pad != kPadCircular) return T(0);
    y = wrap_index(y, Hs);  // only here: a division for the few wrapped elements
    x = wrap_index(x, Ws);
  }
  return __ldg(img + (static_cast<int64_t>(ch) * Hs + y) * Ws + x);
}

// Patch element dd of the call's table (patch_elem of its code), times its scale when the patch is weighted.
template <typename T>
__device__ __forceinline__ T call_elem(const Geometry<T>& G, const T* __restrict__ img, int Hs, int Ws, int ci, int cj,
                                       int dd, int half, int pad) {
  const T v = patch_elem(img, Hs, Ws, ci, cj, __ldg(G.elem + dd), half, pad);
  return G.scale ? v * __ldg(G.scale + dd) : v;
}

// The index arrays of a call on the device, and the plan's items and row blocks.
template <typename T>
struct DeviceCall {
  DeviceBuffer<int64_t> cqp, ckp, gip, gbp, cep;
  DeviceBuffer<int32_t> cq, ck, gi, gbd, elem, slot_of;
  DeviceBuffer<T> scale;
  DeviceBuffer<Item> items;
  DeviceBuffer<RowBlock> blocks;
  Geometry<T> G;
  int64_t n_items, n_blocks, slots;

  // with_slots: the backward pass's lookup of a masked patch's table entries (n_classes x C k^2 int32, built and
  // copied only where it is read)
  DeviceCall(const PatchSoftmaxArgs<T>& A, const QueryGroups& qg, const Plan& plan, const std::vector<int32_t>& codes,
             cudaStream_t st, bool with_slots = false)
      : cqp(A.cls_qpix_ptr, A.n_classes + 1, st),
        ckp(A.cls_kpos_ptr, A.n_classes + 1, st),
        gip(A.grp_img_ptr, A.n_groups + 1, st),
        gbp(qg.ptr.data(), A.n_groups + 1, st),
        cep(A.cls_elem_ptr, A.cls_elem_ptr ? A.n_classes + 1 : 0, st),
        cq(A.cls_qpix, A.cls_qpix_ptr[A.n_classes], st),
        ck(A.cls_kpos, A.cls_kpos_ptr[A.n_classes], st),
        gi(A.grp_img, A.grp_img_ptr[A.n_groups], st),
        gbd(qg.b.data(), A.B, st),
        elem(codes, st),
        slot_of(with_slots ? element_slots(A) : std::vector<int32_t>(), st),
        scale(element_scales(A), st),
        items(device_items(plan), st),
        blocks(device_blocks(plan), st),
        n_items(static_cast<int64_t>(plan.items.size())),
        n_blocks(static_cast<int64_t>(plan.blocks.size())),
        slots(plan.slots) {
    G = Geometry<T>{A.train, A.query, A.N, A.C, A.H, A.W, A.Hq, A.Wq, A.k, A.query_pad, A.key_pad, A.a, A.inv_2b2,
                    cqp.get(), cq.get(), ckp.get(), ck.get(), gip.get(), gi.get(), gbp.get(), gbd.get(), elem.get(),
                    static_cast<int>(codes.size()), scale.get(), slot_of.get(), cep.get(),
                    A.n_elem > 0 ? patch_dim(A) : static_cast<int>(codes.size())};
  }

  // A masked patch: the table entry of every square element (-1: not in the mask), per class when each class
  // has its own part (the entry within it); empty for the square.
  static std::vector<int32_t> element_slots(const PatchSoftmaxArgs<T>& A) {
    std::vector<int32_t> v;
    if (A.n_elem == 0) return v;
    const size_t full = static_cast<size_t>(A.C) * A.k * A.k;
    const int64_t parts = A.cls_elem_ptr ? A.n_classes : 1;
    v.assign(full * parts, -1);
    for (int64_t c = 0; c < parts; ++c) {
      const ClassElements el = class_elements(A, c);
      for (int e = 0; e < el.n; ++e) {
        const int32_t code = el.code[e];
        v[c * full + (static_cast<size_t>(code_channel(code)) * A.k + code_row(code)) * A.k + code_col(code)] = e;
      }
    }
    return v;
  }
  // A weighted patch: the scales as T; empty otherwise.
  static std::vector<T> element_scales(const PatchSoftmaxArgs<T>& A) {
    std::vector<T> v;
    if (A.n_elem > 0 && A.elem_scale)
      for (int e = 0; e < A.n_elem; ++e) v.push_back(static_cast<T>(A.elem_scale[e]));
    return v;
  }

  static std::vector<Item> device_items(const Plan& p) {
    std::vector<Item> v;
    v.reserve(p.items.size());
    for (const WorkItem& w : p.items)
      v.push_back({w.row0, w.row1, w.k0, w.k1, w.slot, static_cast<int32_t>(w.g), static_cast<int32_t>(w.c)});
    return v;
  }
  static std::vector<RowBlock> device_blocks(const Plan& p) {
    std::vector<RowBlock> v;
    v.reserve(p.blocks.size());
    for (const patchmosaic::RowBlock& b : p.blocks)
      v.push_back({b.row0, b.row1, p.items[b.item0].slot, static_cast<int32_t>(b.g), static_cast<int32_t>(b.c),
                   static_cast<int32_t>(b.item1 - b.item0)});
    return v;
  }
};

// The CUDA split of keys: rows in blocks of BM, every key range of one length chosen so that the call has
// a few thousand thread blocks. max_slots > 0 (the backward pass, whose partial sums per slot hold a whole
// patch): the ranges lengthened, by doubling, until the call's slots (rows times key ranges) fit, or every row
// block is one item.
template <typename T>
Plan plan_cuda(const PatchSoftmaxArgs<T>& A, const QueryGroups& qg, double max_slots = 0.0) {
  double total = 0.0;
  int64_t most_keys = 0;
  for (int64_t g = 0; g < A.n_groups; ++g)
    for (int64_t c = 0; c < A.n_classes; ++c) {
      total += static_cast<double>((pair_rows(A, qg, g, c) + BM - 1) / BM) * static_cast<double>(pair_keys(A, g, c));
      most_keys = std::max(most_keys, pair_keys(A, g, c));
    }
  int64_t split = std::max<int64_t>(8 * BN, static_cast<int64_t>(total / 4096.0) / BN * BN + BN);
  if (max_slots > 0.0) {
    const auto slots_of = [&](int64_t sp) {
      double n = 0.0;
      for (int64_t g = 0; g < A.n_groups; ++g)
        for (int64_t c = 0; c < A.n_classes; ++c)
          n += static_cast<double>(pair_rows(A, qg, g, c)) * static_cast<double>((pair_keys(A, g, c) + sp - 1) / sp);
      return n;
    };
    while (split < most_keys && slots_of(split) > max_slots) split *= 2;
  }
  return plan_items(A, qg, BM, [split](int64_t, int64_t) { return split; });
}

inline std::vector<int32_t> element_codes(int C, int k) {
  std::vector<int32_t> codes(static_cast<size_t>(C) * k * k);
  for (size_t e = 0; e < codes.size(); ++e) codes[e] = element_code(static_cast<int>(e), k);
  return codes;
}

// The element codes of a call's patches: its masked table, or the square's.
template <typename T>
std::vector<int32_t> element_codes(const PatchSoftmaxArgs<T>& A) {
  if (A.n_elem > 0) return std::vector<int32_t>(A.elem, A.elem + A.n_elem);
  return element_codes(A.C, A.k);
}

}  // namespace cuda
}  // namespace patchmosaic
