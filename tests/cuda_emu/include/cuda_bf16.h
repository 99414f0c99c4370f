#pragma once
// pyengine's CUDA emulator: CUDA's bfloat16 type and the conversions csrc/cuda uses, on the host.
// __nv_bfloat16 has CUDA's layout (2 bytes, 2-byte aligned, the upper half of a float's bits);
// the conversions are bit-exact with CUDA's (cuda_bf16.hpp's host paths, the device's cvt):
// float -> bfloat16 rounds to nearest even (subnormals included; past the largest finite value
// to inf), any NaN gives the canonical 0x7fff; bfloat16 -> float is exact (the bits shifted).
// Proven by the selftest case bf16_conversions (tests/cuda_emu/selftest.cpp). No arithmetic
// operators (__CUDA_NO_BFLOAT16_CONVERSIONS__ in torch's CUDA build: kernels convert explicitly).
#include <cstdint>
#include <cstring>

#include "cuda_fp16.h"  // as CUDA's <cuda_bf16.h>

struct alignas(2) __nv_bfloat16_raw {
  unsigned short x;
};

struct alignas(2) __nv_bfloat16 {
  __nv_bfloat16() = default;
  __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}  // NOLINT: as CUDA's
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
  unsigned short __x;
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2,
              "CUDA's __nv_bfloat16 layout");

inline __nv_bfloat16 __float2bfloat16_rn(const float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  __nv_bfloat16 b;
  if ((x & 0x7fffffffu) > 0x7f800000u) {  // NaN
    b.__x = 0x7fffu;
    return b;
  }
  const uint32_t remainder = x << 16;
  uint32_t result = x >> 16;
  if (remainder > 0x80000000u || (remainder == 0x80000000u && (result & 1u) != 0)) ++result;
  b.__x = static_cast<unsigned short>(result);
  return b;
}

inline float __bfloat162float(const __nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.__x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
