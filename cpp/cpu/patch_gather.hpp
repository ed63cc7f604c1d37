// patch_gather.hpp -- copy C*k*k patches of an image, zero or circular padded, into a transposed buffer,
// and the adjoint: add a patch's gradient back onto the image.
#pragma once

#include <cstdint>

#include "patchmosaic/patch_geometry.hpp"

namespace patchmosaic {

// A run of L keys centred at (ci, cj), (ci, cj + 1), ..., (ci, cj + L - 1) of one image, written
// transposed: element dd of key l goes to dst[dd * stride + l]. For a fixed dd the L values are
// consecutive pixels of one image row, so away from the borders each dd is one contiguous copy.
// With L = 1 it copies one patch, element dd to dst[dd * stride].
template <typename T>
inline void gather_run(const T* img, int C, int Hs, int Ws, int ci, int cj, int L, int k, int pad, T* dst,
                       int64_t stride) {
  const int r = k / 2;
  const int64_t HW = static_cast<int64_t>(Hs) * Ws;
  int64_t dd = 0;
  for (int c = 0; c < C; ++c) {
    const T* plane = img + c * HW;
    for (int di = 0; di < k; ++di) {
      int y = ci - r + di;
      const bool row_out = y < 0 || y >= Hs;
      if (pad == kPadCircular) y = wrap_index(y, Hs);
      const T* row = plane + static_cast<int64_t>(y) * Ws;
      for (int dj = 0; dj < k; ++dj, ++dd) {
        T* out = dst + dd * stride;
        const int x0 = cj - r + dj;
        if (pad != kPadCircular && row_out) {
          for (int l = 0; l < L; ++l) out[l] = T(0);
        } else if (x0 >= 0 && x0 + L <= Ws) {
          for (int l = 0; l < L; ++l) out[l] = row[x0 + l];
        } else if (pad == kPadCircular) {
          for (int l = 0; l < L; ++l) out[l] = row[wrap_index(x0 + l, Ws)];
        } else {
          for (int l = 0; l < L; ++l) {
            const int x = x0 + l;
            out[l] = (x >= 0 && x < Ws) ? row[x] : T(0);
          }
        }
      }
    }
  }
}

// A masked patch (contract.hpp: the element table elem and its scales, null = all 1) of the image centred at
// (ci, cj): element e of the table, times its scale, to dst[e * stride].
template <typename T>
inline void gather_elements(const T* img, int Hs, int Ws, int ci, int cj, int half, int pad, const int32_t* elem,
                            const double* scale, int n, T* dst, int64_t stride) {
  for (int e = 0; e < n; ++e) {
    const int32_t code = elem[e];
    const int64_t at = element_pixel(Hs, Ws, ci, cj, code_channel(code), code_row(code), code_col(code), half, pad);
    T v = at < 0 ? T(0) : img[at];
    if (scale) v *= static_cast<T>(scale[e]);
    dst[e * stride] = v;
  }
}

// The adjoint of gather_elements: img[pixel of element e] += scale * elem_scale[e] * g[e].
inline void scatter_elements(double* img, int Hs, int Ws, int ci, int cj, int half, int pad, const int32_t* elem,
                             const double* elem_scale, int n, const double* g, double scale) {
  for (int e = 0; e < n; ++e) {
    const int32_t code = elem[e];
    const int64_t at = element_pixel(Hs, Ws, ci, cj, code_channel(code), code_row(code), code_col(code), half, pad);
    const double f = elem_scale ? scale * elem_scale[e] : scale;  // (as scatter_patch without scales)
    if (at >= 0) img[at] += f * g[e];
  }
}

// The adjoint of gather_run with L = 1: img[pixel of element dd] += scale * g[dd] for every element of the
// patch centred at (ci, cj) that reads a pixel (zero-padded elements read none).
inline void scatter_patch(double* img, int C, int Hs, int Ws, int ci, int cj, int k, int pad, const double* g,
                          double scale) {
  const int r = k / 2;
  int dd = 0;
  for (int c = 0; c < C; ++c)
    for (int di = 0; di < k; ++di)
      for (int dj = 0; dj < k; ++dj, ++dd) {
        const int64_t at = element_pixel(Hs, Ws, ci, cj, c, di, dj, r, pad);
        if (at >= 0) img[at] += scale * g[dd];
      }
}

}  // namespace patchmosaic
