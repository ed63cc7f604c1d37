// patch_softmax.hpp -- the contract of the one streaming kernel behind every local machine.
//
// For each query pixel p of each query image b (a "row"), and for every key q in the key set
// K(p) = { patch of training image n centred at training position p' :
//          n in the image group of b, p' in the key positions of p's class },
//
//     logit_q = -|| P_p(x_b) - a_b * P_{p'}(phi_n) ||^2 / (2 b_b^2)      (the |P_p(x_b)|^2 term dropped)
//     out[b, :, p] = sum_q exp(logit_q) centre(q) / sum_q exp(logit_q)
//
// computed with an online (max-subtracted) softmax over blocks of keys gathered on the fly, so that
// no buffer of size keys x query pixels ever exists. Optionally also the arg-max key and its share
// of the total weight (provenance). See spec.md section 2 and design.md.
//
// The caller describes *classes* of query pixels that share one set of key positions (keysets.py):
//   LS            : one class per pixel, key position = the same pixel
//   ELS periodic  : one class, key positions = all fully-inside (or all, wrapped) positions
//   ELS zeros     : one class per padding signature, key positions = training positions of that signature
// and *groups* of training images (class conditioning): query image b uses group group_of_b[b].
#pragma once

#include <cstdint>

namespace patchmosaic {

enum Padding : int { kPadZeros = 0, kPadCircular = 1 };

template <typename T>
struct PatchSoftmaxArgs {
  // training images, (N, C, H, W) contiguous
  const T* train = nullptr;
  int64_t N = 0;
  int C = 0, H = 0, W = 0;
  // noisy queries, (B, C, Hq, Wq) contiguous
  const T* query = nullptr;
  int64_t B = 0;
  int Hq = 0, Wq = 0;
  int k = 1;                       // odd patch size
  int query_pad = kPadZeros;       // how the query patch is padded
  int key_pad = kPadZeros;         // how key patches are padded
  const double* a = nullptr;       // (B,) sqrt(alpha_bar(t_b))
  const double* inv_2b2 = nullptr; // (B,) 1 / (2 (1 - alpha_bar(t_b)))
  // classes of query pixels
  int64_t n_classes = 0;
  const int64_t* cls_qpix_ptr = nullptr;  // (n_classes + 1,) offsets into cls_qpix
  const int32_t* cls_qpix = nullptr;      // query pixel indices i * Wq + j
  const int64_t* cls_kpos_ptr = nullptr;  // (n_classes + 1,) offsets into cls_kpos
  const int32_t* cls_kpos = nullptr;      // training positions i * W + j (the key centres)
  // groups of training images
  int64_t n_groups = 0;
  const int64_t* grp_img_ptr = nullptr;   // (n_groups + 1,) offsets into grp_img
  const int32_t* grp_img = nullptr;       // training image indices
  const int32_t* group_of_b = nullptr;    // (B,) group of each query image
  // outputs
  T* out = nullptr;                // (B, C, Hq, Wq)
  int64_t* arg_key = nullptr;      // optional (B, Hq, Wq): n * (H * W) + p' of the highest-weight key
  T* arg_share = nullptr;          // optional (B, Hq, Wq): that key's weight / total weight
  int n_threads = 0;               // 0: all available
};

// Ideal score (eq. 3-4): one key per training image, the whole image is the patch and the value.
template <typename T>
struct IdealScoreArgs {
  const T* train = nullptr;  // (N, D) with D = C * H * W
  int64_t N = 0;
  int64_t D = 0;
  const T* query = nullptr;  // (B, D)
  int64_t B = 0;
  const double* a = nullptr;
  const double* inv_2b2 = nullptr;
  int64_t n_groups = 0;
  const int64_t* grp_img_ptr = nullptr;
  const int32_t* grp_img = nullptr;
  const int32_t* group_of_b = nullptr;
  T* out = nullptr;          // (B, D)
  int64_t* arg_key = nullptr;  // optional (B,): index of the highest-weight training image
  T* arg_share = nullptr;      // optional (B,)
  int n_threads = 0;
};

// Softmax over a given short list of candidate keys per query pixel: the exact re-scoring step behind
// an approximate (patch index) machine. For each listed query pixel, every candidate's logit is
// recomputed exactly from the original patches (never from compressed codes), then
//     out[b, :, p] = sum_q exp(logit_q) centre(q) / sum_q exp(logit_q)     over the candidates q,
// and the numbers the error bound needs: the largest and smallest candidate logit and
// sum_q exp(logit_q - largest). Logits here include |P_p(x_b)|^2 (true distances).
template <typename T>
struct CandidateSoftmaxArgs {
  const T* train = nullptr;   // (N, C, H, W)
  int64_t N = 0;
  int C = 0, H = 0, W = 0;
  const T* query = nullptr;   // (B, C, Hq, Wq)
  int64_t B = 0;
  int Hq = 0, Wq = 0;
  int k = 1;
  int query_pad = kPadZeros;
  int key_pad = kPadZeros;
  const double* a = nullptr;        // (B,)
  const double* inv_2b2 = nullptr;  // (B,)
  int64_t P = 0;                    // number of query pixels listed
  const int64_t* pix = nullptr;     // (P,) b * Hq * Wq + i * Wq + j
  int m = 0;                        // candidates per pixel
  const int64_t* cand = nullptr;    // (P, m) n * H * W + i' * W + j'; negative entries are skipped
  const double* count = nullptr;    // optional (P, m): how many identical keys each candidate stands for
  T* out = nullptr;                 // (B, C, Hq, Wq), written at the listed pixels only
  double* top_logit = nullptr;      // (P,)
  double* last_logit = nullptr;     // (P,) the smallest logit among the candidates used
  double* sum_rel = nullptr;        // (P,) sum exp(logit - top_logit)
  int64_t* arg_key = nullptr;       // optional (P,)
  T* arg_share = nullptr;           // optional (P,)
  int n_threads = 0;
};

template <typename T>
void patch_softmax_cpu(const PatchSoftmaxArgs<T>& args);

template <typename T>
void candidate_softmax_cpu(const CandidateSoftmaxArgs<T>& args);

template <typename T>
void ideal_score_cpu(const IdealScoreArgs<T>& args);

// CUDA twins (cuda/*.cu, built with PATCHMOSAIC_CUDA): train, query and the outputs are device
// pointers; every index array (classes, groups, a, inv_2b2) is a host pointer, copied by the call.
// `stream` is a cudaStream_t; kernels are enqueued on it and not waited for (the small host-to-device
// copies of the index arrays may wait for the stream, and without memory pools cudaFree waits).
// `device`: the CUDA device the pointers and the stream belong to (made current for the call).
template <typename T>
void patch_softmax_cuda(const PatchSoftmaxArgs<T>& args, void* stream, int device);

template <typename T>
void ideal_score_cuda(const IdealScoreArgs<T>& args, void* stream, int device);

}  // namespace patchmosaic
