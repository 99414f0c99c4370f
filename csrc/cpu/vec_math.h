#pragma once
// Branch-free elementary functions for CPU kernels: written so that a loop calling them
// vectorizes (no libm call, no data-dependent branch), for whatever level (cpu/isa.h) the loop is
// compiled for.
//
// fast_exp is the one exp of every CPU kernel (softmax, log_softmax, cross_entropy, sigmoid, tanh
// below AVX-512, whose own kernel is a table of polynomials;
// fast_exp_nonpositive is the same for arguments that cannot overflow):
// range reduction to r in [-ln2/2, ln2/2], a Taylor polynomial (degree 7 for float, 13 for
// double), scaling by 2^n through the exponent bits. Its error against exp computed in higher
// precision (float: every float in [lo, hi] against double; double: 5e7 random arguments in
// [lo, hi] against long double) is at most 1.22 ulp (float) and 1.19 ulp (double) built for the
// baseline, 0.94 and 0.89 ulp where FMA contracts the polynomial (the AVX2 and AVX-512 builds).
// Below lo it returns 0 (exp(lo) is 3.5e-38 for float, 7.0e-308 for double): no denormal is
// produced, as result or intermediate.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/isa.h"

namespace pyengine {

// ---- exp ------------------------------------------------------------------------------------

template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  using I = int32_t;
  // below: 0 (exp(lo) = 3.5e-38, near the normal range's end; n >= -124 above it)
  static constexpr float lo = -86.25f;
  static constexpr float hi = 88.75f;  // above: inf (exp overflows from 88.72)
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // ln2 = ln2_hi + ln2_lo, n * ln2_hi exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr int mant = 23, bias = 127;
};
template <>
struct ExpConst<double> {
  using I = int64_t;
  static constexpr double lo = -707.25;  // exp(lo) = 7.0e-308; n >= -1020 above it
  static constexpr double hi = 709.8;   // exp overflows from 709.78
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mant = 52, bias = 1023;
};

template <typename T>
PE_INLINE T poly_exp(T r);  // e^r for |r| <= ln2 / 2
template <>
PE_INLINE float poly_exp(float r) {
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}
template <>
PE_INLINE double poly_exp(double r) {
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r + 1.0;
}

// exp(x) for x <= hi, the work of fast_exp without the overflow side: NaN -> NaN, -inf (and
// x < lo) -> 0. The kernels' arguments are mostly never positive (exp(x - max) in softmax and
// cross_entropy, exp(-|x|) in sigmoid, exp(log_softmax)), and dropping the overflow clamp and
// select makes the vectorized sigmoid loop ~1.4x faster (measured: 150K floats, one core,
// AVX-512 build). Results are bitwise fast_exp's.
template <typename T>
PE_INLINE T fast_exp_nonpositive(T x) {
  using C = ExpConst<T>;
  using I = typename C::I;
  const T xc = x >= C::lo ? x : C::lo;  // also maps NaN to lo: no NaN reaches the integer math
  const T t = xc * C::log2e + C::magic;
  const T n = t - C::magic;  // round(xc * log2(e))
  const I ni = std::bit_cast<I>(t) - std::bit_cast<I>(C::magic);
  const T r = (xc - n * C::ln2_hi) - n * C::ln2_lo;
  // 2^n as 2^(n-1) * 2, so that n = bias + 1 (exp just below overflow) stays representable. lo
  // keeps n - 1 above the smallest normal exponent: the intermediate is never a denormal.
  const T half_scale = std::bit_cast<T>(static_cast<I>((ni - 1 + C::bias) << C::mant));
  T y = (poly_exp(r) * half_scale) * T(2);
  y = x < C::lo ? T(0) : y;
  return x != x ? x : y;
}

// exp(x) for any x: NaN -> NaN, -inf (and x < lo) -> 0, +inf (and x > hi) -> inf.
// (fast_exp_nonpositive passes NaN through; one compare serves both selects: ~1.25x faster than
// clamping to [lo, hi] first, measured on g - exp(y) * s over 128K floats, one core.)
template <typename T>
PE_INLINE T fast_exp(T x) {
  using C = ExpConst<T>;
  const bool overflows = x > C::hi;
  const T y = fast_exp_nonpositive(overflows ? C::hi : x);
  return overflows ? std::numeric_limits<T>::infinity() : y;
}

// ---- log ------------------------------------------------------------------------------------

// log(s) for s >= 1 or NaN (NaN -> NaN), in double: the log of a sum of exp(x_j - max), which
// holds the term exp(0) = 1 (cross_entropy's column kernels, whose lanes each need one log, where
// std::log would be a scalar libm call per lane). s = 2^e f with f in (sqrt(1/2), sqrt(2)], then
// log f = 2 atanh(r), r = (f - 1) / (f + 1), |r| <= 0.1716, by its odd series through r^21 (the
// next term is below 2^-56 relative), and e ln2 added in two parts (e * kLn2Hi exact); +inf is
// outside the domain (a sum of at most C terms <= 1 is finite). Error against long double: at
// most 2.0 ulp over 2e7 arguments (random in [1, 31], just above 1, and log-uniform up to
// 2^1000), the worst just above 1, where r's division rounds.
PE_INLINE double log_at_least_one(double s) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // fdlibm's split: e * kLn2Hi exact
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr uint64_t kMantissa = (uint64_t(1) << 52) - 1;
  constexpr uint64_t kOne = uint64_t(1023) << 52;
  const uint64_t bits = std::bit_cast<uint64_t>(s);
  // The exponent field as a double through 2^52's mantissa, not an int64 -> double conversion:
  // AVX2 has none for vectors, and GCC then left cross_entropy's loop of per-lane logs scalar
  // (perf: 15% of an 8 x 21 x 64 x 64 forward on a Zen 3). Exact either way.
  constexpr uint64_t kTwo52 = uint64_t(0x433) << 52;  // 2^52
  double e = (std::bit_cast<double>((bits >> 52) | kTwo52) - 4503599627370496.0) - 1023.0;
  double f = std::bit_cast<double>((bits & kMantissa) | kOne);  // [1, 2)
  const bool high = f > 1.4142135623730951;
  f = high ? f * 0.5 : f;
  e = high ? e + 1.0 : e;
  const double r = (f - 1.0) / (f + 1.0);
  const double r2 = r * r;
  // 2 atanh(r) = 2r (1 + r^2/3 + r^4/5 + ... + r^20/21)
  double p = 1.0 / 21;
  p = p * r2 + 1.0 / 19;
  p = p * r2 + 1.0 / 17;
  p = p * r2 + 1.0 / 15;
  p = p * r2 + 1.0 / 13;
  p = p * r2 + 1.0 / 11;
  p = p * r2 + 1.0 / 9;
  p = p * r2 + 1.0 / 7;
  p = p * r2 + 1.0 / 5;
  p = p * r2 + 1.0 / 3;
  const double log_f = 2.0 * r + 2.0 * r * (r2 * p);
  const double y = e * kLn2Hi + (e * kLn2Lo + log_f);
  return s != s ? s : y;
}

}  // namespace pyengine
