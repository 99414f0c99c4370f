#pragma once
// Tensor-level pieces of the CPU operators, for the fused operators that chain them
// (cpu/conv2d_relu_max_pool2d.cpp): checked geometry in, contiguous NCHW tensors in and out, no
// output layout (the operator applies torch's at the end).
#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

#include "common/geometry.h"

namespace pyengine {
namespace cpu {

// conv2d (cpu/conv2d.cpp). b undefined: no bias.
at::Tensor conv2d_forward_contiguous(const Conv2dGeometry<int64_t>& g, const at::Tensor& x,
                                     const at::Tensor& w, const at::Tensor& b);
// grad_input, grad_weight, grad_bias where mask asks (undefined elsewhere).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_contiguous(
    const Conv2dGeometry<int64_t>& g, const at::Tensor& dy, const at::Tensor& x,
    const at::Tensor& w, std::array<bool, 3> mask);

// max_pool2d_with_indices into preallocated contiguous output and indices (cpu/pool.cpp).
void max_pool2d_forward_contiguous(const Pool2dGeometry<int64_t>& g, const at::Tensor& x,
                                   at::Tensor& output, at::Tensor& indices);
// grad_input (contiguous, of input_sizes) from contiguous grad_output and indices; an index
// outside its plane raises, naming `op` and the pooled `plane` ("input", ...).
at::Tensor max_pool2d_backward_contiguous(const Pool2dGeometry<int64_t>& g,
                                          const at::Tensor& grad_output,
                                          const at::Tensor& indices, at::IntArrayRef input_sizes,
                                          const char* op, const char* plane);

}  // namespace cpu
}  // namespace pyengine
