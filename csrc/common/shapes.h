#pragma once
// Output-size math shared by the CPU, CUDA and Meta kernels. Torch-free on purpose: CUDA kernels
// include it, and `Int` may be int64_t (real kernels) or c10::SymInt (Meta kernels under dynamic
// shapes), so only + - * / and comparisons are used.
#include <cstdint>

#include "macros.h"

namespace pyengine {

// Length covered by a kernel of `kernel` taps spaced `dilation` apart.
PE_HOST_DEVICE inline int64_t effective_kernel(int64_t kernel, int64_t dilation) {
  return dilation * (kernel - 1) + 1;
}

// Output length of a convolution along one axis. Callers check first that the effective kernel
// fits in the padded input (`padded_in >= effective_kernel`), so the division never sees a
// negative numerator (int64 and SymInt division differ there).
template <typename Int>
PE_HOST_DEVICE Int conv_out_size(Int in, int64_t kernel, int64_t stride, int64_t padding,
                                 int64_t dilation) {
  return (in + 2 * padding - effective_kernel(kernel, dilation)) / stride + 1;
}

// Output length of a pooling window along one axis, as torch computes it: with ceil_mode a last,
// partial window counts only if it starts inside the input or the left padding.
template <typename Int>
PE_HOST_DEVICE Int pool_out_size(Int in, int64_t kernel, int64_t stride, int64_t padding,
                                 int64_t dilation, bool ceil_mode) {
  Int span = in + 2 * padding - effective_kernel(kernel, dilation);
  Int out = (ceil_mode ? span + (stride - 1) : span) / stride + 1;
  if (ceil_mode && (out - 1) * stride >= in + padding) out = out - 1;
  return out;
}

}  // namespace pyengine
