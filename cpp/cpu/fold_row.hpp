// fold_row.hpp -- the CPU kernels' fold of one query row's block of logits into its online softmax state
// (softmax_state.hpp: raise_max, block_counts, the weights' cut_exp), vectorised over the block's keys: shared
// by the single-size and the multi-size forward passes.
#pragma once

#include <cmath>
#include <cstdint>

#include "key_block.hpp"
#include "patchmosaic/softmax_state.hpp"
#include "simd_exp.hpp"

namespace patchmosaic {
namespace cpu {

// Fold one row's block of logits L[0..nk) into its online softmax state (m, s, acc, best).
// CC: the channel count when known at compile time (1 or 3; 0 = runtime C), so that the exponential,
// the sum and the weighted centres are one fused, vectorised pass.
template <typename T, int CC>
inline void fold_row(const T* __restrict L, T bmax, const KeyBlock<T>& kb, T* __restrict W, double& m, double& s,
                     double* acc, int64_t& best, int C_runtime) {
  const int C = CC > 0 ? CC : C_runtime;
  const int nk = kb.nk;
  if (!block_counts<T>(bmax, m)) return;  // every weight of the block is exactly 0
  if (static_cast<double>(bmax) > m) {
    int barg = 0;
    while (L[barg] != bmax) ++barg;
    best = kb.key_id[barg];
    const double f = raise_max(m, s, static_cast<double>(bmax));
    for (int c = 0; c < C; ++c) acc[c] *= f;
  }
  // each key's weight: cut_exp<T> of softmax_state.hpp, vectorised (exp_nonpos: the same cut)
  const T mt = static_cast<T>(m);
  const T* __restrict V = kb.V.data();
  // (Weights first into W, then the sums: fused in one loop, the exponential's constants and the sums
  // exceed 16 vector registers and GCC spills the sums, a chain through memory.)
  if constexpr (CC == 1) {
    for (int j = 0; j < nk; ++j) W[j] = exp_nonpos(L[j] - mt);
    T wsum = T(0), v0 = T(0);
    for (int j = 0; j < nk; ++j) {
      wsum += W[j];
      v0 += W[j] * V[j];
    }
    s += wsum;
    acc[0] += v0;
  } else if constexpr (CC == 3) {
    for (int j = 0; j < nk; ++j) W[j] = exp_nonpos(L[j] - mt);
    T wsum = T(0), v0 = T(0), v1 = T(0), v2 = T(0);
    for (int j = 0; j < nk; ++j) {
      const T w = W[j];
      wsum += w;
      v0 += w * V[j];
      v1 += w * V[kKB + j];
      v2 += w * V[2 * kKB + j];
    }
    s += wsum;
    acc[0] += v0;
    acc[1] += v1;
    acc[2] += v2;
  } else {
    T wsum = T(0);
    for (int j = 0; j < nk; ++j) {
      W[j] = exp_nonpos(L[j] - mt);
      wsum += W[j];
    }
    s += wsum;
    for (int c = 0; c < C; ++c) {
      const T* Vc = V + static_cast<int64_t>(c) * kKB;
      T vsum = T(0);
      for (int j = 0; j < nk; ++j) vsum += W[j] * Vc[j];
      acc[c] += vsum;
    }
  }
}

}  // namespace cpu
}  // namespace patchmosaic
