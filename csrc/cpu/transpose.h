#pragma once
// The register transposes of the CPU conv2d kernels (the batch-innermost layout's copies, the
// implicit GEMM's channels-last copies and its Y^T -> NCHW store) and of the GEMM's panel packing
// (cpu/gemm.cpp, operands contiguous along k): 16 x 16 floats with AVX-512,
// 8 x 8 with AVX2; the stride-2 column split of the implicit GEMM's phase planes and its inverse
// for one parity (a strided grad_input's phase rows into dX).
// Callers check isa_for(Family::Conv2d) and keep a portable loop for the other levels;
// `transpose` is a blocked transpose of any size and dtype on top of them (the implicit GEMM's
// and the Winograd transforms' layout changes).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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
// The pairs (lo[i], hi[i]) for i < 16 under mask m, as 32-bit words (hi null: zero high halves):
// two rows of 16-bit values merged into the word pairs that bfloat16 dot products and tiles
// multiply (cpu/gemm_bf16.cpp, cpu/conv2d_bf16.cpp).
PE_TARGET_AVX512 inline __m512i merge_rows(const uint16_t* lo, const uint16_t* hi, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo));
  if (!hi) return w;
  return _mm512_or_si512(
      w, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi)), 16));
}
#pragma GCC diagnostic pop

// 8 x 8 float transpose in registers, whole blocks only: d[c * ds + r] = s[r * ss + c]
// (+ add[r]) (+ add_col[c]) for r, c < 8. Three stages: 32-bit interleave, 64-bit shuffles,
// 128-bit lane swaps: 24 shuffles for 8 loads and 8 stores, where the scalar loop moves 64
// elements one by one with a strided access each.
PE_TARGET_AVX2 inline void transpose8(const float* s, int64_t ss, float* d, int64_t ds,
                                      const float* add, const float* add_col = nullptr) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ss);
  for (int i = 0; i < 8; i += 2) {  // per 128-bit lane: columns 0, 1 (lo) or 2, 3 (hi) of
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // rows i, i + 1, interleaved
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[k + m], 128-bit lane L: rows k .. k + 3 of column 4L + m.
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xee);
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xee);
  }
  const __m256 av = add ? _mm256_loadu_ps(add) : _mm256_setzero_ps();
  for (int m = 0; m < 4; ++m) {
    const __m256 col[2] = {_mm256_permute2f128_ps(r[m], r[4 + m], 0x20),   // column m
                           _mm256_permute2f128_ps(r[m], r[4 + m], 0x31)};  // column 4 + m
    for (int L = 0; L < 2; ++L) {
      const int c = 4 * L + m;
      __m256 v = add ? _mm256_add_ps(col[L], av) : col[L];
      if (add_col) v = _mm256_add_ps(v, _mm256_set1_ps(add_col[c]));
      _mm256_storeu_ps(d + c * ds, v);
    }
  }
}

// deinterleave (below) with AVX-512: per 32 columns two loads (masked at the row's end), two
// two-source permutes, two stores. It replaced one strided pass per parity (copy_even: the row
// read twice, a call per row and parity), 11% of a stride-2 3x3 forward (perf, one thread).
PE_TARGET_AVX512 inline void deinterleave16(const float* s, int64_t n, float* even, float* odd) {
  const __m512i pick_even =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i pick_odd =
      _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  int64_t t = 0;
  for (; 2 * t + 32 <= n; t += 16) {
    const __m512 a = _mm512_loadu_ps(s + 2 * t), b = _mm512_loadu_ps(s + 2 * t + 16);
    _mm512_storeu_ps(even + t, _mm512_permutex2var_ps(a, pick_even, b));
    _mm512_storeu_ps(odd + t, _mm512_permutex2var_ps(a, pick_odd, b));
  }
  const int64_t rest = n - 2 * t;  // 0..31 columns left
  if (rest == 0) return;
  const auto first = [](int64_t k) {  // mask of the first k (0..16) lanes
    return static_cast<__mmask16>(k >= 16 ? 0xffffu : (1u << k) - 1u);
  };
  const __m512 a = _mm512_maskz_loadu_ps(first(rest), s + 2 * t);
  const __m512 b = _mm512_maskz_loadu_ps(first(rest > 16 ? rest - 16 : 0), s + 2 * t + 16);
  _mm512_mask_storeu_ps(even + t, first((rest + 1) / 2), _mm512_permutex2var_ps(a, pick_even, b));
  _mm512_mask_storeu_ps(odd + t, first(rest / 2), _mm512_permutex2var_ps(a, pick_odd, b));
}

// The inverse for one parity: d[2 * t] = s[t] for t < n, the odd elements of d untouched
// (masked stores): a stride-2 grad_input's phase row into its dX row (the other column
// phase's task fills the rest). Per 16 values: one load, two permutes, two masked stores; the
// scalar strided loop it replaced was 14% of a stride-2 3x3 64->128 @56 grad_input (perf, two
// threads).
PE_TARGET_AVX512 inline void spread2_16(const float* s, int64_t n, float* d) {
  const __m512i lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  const auto first = [](int64_t k) {  // mask of the first k lanes (k clamped to 0..16)
    return static_cast<__mmask16>(k >= 16 ? 0xffffu : k <= 0 ? 0u : (1u << k) - 1u);
  };
  constexpr __mmask16 kEven = 0x5555;
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t rest = n - t;
    const __m512 v = _mm512_maskz_loadu_ps(first(rest), s + t);
    _mm512_mask_storeu_ps(d + 2 * t, kEven & first(2 * rest), _mm512_permutexvar_ps(lo, v));
    if (rest > 8)
      _mm512_mask_storeu_ps(d + 2 * t + 16, kEven & first(2 * rest - 16),
                            _mm512_permutexvar_ps(hi, v));
  }
}

// even[t] = s[2 * t] for t < (n + 1) / 2 and odd[t] = s[2 * t + 1] for t < n / 2: a row's two
// column parities, the stride-2 phase planes of the implicit GEMM, in one pass (two loads, four
// shuffles, two stores per 16 columns). Per parity, the scalar strided loops it replaces read
// the row twice and ran at a third of a plain padded copy's speed (stride-2 3x3 forward, one
// thread: 1.1 ms of its 13 against 0.34 ms for the copy).
PE_TARGET_AVX2 inline void deinterleave(const float* s, int64_t n, float* even, float* odd) {
  int64_t t = 0;
  for (; 2 * t + 16 <= n; t += 8) {
    const __m256 a = _mm256_loadu_ps(s + 2 * t), b = _mm256_loadu_ps(s + 2 * t + 8);
    // Per 128-bit lane: columns 0, 2 (or 1, 3) of a, then of b; the 64-bit swap orders them.
    const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    constexpr int kOrder = _MM_SHUFFLE(3, 1, 2, 0);
    const __m256d e2 = _mm256_permute4x64_pd(_mm256_castps_pd(e), kOrder);
    const __m256d o2 = _mm256_permute4x64_pd(_mm256_castps_pd(o), kOrder);
    _mm256_storeu_ps(even + t, _mm256_castpd_ps(e2));
    _mm256_storeu_ps(odd + t, _mm256_castpd_ps(o2));
  }
  for (; 2 * t < n; ++t) {
    even[t] = s[2 * t];
    if (2 * t + 1 < n) odd[t] = s[2 * t + 1];
  }
}

// dst[c * ld + r] = src[r * rs + c] (+ add[c] when add is not null) for r < R, c < C, in 16 x 16
// blocks so that both sides stay within a few cache lines (a plain strided loop over a 256-wide
// matrix missed L1 on every element); float blocks in registers with AVX-512. Strips of 16
// destination rows are written start to end, one after the other: the destination (an output
// in NCHW, often not yet in cache) then takes 16 streams of stores at a time. Walking all C rows
// 16 elements at a time made the implicit GEMM's Y^T -> NCHW store 1.6 ms of a 9 ms stride-2 3x3
// forward (128 channels, one thread); this order, 0.4 ms.
template <typename T>
inline void transpose(int64_t R, int64_t C, const T* src, int64_t rs, T* dst, int64_t ld,
                      const T* add) {
  constexpr int64_t kB = 16;
  static const Isa isa = isa_for(Family::Conv2d);
  for (int64_t c0 = 0; c0 < C; c0 += kB)
    for (int64_t r0 = 0; r0 < R; r0 += kB) {
      const int64_t r1 = std::min(R, r0 + kB), c1 = std::min(C, c0 + kB);
      if constexpr (std::is_same_v<T, float>) {
        if (isa == Isa::Avx512) {
          transpose16(src + r0 * rs + c0, rs, r1 - r0, c1 - c0, dst + c0 * ld + r0, ld,
                      nullptr, add ? add + c0 : nullptr);
          continue;
        }
        if (isa == Isa::Avx2 && r1 - r0 == kB && c1 - c0 == kB) {  // four 8 x 8 blocks
          for (int64_t r = r0; r < r1; r += 8)
            for (int64_t c = c0; c < c1; c += 8)
              transpose8(src + r * rs + c, rs, dst + c * ld + r, ld, nullptr,
                         add ? add + c : nullptr);
          continue;
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        const T a = add ? add[c] : T(0);
        T* d = dst + c * ld;
        for (int64_t r = r0; r < r1; ++r) d[r] = src[r * rs + c] + a;
      }
    }
}

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
