#pragma once
// pyengine's CUDA emulator: CUDA's float16 type and the conversions csrc/cuda uses, on the host.
// __half has CUDA's layout (2 bytes, 2-byte aligned, the IEEE binary16 bits); the conversions
// are bit-exact with CUDA's own (cuda_fp16.hpp's host paths, the same results as the device's
// cvt instructions): float -> half rounds to nearest even, overflows to inf (past 65520 in
// magnitude), rounds into and through subnormals, and gives the canonical NaN 0x7fff for any
// NaN; half -> float is exact, a NaN becoming the canonical 0x7fffffff. Proven by the selftest
// case half_conversions (tests/cuda_emu/selftest.cpp). No arithmetic operators: torch's CUDA
// build defines __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_HALF_CONVERSIONS__, so kernels convert
// explicitly, and a missing conversion fails to compile here as there.
#include <cstdint>
#include <cstring>

struct alignas(2) __half_raw {
  unsigned short x;
};

struct alignas(2) __half {
  __half() = default;
  __half(const __half_raw& r) : __x(r.x) {}  // NOLINT: as CUDA's
  operator __half_raw() const { return __half_raw{__x}; }
  unsigned short __x;
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "CUDA's __half layout");

inline __half __float2half_rn(const float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t u = x & 0x7fffffffu;
  uint32_t result, remainder;
  if (u >= 0x7f800000u) {  // inf, NaN
    remainder = 0;
    result = u == 0x7f800000u ? (sign | 0x7c00u) : 0x7fffu;
  } else if (u > 0x477fefffu) {  // rounds to inf (the increment below carries into 0x7c00)
    remainder = 0x80000000u;
    result = sign | 0x7bffu;
  } else if (u >= 0x38800000u) {  // normal
    remainder = u << 19;
    u -= 0x38000000u;
    result = sign | (u >> 13);
  } else if (u < 0x33000001u) {  // rounds to +-0
    remainder = u;
    result = sign;
  } else {  // subnormal
    const uint32_t exponent = u >> 23;
    const uint32_t shift = 0x7eu - exponent;
    const uint32_t mantissa = (u & 0x7fffffu) | 0x800000u;
    remainder = mantissa << (32 - shift);
    result = (sign | (mantissa >> shift)) & 0xffffu;
  }
  if (remainder > 0x80000000u || (remainder == 0x80000000u && (result & 1u) != 0)) ++result;
  __half h;
  h.__x = static_cast<unsigned short>(result);
  return h;
}

inline float __half2float(const __half h) {
  uint32_t sign = (static_cast<uint32_t>(h.__x) >> 15) & 1u;
  uint32_t exponent = (static_cast<uint32_t>(h.__x) >> 10) & 0x1fu;
  uint32_t mantissa = (static_cast<uint32_t>(h.__x) & 0x3ffu) << 13;
  if (exponent == 0x1fu) {  // inf, NaN (canonical, sign dropped)
    sign = mantissa != 0 ? 0 : sign;
    mantissa = mantissa != 0 ? 0x7fffffu : 0;
    exponent = 0xffu;
  } else if (exponent == 0) {  // zero, subnormal: normalise
    if (mantissa != 0) {
      uint32_t msb;
      exponent = 0x71u;
      do {
        msb = mantissa & 0x400000u;
        mantissa <<= 1;
        --exponent;
      } while (msb == 0);
      mantissa &= 0x7fffffu;
    }
  } else {
    exponent += 0x70u;
  }
  const uint32_t u = (sign << 31) | (exponent << 23) | mantissa;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
