#pragma once
// The 16 x 16 float transpose of the CPU conv2d kernels (the batch-innermost layout's copies,
// the implicit GEMM's channels-last copies and its Y^T -> NCHW store), AVX-512 only: callers
// check isa_for(Family::Conv2d) and keep a portable loop for the other levels.
#include <immintrin.h>

#include <cstdint>

#include "cpu/isa.h"

namespace pyengine {
namespace cpu {
namespace conv2d {

// 16 x 16 float transpose in registers: d[c * ds + r] = s[r * ss + c] (+ add[r]) (+ add_col[c])
// for r < nr, c < nc (partial blocks masked). Three stages: 32-bit interleave, 64-bit interleave, 128-bit lane shuffles (twice).
// (GCC 12 flags its own _mm512_undefined_ps inside the unpack intrinsics as uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
PE_TARGET_AVX512 inline void transpose16(const float* s, int64_t ss, int64_t nr, int64_t nc,
                                         float* d, int64_t ds, const float* add,
                                         const float* add_col = nullptr) {
  const __mmask16 cm = static_cast<__mmask16>(nc == 16 ? 0xffffu : (1u << nc) - 1u);
  const __mmask16 rm = static_cast<__mmask16>(nr == 16 ? 0xffffu : (1u << nr) - 1u);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < nr ? _mm512_maskz_loadu_ps(cm, s + i * ss) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    const __m512d a = _mm512_castps_pd(t[k]), b = _mm512_castps_pd(t[k + 1]);
    const __m512d c = _mm512_castps_pd(t[k + 2]), e = _mm512_castps_pd(t[k + 3]);
    r[k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  // r[4k + m], 128-bit lane L: rows 4k..4k+3 of column 4L + m.
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);
    t[8 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
  }
  const __m512 av = add ? _mm512_maskz_loadu_ps(rm, add) : _mm512_setzero_ps();
  for (int m = 0; m < 4; ++m) {
    const __m512 col[4] = {_mm512_shuffle_f32x4(t[m], t[8 + m], 0x88),       // column m
                           _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0x88),  // column 4 + m
                           _mm512_shuffle_f32x4(t[m], t[8 + m], 0xdd),       // column 8 + m
                           _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0xdd)};  // column 12 + m
    for (int L = 0; L < 4; ++L) {
      const int c = 4 * L + m;
      if (c >= nc) continue;
      __m512 v = add ? _mm512_add_ps(col[L], av) : col[L];
      if (add_col) v = _mm512_add_ps(v, _mm512_set1_ps(add_col[c]));
      _mm512_mask_storeu_ps(d + c * ds, rm, v);
    }
  }
}
#pragma GCC diagnostic pop

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
