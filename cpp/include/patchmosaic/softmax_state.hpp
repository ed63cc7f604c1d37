// softmax_state.hpp -- the online softmax that every engine folds and merges: written once, for the
// host and the device.
//
// A running state of one query row is (m, s, best): the largest logit seen, s = sum exp(logit - m), and
// the key holding m (provenance); the weighted sums of values (acc) scale with s and are the caller's.
// Two states merge associatively (flash-attention's rescaling), so key ranges computed apart (CPU work
// items, CUDA thread blocks and lanes, shards) combine exactly, in a fixed order.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PM_HD __host__ __device__ __forceinline__
#else
#define PM_HD inline
#endif

namespace patchmosaic {

// Logits further than this below the row maximum have weight exactly 0 (in float32 their exponential
// would be a denormal, which costs 50-100x on some CPUs and is below float32 resolution of the sum).
template <typename T> struct ExpCut;
template <> struct ExpCut<float> { static constexpr double value = 87.0; };
template <> struct ExpCut<double> { static constexpr double value = 700.0; };

// exp(v) for v <= 0, exactly 0 below -ExpCut<T>. The CPU engine uses a vectorisable polynomial with the
// same cut for float (cpu/simd_exp.hpp); this is the scalar definition both engines share.
template <typename T>
PM_HD double clamped_exp(T v) {
  if (static_cast<double>(v) < -ExpCut<T>::value) return 0.0;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) return static_cast<double>(expf(v));
  else return exp(v);
#else
  return std::exp(static_cast<double>(v));
#endif
}

// The factors by which two states' sums are rescaled when they merge.
struct MergeFactors {
  double self, other;
};

// Merge the state (mo, so) into (m, s): m becomes the larger maximum, s the merged sum; returns the
// factors that rescale the old weighted sums (self) and the other state's (other). A state with
// m = -inf is empty.
PM_HD MergeFactors merge_state(double& m, double& s, double mo, double so) {
  if (mo == -INFINITY) return {1.0, 0.0};
  if (mo > m) {
    const double f = m == -INFINITY ? 0.0 : exp(m - mo);
    m = mo;
    s = s * f + so;
    return {f, 1.0};
  }
  const double h = exp(mo - m);
  s = s + so * h;
  return {1.0, h};
}

// merge_state with provenance: the key of the larger maximum wins; a tie keeps the state's own key
// (the earlier one in the fixed merge order) unless prefer_smaller_key, then the smaller key index wins.
PM_HD MergeFactors merge_state(double& m, double& s, int64_t& best, double mo, double so, int64_t best_other,
                               bool prefer_smaller_key = false) {
  const double m_old = m;
  const MergeFactors f = merge_state(m, s, mo, so);
  if (mo > m_old || (prefer_smaller_key && mo == m_old && best_other >= 0 && (best < 0 || best_other < best)))
    best = best_other;
  return f;
}

}  // namespace patchmosaic
