// validate.hpp -- one check of every call struct, for both engines, before any buffer is touched.
//
// The Python layer (ops/) allocates and fills the structs; these checks make the compiled core safe
// against a wrong call all the same: every size is positive and small enough for the engines' integer
// types, every product of sizes fits in 64 bits, every index of the (host) index arrays is in range, and
// the buffers a pass needs are present. A failed check throws std::invalid_argument naming the field
// (a ValueError in Python).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "contract.hpp"

namespace patchmosaic {

enum class Pass { kForward, kBackward };
enum class Engine { kCpu, kCuda };

namespace detail {

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

inline void positive(int64_t v, const char* name, int64_t hi = int64_t(1) << 30) {
  if (v < 1 || v > hi)
    fail(std::string(name) + " must lie in 1.." + std::to_string(hi) + ", got " + std::to_string(v));
}

inline void present(int64_t address, const char* name) {
  if (address == 0) fail(std::string(name) + " is missing (null address)");
}

// the product of sizes, or an error when it does not fit in 62 bits
inline int64_t product(std::initializer_list<int64_t> sizes, const char* what) {
  int64_t p = 1;
  for (int64_t s : sizes)
    if (__builtin_mul_overflow(p, s, &p) || p > (int64_t(1) << 62))
      fail(std::string(what) + " is too large: its size overflows 64-bit arithmetic");
  return p;
}

// CSR offsets ptr[0..n]: from 0, non-decreasing, ending at len
inline void csr(int64_t ptr_addr, int64_t n, int64_t len, const char* name) {
  present(ptr_addr, name);
  const int64_t* ptr = addr<const int64_t*>(ptr_addr);
  if (ptr[0] != 0 || ptr[n] != len)
    fail(std::string(name) + ": offsets must run from 0 to the array length " + std::to_string(len));
  for (int64_t i = 0; i < n; ++i)
    if (ptr[i + 1] < ptr[i]) fail(std::string(name) + ": offsets decrease at entry " + std::to_string(i));
}

inline void in_range(int64_t v_addr, int64_t len, int64_t hi, const char* name) {
  if (len == 0) return;
  present(v_addr, name);
  const int32_t* v = addr<const int32_t*>(v_addr);
  for (int64_t i = 0; i < len; ++i)
    if (v[i] < 0 || v[i] >= hi)
      fail(std::string(name) + " holds an index outside 0.." + std::to_string(hi - 1) + " (entry " + std::to_string(i) +
           " is " + std::to_string(v[i]) + ")");
}

inline void dtype(int64_t d) {
  if (d != kFloat32 && d != kFloat64) fail("dtype must be 0 (float32) or 1 (float64), got " + std::to_string(d));
}

inline void padding(int64_t p, const char* name) {
  if (p != kPadZeros && p != kPadCircular) fail(std::string(name) + " must be 0 (zeros) or 1 (circular)");
}

// image groups: CSR over the training images, one group per query image; groups in use are not empty
template <typename Call>
void groups(const Call& c) {
  positive(c.n_groups, "n_groups", int64_t(1) << 31);
  csr(c.grp_img_ptr, c.n_groups, c.n_grp_img, "grp_img_ptr");
  in_range(c.grp_img, c.n_grp_img, c.N, "grp_img");
  in_range(c.group_of_b, c.B, c.n_groups, "group_of_b");
  const int64_t* ptr = addr<const int64_t*>(c.grp_img_ptr);
  const int32_t* gob = addr<const int32_t*>(c.group_of_b);
  for (int64_t b = 0; b < c.B; ++b)
    if (ptr[gob[b] + 1] == ptr[gob[b]]) fail("query image " + std::to_string(b) + " uses an image group with no training images");
}

template <typename Call>
void pass_buffers(const Call& c, Pass pass) {
  present(c.a, "a");
  present(c.inv_2b2, "inv_2b2");
  present(c.out, "out");
  present(c.stats, "stats");
  if (pass == Pass::kForward) {
    if ((c.arg_key == 0) != (c.arg_share == 0)) fail("arg_key and arg_share come together (provenance)");
  } else {
    present(c.grad_out, "grad_out");
    present(c.grad_query, "grad_query");
    present(c.grad_a, "grad_a");
    present(c.grad_inv_2b2, "grad_inv_2b2");
  }
}

}  // namespace detail

// The limits of the engines' kernels, for messages that say what to use instead.
constexpr int64_t kMaxPatchElements = int64_t(1) << 24;  // C k^2 (a patch per key block lives in memory)
constexpr int kCudaMaxChannels = 4;
constexpr int kCudaMaxK = 4095;
constexpr int kMaxMultiK = 32;  // patch sizes of one multi-size call (bits of a key position's mask)

namespace detail {

// What a LocalCall and a LocalMultiCall share: types, buffers, sizes and paddings (before the patch size).
template <typename Call>
void local_common(const Call& c) {
  dtype(c.dtype);
  present(c.train, "train");
  present(c.query, "query");
  positive(c.N, "N", int64_t(1) << 40);
  positive(c.C, "C");
  positive(c.H, "H");
  positive(c.W, "W");
  positive(c.B, "B", int64_t(1) << 40);
  positive(c.Hq, "Hq");
  positive(c.Wq, "Wq");
  product({c.N, c.C, c.H, c.W}, "the training set");
  product({c.B, c.C, c.Hq, c.Wq}, "the query batch");
}

// An odd patch size k whose C k^2 patches the engines can hold.
inline void patch_size(int64_t k, int64_t C) {
  if (k < 1 || k % 2 == 0) fail("patch size k must be odd and positive, got " + std::to_string(k));
  if (k > 32767 || product({C, k, k}, "the patch") > kMaxPatchElements)
    fail("patch size k=" + std::to_string(k) + " makes patches of more than " + std::to_string(kMaxPatchElements) +
         " elements");
}

// The paddings and the CSR arrays of the query-pixel classes (their key positions checked by the caller).
template <typename Call>
void local_classes(const Call& c) {
  padding(c.query_pad, "query_pad");
  padding(c.key_pad, "key_pad");
  positive(c.n_classes, "n_classes", int64_t(1) << 40);
  csr(c.cls_qpix_ptr, c.n_classes, c.n_cls_qpix, "cls_qpix_ptr");
  csr(c.cls_kpos_ptr, c.n_classes, c.n_cls_kpos, "cls_kpos_ptr");
  in_range(c.cls_qpix, c.n_cls_qpix, c.Hq * c.Wq, "cls_qpix");
  in_range(c.cls_kpos, c.n_cls_kpos, c.H * c.W, "cls_kpos");
}

// The CUDA kernels' limits: channels (per-thread accumulators) and patch size (element codes).
inline void cuda_limits(int64_t C, int64_t k) {
  if (C > kCudaMaxChannels)
    fail("the CUDA engine handles 1 to " + std::to_string(kCudaMaxChannels) + " channels, got " + std::to_string(C));
  if (k > kCudaMaxK) fail("the CUDA engine handles k <= " + std::to_string(kCudaMaxK) + ", got " + std::to_string(k));
}

// A masked patch's element table (contract.hpp): 0 (the square) or, per class (or for all), 1..C k^2 distinct
// codes inside the C x k x k frame, with finite positive scales when given. (After local_classes: n_classes.)
// (The fields of a LocalCall; a CandidateCall has no cls_elem_ptr: 0.)
inline void patch_elements(int64_t C, int64_t k, int64_t n_elem, int64_t elem, int64_t elem_scale,
                           int64_t cls_elem_ptr, int64_t n_classes) {
  struct {
    int64_t C, k, n_elem, elem, elem_scale, cls_elem_ptr, n_classes;
  } c{C, k, n_elem, elem, elem_scale, cls_elem_ptr, n_classes};
  if (c.n_elem == 0) {
    if (c.cls_elem_ptr != 0) fail("cls_elem_ptr is given without an element table (n_elem = 0)");
    return;
  }
  const int64_t full = c.C * c.k * c.k;
  if (c.n_elem < 0 || (c.cls_elem_ptr == 0 && c.n_elem > full))
    fail("n_elem (elements of a masked patch) must lie in 0.." + std::to_string(full) + ", got " +
         std::to_string(c.n_elem));
  if (c.n_elem > 2147483647)  // (the engines' view holds the count as an int: a larger table would wrap)
    fail("n_elem (elements of the per-class masked patches) must be below 2^31, got " + std::to_string(c.n_elem) +
         "; split the batch or the canvas");
  if (c.k >= 4096 || c.C >= 128) fail("a masked patch needs k < 4096 and fewer than 128 channels (element codes)");
  present(c.elem, "elem");
  const int32_t* code = addr<const int32_t*>(c.elem);
  const int64_t n_parts = c.cls_elem_ptr ? c.n_classes : 1;
  if (c.cls_elem_ptr) csr(c.cls_elem_ptr, c.n_classes, c.n_elem, "cls_elem_ptr");
  const int64_t* ptr = addr<const int64_t*>(c.cls_elem_ptr);
  std::vector<char> seen(static_cast<size_t>(full), 0);
  for (int64_t p = 0; p < n_parts; ++p) {
    const int64_t e0 = ptr ? ptr[p] : 0, e1 = ptr ? ptr[p + 1] : c.n_elem;
    if (e1 == e0) fail("class " + std::to_string(p) + " has an empty masked patch (cls_elem_ptr)");
    if (e1 - e0 > full) fail("class " + std::to_string(p) + " has more patch elements than C k^2");
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t ch = code[e] >> 24, di = (code[e] >> 12) & 0xFFF, dj = code[e] & 0xFFF;
      if (code[e] < 0 || ch >= c.C || di >= c.k || dj >= c.k)
        fail("elem entry " + std::to_string(e) + " is not an element of the C x k x k patch");
      const int64_t flat = (ch * c.k + di) * c.k + dj;
      if (seen[flat]) fail("elem entry " + std::to_string(e) + " repeats a patch element");
      seen[flat] = 1;
    }
  }
  if (c.elem_scale == 0) return;
  const double* s = addr<const double*>(c.elem_scale);
  for (int64_t e = 0; e < c.n_elem; ++e)
    if (!(s[e] > 0.0) || !std::isfinite(s[e]))
      fail("elem_scale entry " + std::to_string(e) + " must be finite and positive");
}

}  // namespace detail

inline void validate(const LocalCall& c, Pass pass, Engine engine) {
  using namespace detail;
  local_common(c);
  patch_size(c.k, c.C);
  local_classes(c);
  patch_elements(c.C, c.k, c.n_elem, c.elem, c.elem_scale, c.cls_elem_ptr, c.n_classes);
  const int64_t* qp = addr<const int64_t*>(c.cls_qpix_ptr);
  const int64_t* kp = addr<const int64_t*>(c.cls_kpos_ptr);
  for (int64_t i = 0; i < c.n_classes; ++i)
    if (qp[i + 1] > qp[i] && kp[i + 1] == kp[i])
      fail("query-pixel class " + std::to_string(i) + " has no key positions");
  groups(c);
  pass_buffers(c, pass);
  if (engine == Engine::kCuda) cuda_limits(c.C, c.k);
}

inline void validate(const IdealCall& c, Pass pass, Engine) {
  using namespace detail;
  dtype(c.dtype);
  present(c.train, "train");
  present(c.query, "query");
  positive(c.N, "N", int64_t(1) << 40);
  positive(c.D, "D", int64_t(1) << 40);
  positive(c.B, "B", int64_t(1) << 40);
  product({c.N, c.D}, "the training set");
  product({c.B, c.D}, "the query batch");
  groups(c);
  pass_buffers(c, pass);
}

inline void validate(const CandidateCall& c) {
  using namespace detail;
  dtype(c.dtype);
  present(c.train, "train");
  present(c.query, "query");
  positive(c.N, "N", int64_t(1) << 40);
  positive(c.C, "C");
  positive(c.H, "H");
  positive(c.W, "W");
  positive(c.B, "B", int64_t(1) << 40);
  positive(c.Hq, "Hq");
  positive(c.Wq, "Wq");
  const int64_t nkey = product({c.N, c.H, c.W}, "the key set");
  const int64_t npix = product({c.B, c.Hq, c.Wq}, "the query batch");
  product({c.N, c.C, c.H, c.W}, "the training set");
  product({c.B, c.C, c.Hq, c.Wq}, "the query batch");
  if (c.k < 1 || c.k % 2 == 0) fail("patch size k must be odd and positive, got " + std::to_string(c.k));
  if (c.k > 32767 || product({c.C, c.k, c.k}, "the patch") > kMaxPatchElements)
    fail("patch size k=" + std::to_string(c.k) + " is too large");
  padding(c.query_pad, "query_pad");
  padding(c.key_pad, "key_pad");
  patch_elements(c.C, c.k, c.n_elem, c.elem, c.elem_scale, 0, 1);
  present(c.a, "a");
  present(c.inv_2b2, "inv_2b2");
  if (c.P < 0) fail("P must not be negative");
  positive(c.m, "m", int64_t(1) << 24);
  product({c.P, c.m}, "the candidate list");
  present(c.out, "out");
  present(c.top_logit, "top_logit");
  present(c.last_logit, "last_logit");
  present(c.sum_rel, "sum_rel");
  if (c.P == 0) return;
  present(c.pix, "pix");
  present(c.cand, "cand");
  const int64_t* pix = addr<const int64_t*>(c.pix);
  for (int64_t p = 0; p < c.P; ++p)
    if (pix[p] < 0 || pix[p] >= npix) fail("pix holds an index outside the query (entry " + std::to_string(p) + ")");
  const int64_t* cand = addr<const int64_t*>(c.cand);
  const double* count = addr<const double*>(c.count);
  for (int64_t e = 0; e < c.P * c.m; ++e) {
    if (cand[e] >= nkey) fail("cand holds a key index outside the training set (entry " + std::to_string(e) + ")");
    if (count && cand[e] >= 0 && !(count[e] >= 1.0)) fail("count holds a multiplicity below 1 (or NaN)");
  }
  if ((c.arg_key == 0) != (c.arg_share == 0)) fail("arg_key and arg_share come together (provenance)");
}

// The multi-size pass: the checks of a LocalCall at its largest size (but its own sizes, masks and buffers).
inline void validate(const LocalMultiCall& c, Engine engine = Engine::kCpu) {
  using namespace detail;
  local_common(c);
  positive(c.n_ks, "n_ks (the number of patch sizes)", kMaxMultiK);
  present(c.ks, "ks");
  const int32_t* ks = addr<const int32_t*>(c.ks);
  for (int64_t j = 0; j < c.n_ks; ++j) {
    if (ks[j] < 1 || ks[j] % 2 == 0)
      fail("patch sizes ks must be odd and positive, got " + std::to_string(ks[j]) + " at entry " + std::to_string(j));
    if (j > 0 && ks[j] <= ks[j - 1])
      fail("patch sizes ks must be strictly increasing, got " + std::to_string(ks[j - 1]) + " then " +
           std::to_string(ks[j]));
  }
  const int64_t kmax = ks[c.n_ks - 1];
  patch_size(kmax, c.C);
  product({c.n_ks, c.B, c.C, c.Hq, c.Wq}, "the output");
  local_classes(c);
  present(c.cls_kmask, "cls_kmask");
  const uint32_t* mask = addr<const uint32_t*>(c.cls_kmask);
  const uint32_t all = c.n_ks == 32 ? 0xFFFFFFFFu : ((uint32_t(1) << c.n_ks) - 1);
  const int64_t* qp = addr<const int64_t*>(c.cls_qpix_ptr);
  const int64_t* kp = addr<const int64_t*>(c.cls_kpos_ptr);
  for (int64_t i = 0; i < c.n_classes; ++i) {
    uint32_t seen = 0;
    for (int64_t e = kp[i]; e < kp[i + 1]; ++e) {
      if (mask[e] & ~all) fail("cls_kmask entry " + std::to_string(e) + " names a patch size beyond n_ks");
      seen |= mask[e];
    }
    if (qp[i + 1] > qp[i] && seen == 0)
      fail("query-pixel class " + std::to_string(i) + " has no key positions at any patch size");
  }
  groups(c);
  present(c.a, "a");
  present(c.inv_2b2, "inv_2b2");
  present(c.out, "out");
  if (engine == Engine::kCuda) cuda_limits(c.C, kmax);
}

// Same-position machines: sizes, the neighbourhood table (each row's elements ascending and distinct, weights
// finite and > 0), the response table (each row at least one element), the groups, and the pass's buffers.
inline void validate(const AlignedCall& c, Pass pass, Engine engine) {
  using namespace detail;
  dtype(c.dtype);
  present(c.train, "train");
  present(c.query, "query");
  positive(c.N, "N", int64_t(1) << 40);
  positive(c.D, "D", int64_t(1) << 30);
  positive(c.B, "B", int64_t(1) << 40);
  positive(c.n_rows, "n_rows", int64_t(1) << 30);
  product({c.N, c.D}, "the training set");
  product({c.B, c.D}, "the query batch");
  product({c.B, c.n_resp}, "the output");
  product({c.B, c.n_rows, 2}, "the statistics");
  present(c.a, "a");
  present(c.inv_2b2, "inv_2b2");
  csr(c.hood_ptr, c.n_rows, c.n_hood, "hood_ptr");
  in_range(c.hood_elem, c.n_hood, c.D, "hood_elem");
  csr(c.resp_ptr, c.n_rows, c.n_resp, "resp_ptr");
  in_range(c.resp_elem, c.n_resp, c.D, "resp_elem");
  const int64_t* hp = addr<const int64_t*>(c.hood_ptr);
  const int32_t* he = addr<const int32_t*>(c.hood_elem);
  const int64_t* rp = addr<const int64_t*>(c.resp_ptr);
  for (int64_t r = 0; r < c.n_rows; ++r) {
    if (rp[r + 1] == rp[r]) fail("resp_ptr: row " + std::to_string(r) + " has no response element");
    for (int64_t e = hp[r] + 1; e < hp[r + 1]; ++e)
      if (he[e] <= he[e - 1])
        fail("hood_elem: the elements of row " + std::to_string(r) + " must be ascending and distinct");
  }
  if (c.hood_weight) {
    const double* w = addr<const double*>(c.hood_weight);
    for (int64_t e = 0; e < c.n_hood; ++e)
      if (!(w[e] > 0.0) || !std::isfinite(w[e]))
        fail("hood_weight must be finite and > 0 (entry " + std::to_string(e) + ")");
  }
  groups(c);
  present(c.stats, "stats");
  present(c.out, "out");
  if (pass == Pass::kForward) {
    if ((c.arg_key == 0) != (c.arg_share == 0)) fail("arg_key and arg_share must be given together");
    return;
  }
  present(c.grad_out, "grad_out");
  present(c.grad_query, "grad_query");
  present(c.grad_a, "grad_a");
  present(c.grad_inv_2b2, "grad_inv_2b2");
  if (engine == Engine::kCuda) {
    csr(c.hoodT_ptr, c.D, c.n_hood, "hoodT_ptr");
    in_range(c.hoodT_row, c.n_hood, c.n_rows, "hoodT_row");
  }
}

}  // namespace patchmosaic
