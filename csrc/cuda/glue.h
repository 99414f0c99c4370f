#pragma once
// What every CUDA glue file (csrc/cuda/*_glue.cpp) shares: the current stream, the dtypes'
// storage types and raw pointers (the 16-bit dtypes reach the kernels as __half /
// __nv_bfloat16: PE_KERNEL_NATIVE_16BIT, common/low_precision.h), workspaces from the caching
// allocator, and the launch check. The glue runs
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

// The four dtypes in the kernels' storage types (launchers.h): the dispatch tags of
// dispatch_floating_16bit (common/dispatch.h) are float, double, c10::Half and c10::BFloat16;
// storage_t<tag> is the kernels' T (__half, __nv_bfloat16 for the 16-bit ones, the same bits),
// and cptr<T> / mptr<T> give a tensor's data as T* after torch's dtype check of the tag type.
template <typename Tag>
struct StorageOf {
  using type = Tag;
};
template <>
struct StorageOf<c10::Half> {
  using type = __half;
};
template <>
struct StorageOf<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename Tag>
using storage_t = typename StorageOf<Tag>::type;

template <typename T>
struct TagOf {
  using type = T;
};
template <>
struct TagOf<__half> {
  using type = c10::Half;
};
template <>
struct TagOf<__nv_bfloat16> {
  using type = c10::BFloat16;
};
static_assert(sizeof(__half) == sizeof(c10::Half) && alignof(__half) == alignof(c10::Half),
              "__half and c10::Half share their layout");
static_assert(sizeof(__nv_bfloat16) == sizeof(c10::BFloat16) &&
                  alignof(__nv_bfloat16) == alignof(c10::BFloat16),
              "__nv_bfloat16 and c10::BFloat16 share their layout");

template <typename T>
const T* cptr(const Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr<typename TagOf<T>::type>());
}
template <typename T>
T* mptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr<typename TagOf<T>::type>());
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? cptr<T>(t) : nullptr;
}

// The dtype of a workspace of compute_t values (launchers.h): float32 for the 16-bit dtypes.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

// Scratch memory for a launcher, from torch's caching allocator on the current stream (so it is
// stream-ordered and CUDA-graph capturable). Undefined for a size of 0.
inline Tensor workspace(int64_t elements, at::ScalarType dtype, const Tensor& like) {
  if (elements <= 0) return Tensor();
  return at::empty({elements}, like.options().dtype(dtype));
}

template <typename T>
T* mutable_ptr_or_null(Tensor& t) {
  return t.defined() ? mptr<T>(t) : nullptr;
}

}  // namespace cuda
}  // namespace pyengine
