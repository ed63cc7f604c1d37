// contract.hpp -- the arguments of every kernel, for both engines (CPU and CUDA).
//
// Each op has one call struct whose fields are listed once, in an X-macro: the struct, its Python
// binding (bind_contract.hpp) and the list of field names Python fills (ops/contract.py) are all
// generated from that list. Every field is an integer: sizes, codes, or addresses. Addresses of the
// large buffers (images, outputs, per-image coefficients) belong to the engine's device (host memory for
// the CPU engine, device memory for CUDA); the small index arrays (classes, groups, candidates) are
// always host addresses. The engines read the struct through a typed view (view<T>(call)).
//
// What the ops compute (spec.md section 2): for each query row (query image b, pixel p) a softmax over
// the keys q of its key set with logits
//     l_q = -|| P_p(x_b) - a_b K_q ||^2 / (2 b_b^2)            (x0_hat = sum_q w_q centre(q))
// The engines work with the shifted logit l'_q = l_q + |P_p(x_b)|^2 / (2 b_b^2), the same for every key of
// a row, and report per row the statistics of the softmax over l': stats = (m, s) with m the largest
// l'_q and s = sum_q exp(l'_q - m), so that w_q = exp(l'_q - m) / s. The backward pass reads them.
#pragma once

#include <algorithm>
#include <cstdint>

namespace patchmosaic {

enum Dtype : int64_t { kFloat32 = 0, kFloat64 = 1 };
enum Padding : int64_t { kPadZeros = 0, kPadCircular = 1 };

// LS / ELS / boundary-aware ELS: queries grouped into classes of pixels that share key positions
// (python/patchmosaic/ops/tables.py; the rules: machines/keysets.py), training images grouped by label.
#define PM_LOCAL_FIELDS(F)                                                                          \
  F(dtype)                       /* kFloat32 or kFloat64: the type of every T buffer below */     \
  F(train) F(N) F(C) F(H) F(W)   /* T (N, C, H, W): training images */                            \
  F(query) F(B) F(Hq) F(Wq)      /* T (B, C, Hq, Wq): noisy queries */                            \
  F(k) F(query_pad) F(key_pad)   /* odd patch size; Padding of query and key patches */           \
  F(n_elem) F(elem) F(elem_scale) /* optional masked patch, see below; n_elem = 0: the square */  \
  F(cls_elem_ptr)                /* optional int64 (n_classes+1,) host: a masked patch per class */ \
  F(a) F(inv_2b2)                /* double (B,): sqrt(alpha_bar(t_b)), 1 / (2 (1 - alpha_bar)) */ \
  F(n_classes)                   /* classes of query pixels (host CSR arrays): */                 \
  F(cls_qpix_ptr) F(cls_qpix) F(n_cls_qpix)  /* int64 (n_classes+1,), int32 pixels i*Wq+j */      \
  F(cls_kpos_ptr) F(cls_kpos) F(n_cls_kpos)  /* int64 (n_classes+1,), int32 positions i*W+j */    \
  F(n_groups)                    /* groups of training images (host CSR arrays): */               \
  F(grp_img_ptr) F(grp_img) F(n_grp_img)     /* int64 (n_groups+1,), int32 image indices */       \
  F(group_of_b)                  /* int32 (B,): the group of each query image */                  \
  F(out) F(stats)                /* forward: T (B, C, Hq, Wq); double (B, Hq, Wq, 2) = (m, s) */  \
  F(arg_key) F(arg_share)        /* optional provenance: int64 n*H*W + p', T weight share */      \
  F(grad_out)                    /* backward: T (B, C, Hq, Wq), with out and stats as inputs */   \
  F(grad_query)                  /* backward: T (B, C, Hq, Wq) */                                 \
  F(grad_a) F(grad_inv_2b2)      /* backward: double (B,) */                                      \
  F(n_threads)                   /* CPU: 0 = all available */

// The patch elements (LocalCall): with n_elem = 0 a patch is all C k^2 elements of the square, in the order of
// patch_geometry.hpp. With n_elem > 0 it is the table elem, int32 (n_elem,) host: distinct element codes
// (element_code of patch_geometry.hpp: channel, row offset, column offset inside the k x k frame), in the order
// the engines use them; and with elem_scale, double (n_elem,) host, finite and > 0 (0 address: all 1), query and
// key elements are multiplied by it, so that the squared distance is the weighted one
//     || P_p(x_b) - a_b K_q ||^2_w = sum_e w_e (x_e - a_b k_e)^2,   elem_scale[e] = sqrt(w_e)
// (a masked neighbourhood, spec section 2 with the sum restricted to the mask). The key set (and with it the
// padding signature of boundary-aware ELS) is still that of the k x k frame; stats and |P_p|^2 are the masked ones.
// Without cls_elem_ptr every class uses the whole table (a mask shared by every pixel); with it (CSR offsets into
// elem and elem_scale, each class's part not empty) class c uses elem[cls_elem_ptr[c] .. cls_elem_ptr[c + 1]): a
// mask per class, so per query pixel where each pixel is a class of its own (LS; the Python layer splits the
// classes of the other key sets by mask).

// Local machines at several patch sizes in one pass (forward only, no provenance, CPU): the output for
// every size ks[j] (odd, strictly increasing, at most kMaxMultiK of them). cls_kmask says for which sizes each
// key position of a class belongs to its key set: bit j of cls_kmask[e] is set when key position cls_kpos[e]
// is a key of the class at size ks[j]. A class computes the sizes its key positions serve (the union of their
// masks) for its query pixels; the output of its pixels at other sizes is left as it is (another class of the
// call computes them, or nobody). The squared distance at size ks[j] is the one at ks[j-1] plus the ring
// between them, so one pass over patches of the largest size a class needs gives all its sizes.
#define PM_LOCAL_MULTI_FIELDS(F)                                                                    \
  F(dtype)                                                                                          \
  F(train) F(N) F(C) F(H) F(W)   /* T (N, C, H, W) */                                               \
  F(query) F(B) F(Hq) F(Wq)      /* T (B, C, Hq, Wq) */                                             \
  F(n_ks) F(ks)                  /* int32 (n_ks,) host: odd, strictly increasing */                 \
  F(query_pad) F(key_pad)                                                                           \
  F(a) F(inv_2b2)                /* double (B,) */                                                  \
  F(n_classes)                                                                                      \
  F(cls_qpix_ptr) F(cls_qpix) F(n_cls_qpix)                                                         \
  F(cls_kpos_ptr) F(cls_kpos) F(n_cls_kpos)                                                         \
  F(cls_kmask)                   /* uint32 (n_cls_kpos,) host: the sizes each key position serves */ \
  F(n_groups) F(grp_img_ptr) F(grp_img) F(n_grp_img) F(group_of_b)                                  \
  F(out)                         /* T (n_ks, B, C, Hq, Wq) */                                       \
  F(n_threads)

// IS: one key per training image; the whole image is the patch and the value.
#define PM_IDEAL_FIELDS(F)                                                      \
  F(dtype)                                                                      \
  F(train) F(N) F(D)             /* T (N, D), D = C * H * W */                  \
  F(query) F(B)                  /* T (B, D) */                                 \
  F(a) F(inv_2b2)                /* double (B,) */                              \
  F(n_groups) F(grp_img_ptr) F(grp_img) F(n_grp_img) F(group_of_b)              \
  F(out) F(stats)                /* T (B, D); double (B, 2) = (m, s) */         \
  F(arg_key) F(arg_share)        /* optional (B,) */                            \
  F(grad_out) F(grad_query)      /* backward: T (B, D) */                       \
  F(grad_a) F(grad_inv_2b2)      /* backward: double (B,) */                    \
  F(n_threads)

// The exact re-scoring step behind the patch index: a softmax over a short candidate list per listed
// query pixel, logits recomputed from the original patches (true distances: l_q, not l'_q), and the
// numbers the index's error bound needs.
#define PM_CANDIDATE_FIELDS(F)                                                                   \
  F(dtype)                                                                                       \
  F(train) F(N) F(C) F(H) F(W)                                                                   \
  F(query) F(B) F(Hq) F(Wq)                                                                      \
  F(k) F(query_pad) F(key_pad)                                                                   \
  F(n_elem) F(elem) F(elem_scale) /* optional masked patch, as for LocalCall (one table) */      \
  F(a) F(inv_2b2)                                                                                \
  F(P) F(pix)                    /* int64 (P,): b * Hq * Wq + i * Wq + j */                      \
  F(m) F(cand)                   /* int64 (P, m): n * H * W + i' * W + j'; negative: skipped */  \
  F(count)                       /* optional double (P, m): identical keys each stands for */    \
  F(out)                         /* T (B, C, Hq, Wq), written at the listed pixels only */       \
  F(top_logit) F(last_logit) F(sum_rel)  /* double (P,): largest, smallest logit, sum exp(l - top) */ \
  F(arg_key) F(arg_share)        /* optional (P,) */                                             \
  F(n_threads)

// Same-position machines (LS, PCA-locality, patch-set composites): every row is a softmax over the training images
// (of the query's label group) at the same positions as the query. Row r of query image b has a neighbourhood of
// elements e (flat c * H * W + i * W + j of the image) with weights w_e > 0, and a response: the elements whose
// values the row averages. Its logit for training image n is
//     l_n = -inv_2b2_b * sum_{e in hood(r)} w_e (x_b[e] - a_b phi_n[e])^2
// (not shifted: stats = (max l_n, sum exp(l_n - max))), and out[b, j] = sum_n w_n phi_n[resp_elem[j]] / sum_n w_n
// for each response entry j of the row (a row with an empty neighbourhood: every logit 0, the mean over the images).
// The engines compute every image's squared residual once and sum it over
// each row's neighbourhood (cpu/aligned_softmax.cpp: as runs of consecutive elements of equal weight).
#define PM_ALIGNED_FIELDS(F)                                                                         \
  F(dtype)                                                                                          \
  F(train) F(N) F(D)             /* T (N, D): training images, flat (D = C H W) */                  \
  F(query) F(B)                  /* T (B, D): noisy queries, flat */                                \
  F(a) F(inv_2b2)                /* double (B,) */                                                  \
  F(n_rows)                      /* rows of every query image */                                    \
  F(hood_ptr) F(hood_elem) F(n_hood)  /* host int64 (n_rows+1,), int32 (n_hood,): ascending, distinct */ \
  F(hood_weight)                 /* host double (n_hood,) > 0, finite; 0 address: all 1 */          \
  F(resp_ptr) F(resp_elem) F(n_resp)  /* host int64 (n_rows+1,), int32 (n_resp,): each row >= 1 */   \
  F(n_groups) F(grp_img_ptr) F(grp_img) F(n_grp_img) F(group_of_b)  /* as LocalCall */             \
  F(out)                         /* forward: T (B, n_resp) */                                       \
  F(stats)                       /* forward: double (B, n_rows, 2) = (m, s); backward: input */     \
  F(arg_key) F(arg_share)        /* optional (B, n_rows): int64 winning image, T its weight share */ \
  F(grad_out)                    /* backward: T (B, n_resp), with out and stats as inputs */         \
  F(grad_query)                  /* backward: T (B, D) */                                           \
  F(grad_a) F(grad_inv_2b2)      /* backward: double (B,) */                                        \
  F(hoodT_ptr) F(hoodT_row) F(hoodT_weight)  /* CUDA backward: host int64 (D+1,), int32, double: the \
                                    rows whose neighbourhood holds each element, with its weight */  \
  F(n_threads)

#define PM_DECLARE_FIELD(name) int64_t name = 0;
struct LocalCall { PM_LOCAL_FIELDS(PM_DECLARE_FIELD) };
struct IdealCall { PM_IDEAL_FIELDS(PM_DECLARE_FIELD) };
struct CandidateCall { PM_CANDIDATE_FIELDS(PM_DECLARE_FIELD) };
struct LocalMultiCall { PM_LOCAL_MULTI_FIELDS(PM_DECLARE_FIELD) };
struct AlignedCall { PM_ALIGNED_FIELDS(PM_DECLARE_FIELD) };
#undef PM_DECLARE_FIELD

template <typename P>
inline P addr(int64_t a) {
  return reinterpret_cast<P>(static_cast<uintptr_t>(a));
}

// ----------------------------------------------------------------------------------- typed views
template <typename T>
struct PatchSoftmaxArgs {
  const T* train;
  int64_t N;
  int C, H, W;
  const T* query;
  int64_t B;
  int Hq, Wq;
  int k, query_pad, key_pad;
  const double* a;
  const double* inv_2b2;
  int64_t n_classes;
  const int64_t* cls_qpix_ptr;
  const int32_t* cls_qpix;
  const int64_t* cls_kpos_ptr;
  const int32_t* cls_kpos;
  int64_t n_groups;
  const int64_t* grp_img_ptr;
  const int32_t* grp_img;
  const int32_t* group_of_b;
  T* out;
  double* stats;
  int64_t* arg_key;
  T* arg_share;
  const T* grad_out;
  T* grad_query;
  double* grad_a;
  double* grad_inv_2b2;
  int n_threads;
  int n_elem = 0;                      // 0: the square patch; else the masked patch's elements (contract above)
  const int32_t* elem = nullptr;       // host element codes (n_elem,)
  const double* elem_scale = nullptr;  // host sqrt weights (n_elem,) or null (all 1)
  const int64_t* cls_elem_ptr = nullptr;  // host (n_classes + 1,): each class's part of elem, or null (all of it)
};

// The patch of class c: its element codes and scales (null: the square patch; null scale: all 1) and size.
struct ClassElements {
  const int32_t* code;
  const double* scale;
  int n;
};

template <typename T>
inline ClassElements class_elements(const PatchSoftmaxArgs<T>& A, int64_t c) {
  if (A.n_elem == 0) return {nullptr, nullptr, A.C * A.k * A.k};
  const int64_t e0 = A.cls_elem_ptr ? A.cls_elem_ptr[c] : 0;
  const int64_t e1 = A.cls_elem_ptr ? A.cls_elem_ptr[c + 1] : A.n_elem;
  return {A.elem + e0, A.elem_scale ? A.elem_scale + e0 : nullptr, static_cast<int>(e1 - e0)};
}

// The largest number of elements of one patch of a call: C k^2 for the square, else the largest class's table.
template <typename T>
inline int patch_dim(const PatchSoftmaxArgs<T>& A) {
  if (A.n_elem == 0) return A.C * A.k * A.k;
  if (!A.cls_elem_ptr) return A.n_elem;
  int64_t d = 0;
  for (int64_t c = 0; c < A.n_classes; ++c) d = std::max<int64_t>(d, A.cls_elem_ptr[c + 1] - A.cls_elem_ptr[c]);
  return static_cast<int>(d);
}

template <typename T>
inline PatchSoftmaxArgs<T> view(const LocalCall& c) {
  return {addr<const T*>(c.train), c.N, int(c.C), int(c.H), int(c.W), addr<const T*>(c.query), c.B, int(c.Hq),
          int(c.Wq), int(c.k), int(c.query_pad), int(c.key_pad), addr<const double*>(c.a),
          addr<const double*>(c.inv_2b2), c.n_classes, addr<const int64_t*>(c.cls_qpix_ptr),
          addr<const int32_t*>(c.cls_qpix), addr<const int64_t*>(c.cls_kpos_ptr), addr<const int32_t*>(c.cls_kpos),
          c.n_groups, addr<const int64_t*>(c.grp_img_ptr), addr<const int32_t*>(c.grp_img),
          addr<const int32_t*>(c.group_of_b), addr<T*>(c.out), addr<double*>(c.stats), addr<int64_t*>(c.arg_key),
          addr<T*>(c.arg_share), addr<const T*>(c.grad_out), addr<T*>(c.grad_query), addr<double*>(c.grad_a),
          addr<double*>(c.grad_inv_2b2), int(c.n_threads), int(c.n_elem), addr<const int32_t*>(c.elem),
          addr<const double*>(c.elem_scale), addr<const int64_t*>(c.cls_elem_ptr)};
}

// The multi-size call: the single-size view at the largest size (no stats, provenance or gradients; its
// key positions are the union over the sizes), the sizes and each key position's mask of sizes.
template <typename T>
struct MultiKArgs {
  PatchSoftmaxArgs<T> base;  // k = ks[n_ks - 1]; out, stats, provenance and gradient fields unset
  int n_ks;
  const int32_t* ks;
  const uint32_t* cls_kmask;
  T* out;  // (n_ks, B, C, Hq, Wq)
};

template <typename T>
inline MultiKArgs<T> view(const LocalMultiCall& c) {
  PatchSoftmaxArgs<T> b{addr<const T*>(c.train), c.N, int(c.C), int(c.H), int(c.W), addr<const T*>(c.query), c.B,
                        int(c.Hq), int(c.Wq), 0, int(c.query_pad), int(c.key_pad), addr<const double*>(c.a),
                        addr<const double*>(c.inv_2b2), c.n_classes, addr<const int64_t*>(c.cls_qpix_ptr),
                        addr<const int32_t*>(c.cls_qpix), addr<const int64_t*>(c.cls_kpos_ptr),
                        addr<const int32_t*>(c.cls_kpos), c.n_groups, addr<const int64_t*>(c.grp_img_ptr),
                        addr<const int32_t*>(c.grp_img), addr<const int32_t*>(c.group_of_b), nullptr, nullptr,
                        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, int(c.n_threads)};
  const int32_t* ks = addr<const int32_t*>(c.ks);
  b.k = c.n_ks > 0 ? ks[c.n_ks - 1] : 0;
  return {b, int(c.n_ks), ks, addr<const uint32_t*>(c.cls_kmask), addr<T*>(c.out)};
}

template <typename T>
struct IdealScoreArgs {
  const T* train;
  int64_t N, D;
  const T* query;
  int64_t B;
  const double* a;
  const double* inv_2b2;
  int64_t n_groups;
  const int64_t* grp_img_ptr;
  const int32_t* grp_img;
  const int32_t* group_of_b;
  T* out;
  double* stats;
  int64_t* arg_key;
  T* arg_share;
  const T* grad_out;
  T* grad_query;
  double* grad_a;
  double* grad_inv_2b2;
  int n_threads;
};

template <typename T>
inline IdealScoreArgs<T> view(const IdealCall& c) {
  return {addr<const T*>(c.train), c.N, c.D, addr<const T*>(c.query), c.B, addr<const double*>(c.a),
          addr<const double*>(c.inv_2b2), c.n_groups, addr<const int64_t*>(c.grp_img_ptr),
          addr<const int32_t*>(c.grp_img), addr<const int32_t*>(c.group_of_b), addr<T*>(c.out),
          addr<double*>(c.stats), addr<int64_t*>(c.arg_key), addr<T*>(c.arg_share), addr<const T*>(c.grad_out),
          addr<T*>(c.grad_query), addr<double*>(c.grad_a), addr<double*>(c.grad_inv_2b2), int(c.n_threads)};
}

template <typename T>
struct AlignedArgs {
  const T* train;
  int64_t N, D;
  const T* query;
  int64_t B;
  const double* a;
  const double* inv_2b2;
  int64_t n_rows;
  const int64_t* hood_ptr;
  const int32_t* hood_elem;
  const double* hood_weight;  // null: all 1
  const int64_t* resp_ptr;
  const int32_t* resp_elem;
  int64_t n_resp;
  int64_t n_groups;
  const int64_t* grp_img_ptr;
  const int32_t* grp_img;
  const int32_t* group_of_b;
  T* out;
  double* stats;
  int64_t* arg_key;
  T* arg_share;
  const T* grad_out;
  T* grad_query;
  double* grad_a;
  double* grad_inv_2b2;
  const int64_t* hoodT_ptr;
  const int32_t* hoodT_row;
  const double* hoodT_weight;
  int n_threads;
};

template <typename T>
inline AlignedArgs<T> view(const AlignedCall& c) {
  return {addr<const T*>(c.train), c.N, c.D, addr<const T*>(c.query), c.B, addr<const double*>(c.a),
          addr<const double*>(c.inv_2b2), c.n_rows, addr<const int64_t*>(c.hood_ptr),
          addr<const int32_t*>(c.hood_elem), addr<const double*>(c.hood_weight), addr<const int64_t*>(c.resp_ptr),
          addr<const int32_t*>(c.resp_elem), c.n_resp, c.n_groups, addr<const int64_t*>(c.grp_img_ptr),
          addr<const int32_t*>(c.grp_img), addr<const int32_t*>(c.group_of_b), addr<T*>(c.out), addr<double*>(c.stats),
          addr<int64_t*>(c.arg_key), addr<T*>(c.arg_share), addr<const T*>(c.grad_out), addr<T*>(c.grad_query),
          addr<double*>(c.grad_a), addr<double*>(c.grad_inv_2b2), addr<const int64_t*>(c.hoodT_ptr),
          addr<const int32_t*>(c.hoodT_row), addr<const double*>(c.hoodT_weight), int(c.n_threads)};
}

template <typename T>
struct CandidateSoftmaxArgs {
  const T* train;
  int64_t N;
  int C, H, W;
  const T* query;
  int64_t B;
  int Hq, Wq;
  int k, query_pad, key_pad;
  const double* a;
  const double* inv_2b2;
  int64_t P;
  const int64_t* pix;
  int m;
  const int64_t* cand;
  const double* count;
  T* out;
  double* top_logit;
  double* last_logit;
  double* sum_rel;
  int64_t* arg_key;
  T* arg_share;
  int n_threads;
  int n_elem = 0;                      // 0: the square patch; else a masked patch's elements (as LocalCall)
  const int32_t* elem = nullptr;
  const double* elem_scale = nullptr;
};

template <typename T>
inline CandidateSoftmaxArgs<T> view(const CandidateCall& c) {
  return {addr<const T*>(c.train), c.N, int(c.C), int(c.H), int(c.W), addr<const T*>(c.query), c.B, int(c.Hq),
          int(c.Wq), int(c.k), int(c.query_pad), int(c.key_pad), addr<const double*>(c.a),
          addr<const double*>(c.inv_2b2), c.P, addr<const int64_t*>(c.pix), int(c.m), addr<const int64_t*>(c.cand),
          addr<const double*>(c.count), addr<T*>(c.out), addr<double*>(c.top_logit), addr<double*>(c.last_logit),
          addr<double*>(c.sum_rel), addr<int64_t*>(c.arg_key), addr<T*>(c.arg_share), int(c.n_threads),
          int(c.n_elem), addr<const int32_t*>(c.elem), addr<const double*>(c.elem_scale)};
}

}  // namespace patchmosaic
