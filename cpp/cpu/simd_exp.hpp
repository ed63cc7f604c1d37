// simd_exp.hpp -- the CPU engine's vectorisable form of the clamped exponential (softmax_state.hpp).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "patchmosaic/softmax_state.hpp"

namespace patchmosaic {

// exp(x) for x <= 0, branch-free so that loops over keys vectorise. Arguments below -ExpCut<float>
// return exactly 0 (see softmax_state.hpp).
inline float exp_nonpos(float x) {
  const float lo = -static_cast<float>(ExpCut<float>::value);
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

inline double exp_nonpos(double x) { return x < -ExpCut<double>::value ? 0.0 : std::exp(x); }

}  // namespace patchmosaic
