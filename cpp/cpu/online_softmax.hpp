// online_softmax.hpp -- the exponential and the running (max, sum, weighted values) of one query row.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace patchmosaic {

// exp(x) for x <= 0, branch-free and vectorisable. Arguments below -87 (whose exp would be a float
// denormal, 50-100x slower on this class of CPU) return exactly 0: their weight relative to the
// row's maximum is below 1.7e-38, far under float32 resolution of the sum.
inline float exp_nonpos(float x) {
  const float lo = -87.0f;
  const float xc = x < lo ? lo : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  // Cody-Waite reduction: r = x - n ln2, |r| <= ln2 / 2
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  // degree-7 Taylor polynomial: relative truncation error < 6e-9 on |r| <= 0.347
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // n >= -126: a normal float
  const float scale = std::bit_cast<float>(e);
  return x < lo ? 0.0f : p * scale;
}

inline double exp_nonpos(double x) { return x < -700.0 ? 0.0 : std::exp(x); }

// Running softmax state of one row: the maximum logit seen, the sum of exp(logit - max) and the
// weighted sum of values (both in double, whatever T, so that millions of keys add up exactly
// enough), and the key that holds the maximum (provenance).
struct RowState {
  double m = -std::numeric_limits<double>::infinity();
  double s = 0.0;
  int64_t best = -1;
};

// Merge a block's maximum into the running state; returns the factor that rescales old sums.
inline double rescale_for(RowState& st, double block_max, int64_t block_argmax_key) {
  if (block_max > st.m) {
    const double f = std::isinf(st.m) ? 0.0 : std::exp(st.m - block_max);
    st.m = block_max;
    st.best = block_argmax_key;
    return f;
  }
  return 1.0;
}

// Merge a partial state (m, s, best) into st: returns (f, h), the factors by which st's old sums and
// the partial's sums are rescaled to st's new maximum (st.s is updated; weighted sums are the caller's).
struct MergeFactors { double old_scale, part_scale; };
inline MergeFactors merge_partial(RowState& st, double m, double s, int64_t best) {
  const double f = rescale_for(st, m, best);
  const double h = std::exp(m - st.m);
  st.s = st.s * f + s * h;
  return {f, h};
}

}  // namespace patchmosaic
