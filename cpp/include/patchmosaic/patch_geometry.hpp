// patch_geometry.hpp -- where the elements of a C*k*k patch come from, for the host and the device.
//
// Element e of a patch centred at (ci, cj) is channel e / k^2, row ci - k/2 + (e % k^2) / k and column
// cj - k/2 + e % k of the image; outside the image it is 0 (zero padding) or wraps around (circular).
// The element order (channel, row offset, column offset) is the contract of every engine and of the
// patch index's vectors.
#pragma once

#include <cstdint>

#include "contract.hpp"
#include "softmax_state.hpp"  // PM_HD

namespace patchmosaic {

PM_HD int wrap_index(int i, int n) {
  const int m = i % n;
  return m < 0 ? m + n : m;
}

// Patch element e as a code with no divisions left for the gather: channel << 24 | row offset << 12 |
// column offset (offsets in 0..k-1; needs k < 4096 and fewer than 128 channels).
PM_HD int32_t element_code(int e, int k) {
  const int ch = e / (k * k), rem = e % (k * k);
  return (ch << 24) | ((rem / k) << 12) | (rem % k);
}
PM_HD int code_channel(int32_t code) { return code >> 24; }
PM_HD int code_row(int32_t code) { return (code >> 12) & 0xFFF; }
PM_HD int code_col(int32_t code) { return code & 0xFFF; }

// The flat offset (c, y, x) in a (C, Hs, Ws) image of the pixel that patch element (ch, di, dj) of the patch
// centred at (ci, cj) reads, or -1 where zero padding supplies a 0.
PM_HD int64_t element_pixel(int Hs, int Ws, int ci, int cj, int ch, int di, int dj, int half, int pad) {
  int y = ci + di - half, x = cj + dj - half;
  if (y < 0 || y >= Hs || x < 0 || x >= Ws) {
    if (pad != kPadCircular) return -1;
    y = wrap_index(y, Hs);
    x = wrap_index(x, Ws);
  }
  return (static_cast<int64_t>(ch) * Hs + y) * Ws + x;
}

}  // namespace patchmosaic
