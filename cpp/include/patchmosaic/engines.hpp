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
// the same-position machines (aligned_softmax.cpp): forward (out, stats, provenance) and backward
template <typename T> void aligned_forward_cpu(const AlignedArgs<T>& A);
template <typename T> void aligned_backward_cpu(const AlignedArgs<T>& A);

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
