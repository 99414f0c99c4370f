#pragma once
// dtype dispatch for kernels: calls f(scalar_t{}) for float32 / float64 (bfloat16 and float16
// arrive as float32: common/low_precision.h) and raises a clear error for anything else. Kernels
// write `[&](auto tag) { using scalar_t = decltype(tag); ... }`.
// (ATen's AT_DISPATCH macros want a compile-time name; this one names the calling operator.)
// dispatch_floating_16bit is the same for kernels with bfloat16 / float16 code of their own (the
// CUDA kernels, registered with PE_KERNEL_NATIVE_16BIT): it also calls f(c10::Half{}) and
// f(c10::BFloat16{}).
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace pyengine {

template <typename F>
void dispatch_floating(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      f(float{});
      break;
    case c10::ScalarType::Double:
      f(double{});
      break;
    case c10::ScalarType::BFloat16:
    case c10::ScalarType::Half:
      // Reached only when a call mixes a 16-bit dtype with another floating dtype: one that
      // does not reaches the kernels as float32 (common/low_precision.h).
      TORCH_CHECK(false, "pyengine.", op, ": expected every floating tensor argument to have one "
                  "dtype, but got a ", dtype, " tensor among tensors of other dtypes");
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "pyengine.", op, ": expected a float32, float64, "
                                  "bfloat16 or float16 tensor, but got ", dtype);
  }
}

template <typename F>
void dispatch_floating_16bit(c10::ScalarType dtype, const char* op, F&& f) {
  if (dtype == c10::ScalarType::Half) {
    f(c10::Half{});
  } else if (dtype == c10::ScalarType::BFloat16) {
    f(c10::BFloat16{});
  } else {
    dispatch_floating(dtype, op, f);  // float, double, or the error for any other dtype
  }
}

}  // namespace pyengine
