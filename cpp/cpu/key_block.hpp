// key_block.hpp -- what the forward and backward CPU kernels of the local machines share: an item's query
// patches packed in tiles, the blocks of key patches streamed past them, and the tile of logits.
//
// A key block holds kKB keys of one item, gathered on the fly from the training images (patches never
// exist for more than one block), transposed (element dd of key j at Kt[dd * kKB + j]), with the keys'
// squared norms, centre values and ids. Query rows are packed in tiles of kMR rows, element-major
// (Qp[tile][dd][m]), so the micro-kernel broadcasts consecutive values.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "patch_gather.hpp"
#include "patchmosaic/contract.hpp"
#include "patchmosaic/plan.hpp"

namespace patchmosaic {
namespace cpu {

constexpr int kKB = 256;  // keys per streamed block

// Micro-tile: kMR query rows x NR keys of accumulators, held in vector registers; kVecBytes: the width of
// one vector register of the instruction set this module is compiled for.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMR = 6;
template <typename T> struct Tile { static constexpr int NR = 64 / sizeof(T) * 4; };  // 6 x four zmm
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kMR = 6;
template <typename T> struct Tile { static constexpr int NR = 32 / sizeof(T) * 2; };  // 6 x two ymm
#else
constexpr int kVecBytes = 16;
constexpr int kMR = 6;
template <typename T> struct Tile { static constexpr int NR = 16 / sizeof(T) * 2; };  // 6 x two xmm
#endif

// One vector register of T as a GCC vector: element-wise max without a reduction the auto-vectoriser
// would have to recognise. (Wider than the register, GCC splits it through memory.)
template <typename T> struct VecReg {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / sizeof(T);
};

// The largest of L[0..n), n a multiple of the lanes of two vector registers: element-wise maxima in two
// registers, then over their lanes.
template <typename T>
inline T block_max(const T* __restrict L, int n) {
  using Vec = typename VecReg<T>::type;
  constexpr int kLanes = VecReg<T>::lanes;
  const T ninf = -std::numeric_limits<T>::infinity();
  Vec m0 = Vec{} + ninf, m1 = m0;
  for (int i = 0; i < n; i += 2 * kLanes) {
    Vec v0, v1;
    std::memcpy(&v0, L + i, sizeof(Vec));
    std::memcpy(&v1, L + i + kLanes, sizeof(Vec));
    m0 = m0 > v0 ? m0 : v0;
    m1 = m1 > v1 ? m1 : v1;
  }
  m0 = m0 > m1 ? m0 : m1;
  T lanes[kLanes];
  std::memcpy(lanes, &m0, sizeof(Vec));
  T mx = lanes[0];
  for (int l = 1; l < kLanes; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
  return mx;
}

// The micro-kernel: dot[m][j] = sum_dd Q[dd][m] Kt[dd][j] for kMR rows and NR keys (Kt: a key block's
// transposed entries from the tile's first key on, row stride kKB). The accumulators are vector-typed
// locals of a function of their own (not inlined), so that nothing else competes for the registers: with
// the logits' constants live around it, GCC spilled accumulators, and the spill chain bounded the loop.
template <typename T>
__attribute__((noinline)) void dot_tile(const T* __restrict Q, const T* __restrict Kt, int d, T* __restrict dot) {
  using Vec = typename VecReg<T>::type;
  constexpr int kLanes = VecReg<T>::lanes, NV = Tile<T>::NR / kLanes;
  Vec acc[kMR][NV];
  for (int m = 0; m < kMR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Vec{};
  for (int dd = 0; dd < d; ++dd) {
    const T* kv = Kt + static_cast<int64_t>(dd) * kKB;
    Vec key[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&key[v], kv + v * kLanes, sizeof(Vec));
    for (int m = 0; m < kMR; ++m) {
      const Vec qv = Vec{} + Q[static_cast<int64_t>(dd) * kMR + m];
      for (int v = 0; v < NV; ++v) acc[m][v] += qv * key[v];
    }
  }
  std::memcpy(dot, acc, sizeof(acc));
}

// Logits of one tile of kMR query rows against a block of keys, and each row's block maximum:
//   L[m][j] = c1[m] * sum_dd Q[dd][m] Kt[dd][j] - c2[m] * kn[j]   (j < nk; -inf beyond)
// Q is one packed tile, [d][kMR]; the dot products stay in registers until turned into logits (the
// maxima are taken afterwards, so that the accumulators have every register). With RAW, the dot
// products themselves are also stored (R[m][j]), for the backward pass.
template <typename T, bool RAW = false>
inline void logit_tile(const T* __restrict Q, const T* __restrict Kt, int d, const T* __restrict kn, int nk,
                       const T* __restrict c1, const T* __restrict c2, T* __restrict L, T* __restrict bmax,
                       T* __restrict R = nullptr) {
  constexpr int NR = Tile<T>::NR;
  static_assert(NR % VecReg<T>::lanes == 0 && kKB % NR == 0 && kKB % (2 * VecReg<T>::lanes) == 0, "tile sizes");
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int j0 = 0; j0 < kKB; j0 += NR) {
    T dot[kMR][NR];
    dot_tile(Q, Kt + j0, d, &dot[0][0]);
    for (int m = 0; m < kMR; ++m) {
      T* Lm = L + m * kKB + j0;
      if constexpr (RAW) std::memcpy(R + m * kKB + j0, dot[m], sizeof(dot[m]));
      for (int j = 0; j < NR; ++j) {
        const T v = c1[m] * dot[m][j] - c2[m] * kn[j0 + j];
        Lm[j] = j0 + j < nk ? v : ninf;
      }
    }
  }
  for (int m = 0; m < kMR; ++m) bmax[m] = block_max(L + m * kKB, kKB);
}

// An item's query rows, gathered once, packed in tiles of kMR rows (zero rows pad the last tile), and the
// per-row logit coefficients c1 = 2 a / (2 b^2), c2 = a^2 / (2 b^2).
template <typename T>
struct QueryTiles {
  std::vector<T> Qp, c1, c2;
  std::vector<int64_t> image, pixel;  // query image and pixel of each row
  int rows = 0;

  void gather(const PatchSoftmaxArgs<T>& A, const QueryGroups& qg, const WorkItem& it) {
    const int C = A.C, k = A.k;
    const ClassElements el = class_elements(A, it.c);
    const int d = el.n;
    const int64_t HWq = static_cast<int64_t>(A.Hq) * A.Wq;
    rows = static_cast<int>(it.row1 - it.row0);
    const int rows_padded = (rows + kMR - 1) / kMR * kMR;
    Qp.assign(static_cast<size_t>(rows_padded) * d, T(0));
    c1.assign(rows_padded, T(0));
    c2.assign(rows_padded, T(0));
    image.resize(rows);
    pixel.resize(rows);
    for (int r = 0; r < rows; ++r) {
      const int64_t row = it.row0 + r;
      const int64_t b = row_image(A, qg, it.g, it.c, row);
      const int64_t pix = row_pixel(A, it.c, row);
      image[r] = b;
      pixel[r] = pix;
      T* dst = Qp.data() + static_cast<int64_t>(r / kMR) * kMR * d + r % kMR;
      if (el.code)
        gather_elements(A.query + b * C * HWq, A.Hq, A.Wq, static_cast<int>(pix / A.Wq), static_cast<int>(pix % A.Wq),
                        k / 2, A.query_pad, el.code, el.scale, el.n, dst, kMR);
      else
        gather_run(A.query + b * C * HWq, C, A.Hq, A.Wq, static_cast<int>(pix / A.Wq), static_cast<int>(pix % A.Wq),
                   1, k, A.query_pad, dst, kMR);
      const double a = A.a[b], s = A.inv_2b2[b];
      c1[r] = static_cast<T>(2.0 * a * s);
      c2[r] = static_cast<T>(a * a * s);
    }
  }
  // element dd of row r
  T at(int r, int dd, int d) const { return Qp[static_cast<int64_t>(r / kMR) * kMR * d + static_cast<int64_t>(dd) * kMR + r % kMR]; }
};

// A block of up to kKB keys of an item.
template <typename T>
struct KeyBlock {
  std::vector<T> Kt, knorm, V;
  std::vector<double> knorm_acc;
  std::vector<int64_t> key_id, base;
  std::vector<int> kci, kcj;  // masked patches: key centres
  std::vector<char> inside;   // masked patches: the key's k x k frame lies inside its image
  int nk = 0;

  KeyBlock(int d, int C)
      : Kt(static_cast<size_t>(d) * kKB), knorm(kKB), V(static_cast<size_t>(C) * kKB), knorm_acc(kKB), key_id(kKB),
        base(kKB) {}

  // Keys kb0 .. kb0 + n - 1 of the item's (group, class) pair; (img_i, pos_i) is the image and position
  // counter of key kb0 and advances past the block. uniform_padding: every key position of the block has
  // the same padding signature at size A.k (true of every class of a single-size key set; the multi-size
  // kernel says per block), which allows the gather through one pattern of padded entries. norms: also
  // compute the keys' squared norms (knorm).
  void gather(const PatchSoftmaxArgs<T>& A, const WorkItem& it, int n, int64_t& img_i, int64_t& pos_i,
              bool uniform_padding = true, bool norms = true) {
    const int C = A.C, k = A.k;
    const ClassElements el = class_elements(A, it.c);
    const int d = el.n;
    const int64_t HW = static_cast<int64_t>(A.H) * A.W;
    const int64_t p0 = A.cls_kpos_ptr[it.c], npos = A.cls_kpos_ptr[it.c + 1] - p0;
    const int64_t i0 = A.grp_img_ptr[it.g];
    nk = n;
    // Key centres of the block (flat offsets into the training buffer), values and ids. Count the
    // runs of horizontally adjacent keys of one image along the way.
    const int64_t img_i0 = img_i, pos_i0 = pos_i;
    int runs = 0;
    for (int j = 0; j < nk; ++j) {
      const int64_t nimg = A.grp_img[i0 + img_i];
      const int64_t pos = A.cls_kpos[p0 + pos_i];
      const int64_t b = nimg * C * HW + pos;
      runs += (j == 0 || b != base[j - 1] + 1 || pos % A.W == 0) ? 1 : 0;
      base[j] = b;
      for (int c = 0; c < C; ++c) V[static_cast<int64_t>(c) * kKB + j] = A.train[b + c * HW];
      key_id[j] = nimg * HW + pos;
      if (++pos_i == npos) { pos_i = 0; ++img_i; }
    }
    if (el.code) {
      gather_masked(A, el);
    } else if (A.key_pad == kPadZeros && uniform_padding && runs * 8 > nk) {
      // Short runs (edge and corner classes, LS): every key of a class has the same padding signature,
      // so one pattern of padded entries holds for the whole block; gather each patch entry dd of
      // all keys at once through the centre offsets.
      const int64_t pos0 = A.cls_kpos[p0 + pos_i0];
      const int ci = static_cast<int>(pos0 / A.W), cj = static_cast<int>(pos0 % A.W), r = k / 2;
      for (int c = 0, dd = 0; c < C; ++c)
        for (int di = 0; di < k; ++di)
          for (int dj = 0; dj < k; ++dj, ++dd) {
            T* row = Kt.data() + static_cast<int64_t>(dd) * kKB;
            const int y = ci - r + di, x = cj - r + dj;
            if (y < 0 || y >= A.H || x < 0 || x >= A.W) {
              std::fill(row, row + nk, T(0));
              continue;
            }
            const T* src = A.train + c * HW + static_cast<int64_t>(di - r) * A.W + (dj - r);
            const int64_t* bp = base.data();
            for (int j = 0; j < nk; ++j) row[j] = src[bp[j]];
          }
    } else {
      // long runs (interior classes): each patch entry of a run is one contiguous copy (gather_run)
      int64_t gi = img_i0, gp = pos_i0;
      for (int j = 0; j < nk;) {
        const int64_t nimg = A.grp_img[i0 + gi];
        const int32_t* kp = A.cls_kpos + p0 + gp;
        const int64_t pos = kp[0];
        const int ci = static_cast<int>(pos / A.W), cj = static_cast<int>(pos % A.W);
        int L = 1;
        while (j + L < nk && gp + L < npos && kp[L] == pos + L && cj + L < A.W) ++L;
        gather_run(A.train + nimg * C * HW, C, A.H, A.W, ci, cj, L, k, A.key_pad, Kt.data() + j, kKB);
        j += L;
        gp += L;
        if (gp == npos) { gp = 0; ++gi; }
      }
    }
    if (nk < kKB)
      for (int dd = 0; dd < d; ++dd)
        std::fill(Kt.begin() + static_cast<int64_t>(dd) * kKB + nk, Kt.begin() + static_cast<int64_t>(dd + 1) * kKB, T(0));
    if (!norms) return;
    // key norms, accumulated in double over dd (vectorised over keys)
    std::fill(knorm_acc.begin(), knorm_acc.end(), 0.0);
    for (int dd = 0; dd < d; ++dd) {
      const T* row = Kt.data() + static_cast<int64_t>(dd) * kKB;
      double* acc = knorm_acc.data();
#pragma omp simd
      for (int j = 0; j < kKB; ++j) acc[j] += static_cast<double>(row[j]) * row[j];
    }
    for (int j = 0; j < kKB; ++j) knorm[j] = static_cast<T>(knorm_acc[j]);
  }

  // The block's keys (centres base[j], ids key_id[j]) as masked patches: element dd of the table elem for every
  // key, times its scale. A key whose k x k frame lies inside its image reads every element at a fixed offset
  // from its centre; the others go through the padding rule element by element.
  void gather_masked(const PatchSoftmaxArgs<T>& A, const ClassElements& el) {
    const int r = A.k / 2;
    const int64_t HW = static_cast<int64_t>(A.H) * A.W;
    kci.resize(kKB);
    kcj.resize(kKB);
    inside.resize(kKB);
    for (int j = 0; j < nk; ++j) {
      const int64_t pos = key_id[j] % HW;
      kci[j] = static_cast<int>(pos / A.W);
      kcj[j] = static_cast<int>(pos % A.W);
      inside[j] = kci[j] >= r && kci[j] + r < A.H && kcj[j] >= r && kcj[j] + r < A.W;
    }
    for (int dd = 0; dd < el.n; ++dd) {
      const int32_t code = el.code[dd];
      const int ch = code_channel(code), di = code_row(code), dj = code_col(code);
      const int64_t off = ch * HW + static_cast<int64_t>(di - r) * A.W + (dj - r);
      T* row = Kt.data() + static_cast<int64_t>(dd) * kKB;
      for (int j = 0; j < nk; ++j) {
        if (inside[j]) {
          row[j] = A.train[base[j] + off];
        } else {
          const int64_t at = element_pixel(A.H, A.W, kci[j], kcj[j], ch, di, dj, r, static_cast<int>(A.key_pad));
          row[j] = at < 0 ? T(0) : A.train[base[j] - key_id[j] % HW + at];
        }
      }
      if (el.scale) {
        const T s = static_cast<T>(el.scale[dd]);
        for (int j = 0; j < nk; ++j) row[j] *= s;
      }
    }
  }
};

}  // namespace cpu
}  // namespace patchmosaic
