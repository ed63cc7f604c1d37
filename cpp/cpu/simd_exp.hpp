// simd_exp.hpp -- the CPU engine's vectorisable form of the clamped exponential (softmax_state.hpp).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "patchmosaic/softmax_state.hpp"

namespace patchmosaic {

// exp(r) on |r| <= ln2 / 2 for a float or a GCC vector of floats: the degree-7 Taylor polynomial (relative
// truncation error < 6e-9), one Horner scheme for the scalar and the vector forms below.
template <typename F>
inline F exp_poly(F r) {
  F p = F{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p;
}

// exp(x) for x <= 0, branch-free so that loops over keys vectorise. Arguments below -ExpCut<float>
// return exactly 0 (see softmax_state.hpp).
inline float exp_nonpos(float x) {
  const float lo = -static_cast<float>(ExpCut<float>::value);
  const float xc = x < lo ? lo : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  // Cody-Waite reduction: r = x - n ln2, |r| <= ln2 / 2
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  const float p = exp_poly(r);
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // n >= -126: a normal float
  const float scale = std::bit_cast<float>(e);
  return x < lo ? 0.0f : p * scale;
}

inline double exp_nonpos(double x) { return x < -ExpCut<double>::value ? 0.0 : std::exp(x); }

// exp_nonpos on a GCC vector of floats (V, e.g. 16 lanes), lane by lane the same arithmetic as the scalar form
// above (so the same values), written with vector operations: the compiler cannot vectorise a loop of scalar
// calls whose lanes sit in a vector already. floor() as truncation corrected by one where it rounded up.
template <typename V>
inline V exp_nonpos_vec(V x) {
  using I = decltype(x < x);  // the lane-wise integer vector of the same width
  const float lo = -static_cast<float>(ExpCut<float>::value);
  const V xc = x < lo ? V{} + lo : x;
  const V y = xc * 1.44269504088896341f + 0.5f;
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {  // 16 floats: floor(y) and p 2^n in one instruction each (the same values: y's
                                    // floor; 2^n is normal for n >= -126, so p 2^n is one rounding of the same product)
    const V nf = (V)_mm512_roundscale_ps((__m512)y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    V r = xc - nf * 0.693145751953125f;
    r = r - nf * 1.42860682030941723212e-6f;
    const V p = exp_poly(r);
    return x < lo ? V{} : (V)_mm512_scalef_ps((__m512)p, (__m512)nf);
  }
#endif
  I n = __builtin_convertvector(y, I);  // truncation toward 0
  V nf = __builtin_convertvector(n, V);
  const I up = nf > y;                  // -1 where truncation rounded up (negative y)
  n += up;
  nf = __builtin_convertvector(n, V);
  V r = xc - nf * 0.693145751953125f;
  r = r - nf * 1.42860682030941723212e-6f;
  const V p = exp_poly(r);
  const I e = (n + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &e, sizeof(V));
  return x < lo ? V{} : p * scale;
}

}  // namespace patchmosaic
