#pragma once
// Tensor-level pieces of the CUDA glue, for the fused operators that chain them
// (conv2d_relu_max_pool2d_glue.cpp): checked geometry in, contiguous NCHW tensors on the current
// device in and out (the caller holds the device guard), no output layout.
#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

#include "common/geometry.h"

namespace pyengine {
namespace cuda {

// conv2d (conv2d_glue.cpp). The kernels index a filter's taps in int32: check first.
void check_taps_fit_int32(const Conv2dGeometry<int64_t>& g);
at::Tensor conv2d_forward_contiguous(const Conv2dGeometry<int64_t>& g, const at::Tensor& x,
                                     const at::Tensor& w, const at::Tensor& b);
// The output unrounded, in the compute dtype (float32 for bfloat16 / float16 inputs): the fused
// operator's intermediate, which the CPU operator keeps in float32.
at::Tensor conv2d_forward_contiguous_unrounded(const Conv2dGeometry<int64_t>& g,
                                               const at::Tensor& x, const at::Tensor& w,
                                               const at::Tensor& b);
// go in x's dtype, or unrounded in the compute dtype (the fused operator's); results in x's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_contiguous(
    const Conv2dGeometry<int64_t>& g, const at::Tensor& go, const at::Tensor& x,
    const at::Tensor& w, std::array<bool, 3> mask);

// max_pool2d (pool_glue.cpp); indices may be null (max_pool2d without them). x is in output's
// dtype, or unrounded in its compute dtype (the fused operator's intermediate).
void max_pool2d_forward_contiguous(const Pool2dGeometry<int64_t>& g, const at::Tensor& x,
                                   at::Tensor& output, at::Tensor* indices, const char* op);
// The gradient in go's dtype, or with `unrounded` in its compute dtype (for the fused operator).
at::Tensor max_pool2d_backward_contiguous(const Pool2dGeometry<int64_t>& g,
                                          const at::Tensor& go, const at::Tensor& ix,
                                          at::IntArrayRef input_sizes, bool unrounded = false);

}  // namespace cuda
}  // namespace pyengine
