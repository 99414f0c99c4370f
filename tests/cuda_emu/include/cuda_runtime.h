#pragma once
// pyengine's CUDA emulator: the device-side surface of CUDA that csrc/cuda uses (README.md), for
// sources compiled as host C++ after tests/cuda_emu/rewrite.py. Strict where CUDA is strict:
// barriers and warp intrinsics are real rendezvous checked by the runtime (emu.cpp), warpSize
// is not a constant expression, min/max have CUDA's overload set.
#include "cuda_runtime_api.h"  // first: renames __assert_fail before any header declares it

#include <cmath>
#include <cstdint>
#include <cstdio>  // device printf is the host's
#include <cstring>

#include "../emu.h"

// csrc/cuda/device.cuh: launch caps (PE_LAUNCH_CAP) become variables the tests can shrink
// (pe_emu::register_cap) instead of constexpr.
#define PE_CUDA_EMULATION 1

// ---- Qualifiers ---------------------------------------------------------------------------------
// __shared__ is deliberately left undefined: rewrite.py turns every declaration into a per-block
// allocation, and one it missed fails to compile instead of becoming a per-thread variable.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---- Built-in variables: per fiber, set by the scheduler; read-only for kernels ----------------
namespace pe_emu {
namespace detail {
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Builtins builtins;
}  // namespace detail
}  // namespace pe_emu

#define threadIdx (static_cast<const uint3&>(::pe_emu::detail::builtins.thread_idx))
#define blockIdx (static_cast<const uint3&>(::pe_emu::detail::builtins.block_idx))
#define blockDim (static_cast<const dim3&>(::pe_emu::detail::builtins.block_dim))
#define gridDim (static_cast<const dim3&>(::pe_emu::detail::builtins.grid_dim))
// A run-time value in CUDA too (not usable in constant expressions).
extern const int warpSize;

// ---- Barriers and warp intrinsics ---------------------------------------------------------------
namespace pe_emu {
namespace detail {

enum class WarpKind : int { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };

// A block-wide barrier; the call site tells apart barriers that diverging threads reach.
void syncthreads(const char* file, int line);
// The rendezvous of the lanes of `mask`: each lane passes its value's bits (or a predicate) and
// its operand (lane, delta or lane mask); returns this lane's result bits.
uint64_t warp_collective(WarpKind kind, unsigned mask, uint64_t bits, int operand, int width);

template <class T>
T shfl(WarpKind kind, unsigned mask, T var, int operand, int width) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- or 64-bit shuffle");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(kind, mask, bits, operand, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace detail
}  // namespace pe_emu

#define __syncthreads() ::pe_emu::detail::syncthreads(__FILE__, __LINE__)

// The overload set of CUDA's shuffles (no template: arguments convert as they would there).
#define PE_EMU_SHUFFLES(T)                                                                     \
  inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {             \
    return ::pe_emu::detail::shfl(::pe_emu::detail::WarpKind::ShflIdx, mask, var, src_lane,    \
                                  width);                                                      \
  }                                                                                            \
  inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize) {    \
    return ::pe_emu::detail::shfl(::pe_emu::detail::WarpKind::ShflUp, mask, var,               \
                                  static_cast<int>(delta), width);                             \
  }                                                                                            \
  inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize) {  \
    return ::pe_emu::detail::shfl(::pe_emu::detail::WarpKind::ShflDown, mask, var,             \
                                  static_cast<int>(delta), width);                             \
  }                                                                                            \
  inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {        \
    return ::pe_emu::detail::shfl(::pe_emu::detail::WarpKind::ShflXor, mask, var, lane_mask,   \
                                  width);                                                      \
  }
PE_EMU_SHUFFLES(int)
PE_EMU_SHUFFLES(unsigned int)
PE_EMU_SHUFFLES(long)
PE_EMU_SHUFFLES(unsigned long)
PE_EMU_SHUFFLES(long long)
PE_EMU_SHUFFLES(unsigned long long)
PE_EMU_SHUFFLES(float)
PE_EMU_SHUFFLES(double)
#undef PE_EMU_SHUFFLES

inline unsigned int __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned int>(::pe_emu::detail::warp_collective(
      ::pe_emu::detail::WarpKind::Ballot, mask, predicate != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(::pe_emu::detail::warp_collective(::pe_emu::detail::WarpKind::Any, mask,
                                                            predicate != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(::pe_emu::detail::warp_collective(::pe_emu::detail::WarpKind::All, mask,
                                                            predicate != 0, 0, 32));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::pe_emu::detail::warp_collective(::pe_emu::detail::WarpKind::SyncWarp, mask, 0, 0, 32);
}

// ---- Reinterpreting casts -----------------------------------------------------------------------
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof d);
  return d;
}
inline long long __double_as_longlong(double x) {
  long long v;
  std::memcpy(&v, &x, sizeof v);
  return v;
}
inline int __float_as_int(float x) {
  int v;
  std::memcpy(&v, &x, sizeof v);
  return v;
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

// ---- Device math --------------------------------------------------------------------------------
// CUDA declares the float and double overloads in the global namespace (exp(float) is expf);
// the host's libm computes them (CUDA's own ulp bounds are not emulated).
using std::acos;
using std::acosh;
using std::asin;
using std::asinh;
using std::atan;
using std::atan2;
using std::atanh;
using std::cbrt;
using std::ceil;
using std::copysign;
using std::cos;
using std::cosh;
using std::erf;
using std::erfc;
using std::exp;
using std::exp2;
using std::expm1;
using std::fabs;
using std::floor;
using std::fma;
using std::fmax;
using std::fmin;
using std::fmod;
using std::hypot;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log;
using std::log10;
using std::log1p;
using std::log2;
using std::pow;
using std::round;
using std::signbit;
using std::sin;
using std::sinh;
using std::sqrt;
using std::tan;
using std::tanh;
using std::trunc;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rsqrt(float x) { return rsqrtf(x); }

// min / max: CUDA's overload set (crt/math_functions.hpp), mixed signedness included: a signed
// and an unsigned argument compare as unsigned, as there.
#define PE_EMU_MINMAX(R, A, B)                                     \
  inline R min(const A a, const B b) {                             \
    return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
  }                                                                \
  inline R max(const A a, const B b) {                             \
    return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); \
  }
PE_EMU_MINMAX(int, int, int)
PE_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
PE_EMU_MINMAX(unsigned int, int, unsigned int)
PE_EMU_MINMAX(unsigned int, unsigned int, int)
PE_EMU_MINMAX(long, long, long)
PE_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
PE_EMU_MINMAX(unsigned long, long, unsigned long)
PE_EMU_MINMAX(unsigned long, unsigned long, long)
PE_EMU_MINMAX(long long, long long, long long)
PE_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
PE_EMU_MINMAX(unsigned long long, long long, unsigned long long)
PE_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef PE_EMU_MINMAX
// The floating-point ones are fminf / fmin (NaN-ignoring), as CUDA's.
inline float min(const float a, const float b) { return std::fmin(a, b); }
inline double min(const double a, const double b) { return std::fmin(a, b); }
inline double min(const float a, const double b) { return std::fmin(static_cast<double>(a), b); }
inline double min(const double a, const float b) { return std::fmin(a, static_cast<double>(b)); }
inline float max(const float a, const float b) { return std::fmax(a, b); }
inline double max(const double a, const double b) { return std::fmax(a, b); }
inline double max(const float a, const double b) { return std::fmax(static_cast<double>(a), b); }
inline double max(const double a, const float b) { return std::fmax(a, static_cast<double>(b)); }
