#pragma once
// bfloat16 <-> float32 and float16 <-> float32 conversion of dense CPU memory (cpu/convert.cpp):
// the copies of common/low_precision.h, and the fused operators' 16-bit reads and writes.
//
// Measured at LeNet's sizes (batch 64): the bfloat16 overhead of the fused conv1 block on
// float32 copies went from 19 to 14 us (forward) and 25 to 16 us (backward) when these loops
// replaced torch's copy_ (its per-call machinery). Cheaper still is no copy: a bfloat16 relu of
// 75 K elements took 16.5 us as widen + relu + narrow, 8.9 us as cpu/loops.h's one pass with
// the element functions below (float32's relu: 5.5 us).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace pyengine {
namespace cpu {

// dst[i] = float(src[i]) for i < n: exact (a bfloat16 is a float32's high half).
void widen_bf16(const c10::BFloat16* src, float* dst, int64_t n);
// dst[i] = bfloat16(src[i]) for i < n, rounded to nearest even, as torch rounds (NaN stays NaN).
void narrow_bf16(const float* src, c10::BFloat16* dst, int64_t n);

// float16: dst[i] = float(src[i]) (exact), and dst[i] = float16(src[i]) rounded to nearest even
// (overflow to Inf, float16 subnormals kept, NaN stays NaN), as torch converts: F16C's vcvtph2ps /
// vcvtps2ph (AVX-512's on that level), c10's conversions on the baseline.
void widen_f16(const c10::Half* src, float* dst, int64_t n);
void narrow_f16(const float* src, c10::Half* dst, int64_t n);

// The same on one thread (a task's share of a larger loop).
void widen_range(const c10::BFloat16* src, float* dst, int64_t n);
void narrow_range(const float* src, c10::BFloat16* dst, int64_t n);

// The same on one element (the loops' own arithmetic, for code that converts as it goes).
inline float bf16_to_float(c10::BFloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}
inline c10::BFloat16 float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  // Round to nearest even: add 0x7fff plus the kept part's lowest bit, keep the high half.
  // A NaN whose payload fills the low half would carry into the sign (0x7fffffff -> -0): NaNs
  // become the quiet NaN c10 uses. (No operator makes such a NaN from bfloat16 inputs, whose
  // low halves are zero, so the tests cannot reach this select; it keeps the contract whole.)
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// dst[i] = src[i] for i < n, in T: a copy, or bfloat16 widened (the kernels' packing copies,
// which read a bfloat16 input where they copy it anyway, instead of from a float32 copy of it).
template <typename T, typename S>
inline void load_row(T* dst, const S* src, int64_t n) {
  if constexpr (std::is_same_v<T, S>) {
    __builtin_memcpy(dst, src, sizeof(T) * static_cast<size_t>(n));
  } else {
    static_assert(std::is_same_v<S, c10::BFloat16>, "a bfloat16 source, or T itself");
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(bf16_to_float(src[i]));
  }
}

}  // namespace cpu
}  // namespace pyengine
