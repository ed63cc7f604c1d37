// engines.hpp -- the entry points of the two engines. Each takes a call struct (contract.hpp) that
// validate.hpp has checked; the typed views are what the kernels read.
//
// Forward passes write out and stats (and provenance when asked); backward passes read grad_out, out and
// stats and write the vector-Jacobian products grad_query, grad_a and grad_inv_2b2 (spec.md section 2,
// derivative in ops/library.py): with w_q the softmax weights of a row, V_q its keys' centres and
// delta_q = <g, V_q - out>,
//     d<g, out>/dQ = 2 s sum_q w_q delta_q (a K_q - Q)                 (s = 1 / (2 b^2))
//     d<g, out>/da = 2 s sum_q w_q delta_q <Q - a K_q, K_q>,   d<g, out>/ds = -sum_q w_q delta_q |Q - a K_q|^2
// and the gradient of a query image is the sum of its rows' patch gradients (the adjoint of the gather).
#pragma once

#include <memory>
#include <vector>

#include "contract.hpp"
#include "plan.hpp"

namespace patchmosaic {

template <typename T> void local_forward_cpu(const PatchSoftmaxArgs<T>& A);
template <typename T> void local_backward_cpu(const PatchSoftmaxArgs<T>& A);
template <typename T> void ideal_forward_cpu(const IdealScoreArgs<T>& A);
template <typename T> void ideal_backward_cpu(const IdealScoreArgs<T>& A);
template <typename T> void candidate_softmax_cpu(const CandidateSoftmaxArgs<T>& A);
template <typename T> Plan plan_cpu(const PatchSoftmaxArgs<T>& A, const QueryGroups& qg);
// every patch size of a LocalMultiCall in one pass (forward only; patch_softmax_multi.cpp)
template <typename T> void local_forward_multi_cpu(const MultiKArgs<T>& A);
// the same-position machines (aligned_softmax.cpp): forward (out, stats, provenance) and backward. `plan`: the
// table's HoodPlan for T (hood_plan_cpu), or null to derive it within the call.
struct HoodPlan;
template <typename T> std::shared_ptr<const HoodPlan> hood_plan_cpu(const AlignedArgs<T>& A);
template <typename T> void aligned_forward_cpu(const AlignedArgs<T>& A, const HoodPlan* plan = nullptr);
template <typename T> void aligned_backward_cpu(const AlignedArgs<T>& A, const HoodPlan* plan = nullptr);

// the PCA-locality machine's masks from an approximate Wiener matrix and a bound on its error (wiener_mask.cpp):
// row m's neighbourhood is {n : |L[m, n]| inv_dd[n] >= tau}, L = U diag(w) U^T (float64, U D x r), decided from
// L~ (float32 or float64, D x D) where |L~ - L| <= c sq[m] sq[n] + tail[m] tail[n] + eta, i.e. an error of
// c sq[m] s[n] + tail[m] p[n] + t[n] in the entry (s = sq inv_dd, p = tail inv_dd, t = eta inv_dd), and recomputed
// from U and w where the bound cannot decide.
struct WienerMaskArgs {
  const void* L;  // L~, row-major D x D
  bool f32;       // L~ is float32 (else float64)
  int64_t D, r;
  const double *U, *w, *inv_dd, *sq, *s, *tail, *p, *t;
  double c;
  int n_threads;
};
// max over m, n of |L[m, n]| inv_dd[n] (exact); n_checked: the entries recomputed
double wiener_mask_max(const WienerMaskArgs& A, int64_t* n_checked);
// the rows' neighbourhoods at threshold tau as CSR (ptr: D + 1 offsets into elem, each row ascending)
void wiener_mask_rows(const WienerMaskArgs& A, double tau, std::vector<int64_t>& ptr, std::vector<int32_t>& elem,
                      int64_t* n_checked);

// softmax-weighted means of whole images for rows that share them, averaged over groups of rows (expansion_means.cpp;
// the smoothed closed-form denoiser): l[r, n] = c1[r] <Q_r, X_n> - c2[r] sq[n] in float64, w = exp(l - max_n l)
// with the weights below e^-cut and the images of another label (row_label[r] != img_label[n]; both null: no
// labels) left out, out[g] = mean over the rows r = g, g + G, ... of sum_n w[r, n] X_n / sum_n w[r, n] (NaN where
// such a row keeps no image). Returns how many images some row keeps.
struct ExpansionMeansArgs {
  const void* X;  // images, row-major N x D
  bool f32;       // X is float32 (else float64)
  int64_t N, D, R;
  int64_t groups;  // G: rows r belong to group r % G (R a multiple of G; G = R: each row its own mean)
  const double *sq, *Q, *c1, *c2;  // sq (N), Q (R x D), c1 and c2 (R)
  const int64_t *row_label, *img_label;
  double cut;
  double* out;  // G x D
  int n_threads;
};
int64_t expansion_means(const ExpansionMeansArgs& A);

// CUDA twins (cuda/*.cu, built with PATCHMOSAIC_CUDA): `stream` is a cudaStream_t; kernels are enqueued on
// it. `device`: the CUDA device the buffers and the stream belong to (made current for the call).
template <typename T> void local_forward_cuda(const PatchSoftmaxArgs<T>& A, void* stream, int device);
template <typename T> void local_backward_cuda(const PatchSoftmaxArgs<T>& A, void* stream, int device);
template <typename T> void ideal_forward_cuda(const IdealScoreArgs<T>& A, void* stream, int device);
template <typename T> void ideal_backward_cuda(const IdealScoreArgs<T>& A, void* stream, int device);
// every patch size of a LocalMultiCall in one pass (forward only; cuda/patch_softmax_multi.cu)
template <typename T> void local_forward_multi_cuda(const MultiKArgs<T>& A, void* stream, int device);
// the same-position machines (cuda/aligned_softmax.cu)
template <typename T> void aligned_forward_cuda(const AlignedArgs<T>& A, void* stream, int device);
template <typename T> void aligned_backward_cuda(const AlignedArgs<T>& A, void* stream, int device);

}  // namespace patchmosaic
