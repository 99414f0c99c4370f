#pragma once
// dtype dispatch for kernels: calls f(scalar_t{}) for float32 / float64 and raises a clear error
// for anything else. Kernels write `[&](auto tag) { using scalar_t = decltype(tag); ... }`.
// (ATen's AT_DISPATCH macros want a compile-time name; this one names the calling operator.)
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
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "pyengine.", op, ": expected a float32 or float64 "
                                  "tensor, but got ", dtype);
  }
}

}  // namespace pyengine
