#pragma once
// What every CUDA glue file (csrc/cuda/*_glue.cpp) shares: the current stream, raw pointers of
// optional tensors, workspaces from the caching allocator, and the launch check. The glue runs
// the shared argument checks (common/checks.h) BEFORE touching the device, so a bad call gets the
// CPU kernel's message, and a device guard is only built on a CUDA tensor.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "common/low_precision.h"
#include "cuda/launchers.h"

namespace pyengine {
namespace cuda {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// A contiguous copy of an optional tensor (undefined when absent).
inline Tensor contiguous_or_undefined(const OptTensor& t) {
  return has(t) ? t->contiguous() : Tensor();
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Scratch memory for a launcher, from torch's caching allocator on the current stream (so it is
// stream-ordered and CUDA-graph capturable). Undefined for a size of 0.
inline Tensor workspace(int64_t elements, at::ScalarType dtype, const Tensor& like) {
  if (elements <= 0) return Tensor();
  return at::empty({elements}, like.options().dtype(dtype));
}

template <typename T>
T* mutable_ptr_or_null(Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

}  // namespace cuda
}  // namespace pyengine
