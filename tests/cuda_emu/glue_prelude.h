#pragma once
// Included before each CUDA glue file (csrc/cuda/*_glue.cpp) in the emulation lane's build
// (tests/cuda_emu/build.py). The glue registers its kernels with
// TORCH_LIBRARY_IMPL(pyengine, CUDA, m); here that registration goes to the CPU key of the
// library `pyengine_emu` instead, so torch.ops.pyengine_emu.<op>(cpu tensors) runs the real glue
// and the real kernels on the emulator, in the same process as pyengine's CPU kernels.
// (The schemas of pyengine_emu are pyengine's own, defined from Python by the lane.)
#include <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(pyengine_emu, CPU, m, C10_UID)
