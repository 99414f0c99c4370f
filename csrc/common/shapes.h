#pragma once
// Window arithmetic shared by the CPU, CUDA and Meta kernels. Torch-free on purpose: CUDA kernels
// include it. The output-size math itself, with its overflow checks, is in checks.h.
#include <cstdint>

#include "macros.h"

namespace pyengine {

// Bound on the padded input (input + 2 * padding) and on the dilated kernel along each axis, which
// the shared checks (checks.h) enforce before any kernel runs. Every window position, start or
// end, then lies in (-2^62, 2^62), so a kernel may add two of them, or a position and an output
// index, in plain int64 arithmetic without overflow. (It is also the most negative value a
// c10::SymInt can hold, -2^62, mirrored.) Strides are not bounded: a stride is only ever
// multiplied by an output index (the product is a window position) or divided by.
constexpr int64_t kMaxExtent = int64_t(1) << 62;

// Length covered by a kernel of `kernel` taps spaced `dilation` apart.
PE_HOST_DEVICE inline int64_t effective_kernel(int64_t kernel, int64_t dilation) {
  return dilation * (kernel - 1) + 1;
}

// ceil(a / b) for a >= 0 and b >= 1, without forming a + b - 1 (b may be a stride near 2^63).
PE_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace pyengine
