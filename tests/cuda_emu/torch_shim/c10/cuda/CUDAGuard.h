#pragma once
// Emulation lane stand-in for torch's c10/cuda/CUDAGuard.h (tests/cuda_emu/README.md): the
// emulated device is the host, so a guard has no device to switch. It still insists on what the
// real guard needs: a device the glue took from a tensor.
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    // The lane runs the CUDA glue on CPU tensors: those stand for CUDA ones.
    TORCH_CHECK(device.is_cpu(), "cuda emulation: CUDAGuard on a ", device,
                " tensor; the lane passes CPU tensors");
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
