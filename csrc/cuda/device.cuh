#pragma once
// Device-side helpers shared by pyengine's CUDA kernels: the storage / compute conversions of the
// 16-bit types, launch geometry, grid-stride loops with 64-bit indices, deterministic warp /
// block reductions and device-side asserts. CUDA headers only (no torch), like every .cu here.
//
// The napkin math in csrc/cuda assumes one reference GPU, an H100: ~60 TFLOP/s fp32 FMA peak,
// ~3 TB/s memory bandwidth, 132 SMs of 2048 threads. Achieved figures are not kept in comments:
// the benchmark suite measures them (python -m benchmarks, benchmarks/).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>
#include <cstdio>

// __assert_fail backs PE_DEVICE_CHECK below. glibc's <assert.h> declares it only without NDEBUG
// (and CUDA redeclares it for device code only): declare it as glibc does, as torch's Macros.h.
#ifdef NDEBUG
extern "C" {
#if defined(__CUDA_ARCH__)
__host__ __device__
#endif
    void
    __assert_fail(const char* assertion, const char* file, unsigned int line,
                  const char* function) noexcept __attribute__((__noreturn__));
}
#endif

// PE_LAUNCH_CAP(name, value): an int64 launch cap, one of the shape-independent limits on grids,
// chunks and splits in csrc/cuda (grid-stride grids, tile loops, gridDim.z batches, split-K and
// chunk counts). Only huge tensors reach them on a GPU, so the paths past them would go untested:
// the CUDA emulation lane (tests/cuda_emu; its <cuda_runtime.h> defines PE_CUDA_EMULATION) makes
// each one a variable it can shrink, so small tensors take those paths too. In a CUDA build each
// is a plain constexpr.
#ifdef PE_CUDA_EMULATION
#define PE_LAUNCH_CAP(name, value) \
  inline int64_t name = ::pe_emu::register_cap<int64_t>(&name, #name, value)
#else
#define PE_LAUNCH_CAP(name, value) constexpr int64_t name = value
#endif

#include "cuda/launchers.h"  // compute_t

namespace pyengine {
namespace cuda {

// ---- Storage and compute types ---------------------------------------------------------------
// A kernel templated on its storage type T loads with to_compute() (exact: every 16-bit value is
// a float), computes in compute_t<T> (launchers.h) and stores with from_compute<T>(), which
// rounds to nearest even for the 16-bit types and is the identity for float and double (their
// kernels compute exactly as if the conversions were not there). torch's CUDA build compiles
// with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ (no implicit
// conversions), hence the explicit intrinsics.
__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_compute(compute_t<T> v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_compute<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Threads per block of the elementwise, pooling and reduction kernels.
constexpr int kThreads = 256;
// Grid-stride kernels cap their grid here: 2^16 blocks of 256 threads is ~125 resident waves on
// an H100 (132 SMs x 2048 threads), plenty to saturate memory; larger tensors loop.
PE_LAUNCH_CAP(kMaxBlocks, int64_t(1) << 16);

inline unsigned grid_for(int64_t n, int64_t threads = kThreads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// for (i = global thread id; i < n; i += grid size), in int64: tensors may pass 2^31 elements.
#define PE_GRID_STRIDE_LOOP(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__device__ __forceinline__ T infinity() {
  return static_cast<T>(__longlong_as_double(0x7ff0000000000000LL));
}

// Sum over the 32 lanes of a warp; every lane gets the same value (a + b == b + a exactly), and
// the butterfly's order is fixed: deterministic.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Maximum over the lanes; callers never feed NaN in (their running maxima skip NaN, as the CPU
// kernels' do), so the comparison is symmetric and every lane agrees.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Sum of v over a block of kThreads threads in a fixed tree; the result is valid in thread 0.
// `scratch` holds kThreads values; the function ends with a barrier, so it can be reused.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();
  return total;
}

// Device-side assert that survives NDEBUG, as torch's CUDA_KERNEL_ASSERT: prints the message
// (printf format + arguments), then fails the kernel. The host sees "device-side assert
// triggered" at its next CUDA call, as with torch's own kernels.
#define PE_DEVICE_CHECK(cond, ...)                                                           \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      printf(__VA_ARGS__);                                                                   \
      __assert_fail(#cond, __FILE__, static_cast<unsigned int>(__LINE__), __func__);        \
    }                                                                                        \
  } while (0)

}  // namespace cuda
}  // namespace pyengine
