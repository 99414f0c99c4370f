#pragma once
// pyengine's CUDA emulator (tests/cuda_emu): the host-side CUDA runtime API that csrc/cuda uses,
// and nothing more. This directory goes first on the include path, shadowing the real headers;
// the definitions live in tests/cuda_emu/emu.cpp.
//
// The functions have C++ linkage (the real ones are C): a process that also loads the real
// libcudart (torch with CUDA) keeps the two apart.

// Device asserts (csrc/cuda/device.cuh) call glibc's __assert_fail; in the emulator they must end
// one emulated thread and abort its grid, never the process. Renamed before anything declares it,
// so that <assert.h> included later declares (and its assert() calls) the emulator's function.
#define __assert_fail pe_emu_assert_fail
extern "C" void pe_emu_assert_fail(const char* assertion, const char* file, unsigned int line,
                                   const char* function) noexcept __attribute__((__noreturn__));

#include <cstddef>

// The codes csrc/cuda returns, plus those the emulator reports (values as in CUDA's
// driver_types.h).
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The last error of the calling host code, then reset to cudaSuccess; a sticky error (device-side
// assert, launch failure) is returned every time until pe_emu::reset_device().
cudaError_t cudaGetLastError();
// The same without the reset.
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
