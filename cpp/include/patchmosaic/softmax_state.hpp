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

// exp(v) for v <= 0, exactly 0 below -ExpCut<T> (T: the engine's float type, which sets the cut), computed in
// the precision of v (on a device, expf for a float v). The CPU engine uses a vectorisable polynomial with the
// same cut for float (cpu/simd_exp.hpp); this is the scalar definition every engine shares.
template <typename T, typename V>
PM_HD double cut_exp(V v) {
  if (static_cast<double>(v) < -ExpCut<T>::value) return 0.0;
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == 4) return static_cast<double>(expf(v));
  else return exp(v);
#else
  return std::exp(static_cast<double>(v));
#endif
}
template <typename T>
PM_HD double clamped_exp(T v) {
  return cut_exp<T, T>(v);
}

// ---- the fold: one row's online softmax state (m, s, best) and its weighted sums acc (the caller's) ----------
//
// Every engine folds a row's keys the same way: before a key (or a block of keys whose largest logit is `top`)
// counts, the row's maximum is raised to `top` when that is larger, which rescales s and the weighted sums by
// raise_max's factor; then each key adds its weight exp(logit - m) (cut_exp: exactly 0 below the cut) to s and
// weight * value to acc. A block whose top is more than the cut below m adds exactly nothing (block_counts).

// Raise the row's maximum m to `top` when larger: returns the factor for the row's sums (1 when the maximum stays;
// 0 for a row that held no key yet). For callers that hold their sums elsewhere (the CPU same-position engine's
// lanes).
PM_HD double raise_max(double& m, double top) {
  if (!(top > m)) return 1.0;
  const double f = m == -INFINITY ? 0.0 : exp(m - top);
  m = top;
  return f;
}

// The same, rescaling the row's weight sum s (the factor is for its weighted sums).
PM_HD double raise_max(double& m, double& s, double top) {
  const double f = raise_max(m, top);
  s *= f;
  return f;
}

// Whether a block of keys whose largest logit is `top` can add anything to a row of maximum m (T: the engine's
// float type): false when every weight of the block is exactly 0.
template <typename T>
PM_HD bool block_counts(double top, double m) {
  return !(top < m - ExpCut<T>::value);
}

// Fold one key of logit l into the row: raise the maximum if l is larger (`rescale`: the factor for the row's
// weighted sums, 1 if unchanged), add the key's weight to s and return it (0: the key adds nothing; skip its
// value). T sets the cut (the engine's float type), L is the logit's type (the precision of the exponential).
template <typename T, typename L>
PM_HD double fold_key(double& m, double& s, L l, double& rescale) {
  rescale = raise_max(m, s, static_cast<double>(l));
  const double w = cut_exp<T, L>(l - static_cast<L>(m));
  s += w;
  return w;
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
  const double f = raise_max(m, s, mo);  // now m >= mo
  const double h = exp(mo - m);          // 1 where the other state's maximum became the row's
  s += so * h;
  return {f, h};
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
