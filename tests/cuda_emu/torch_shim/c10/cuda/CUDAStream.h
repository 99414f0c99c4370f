#pragma once
// Emulation lane stand-in for torch's c10/cuda/CUDAStream.h: one stream, the emulator's default
// (launches run to completion in order, as on one CUDA stream).
#include <cuda_runtime_api.h>

namespace c10 {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(signed char /*device_index*/ = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
