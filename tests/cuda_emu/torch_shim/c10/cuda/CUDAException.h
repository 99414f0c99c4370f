#pragma once
// Emulation lane stand-in for torch's c10/cuda/CUDAException.h: C10_CUDA_CHECK raises what torch
// raises (a RuntimeError "CUDA error: <message>"), with the emulator's account of what happened
// (a deadlock, a divergent barrier, a device assert: tests/cuda_emu/emu.h) appended.
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <string>

#include "emu.h"

#define C10_CUDA_CHECK(EXPR)                                                                 \
  do {                                                                                       \
    const cudaError_t pe_emu_err = (EXPR);                                                   \
    if (pe_emu_err != cudaSuccess) {                                                         \
      const std::string pe_emu_detail = ::pe_emu::last_error_message();                      \
      TORCH_CHECK(false, "CUDA error: ", cudaGetErrorString(pe_emu_err),                     \
                  pe_emu_detail.empty() ? "" : " (", pe_emu_detail,                          \
                  pe_emu_detail.empty() ? "" : ")");                                         \
    }                                                                                        \
  } while (0)
