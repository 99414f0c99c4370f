#pragma once
// Tensor-level pieces of the CPU operators, for the fused operators that chain them
// (cpu/conv2d_relu_max_pool2d.cpp): checked geometry in, contiguous NCHW tensors in and out, no
// output layout (the operator applies torch's at the end). Tensors share one dtype, float32 or
// float64, but the convolutions' x, which every function here except conv2d_forward_contiguous
// also takes in bfloat16 beside a float32 w (widened where it is copied: cpu/conv2d.h); results
// are in w's dtype.
#include <ATen/core/Tensor.h>

#include <array>
#include <functional>
#include <tuple>

#include "common/geometry.h"

namespace pyengine {
namespace cpu {

// conv2d (cpu/conv2d.cpp). b undefined: no bias.
at::Tensor conv2d_forward_contiguous(const Conv2dGeometry<int64_t>& g, const at::Tensor& x,
                                     const at::Tensor& w, const at::Tensor& b);
// grad_input, grad_weight, grad_bias where mask asks (undefined elsewhere). x's elements are read
// for grad_weight only: without it, x gives its sizes and dtype and may be in any layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_contiguous(
    const Conv2dGeometry<int64_t>& g, const at::Tensor& dy, const at::Tensor& x,
    const at::Tensor& w, std::array<bool, 3> mask);

// The backward of conv2d_max_pool2d_relu_fused's geometries from the pooled gradient (relu's
// step applied: contiguous, of w's dtype) and the pooling's indices, unpooled straight into the
// batch-innermost kernel's layout; the gradients conv2d_backward_contiguous would give on the
// unpooled image, into grads. False (grads untouched) for other geometries, and at an index
// that is not one of its window's taps (the general unpooling handles, or names, it).
bool conv2d_max_pool2d_backward_fused(const Conv2dGeometry<int64_t>& conv,
                                      const Pool2dGeometry<int64_t>& pool,
                                      const at::Tensor& pooled_grad, const at::Tensor& indices,
                                      const at::Tensor& x, const at::Tensor& w,
                                      std::array<bool, 3> mask,
                                      std::tuple<at::Tensor, at::Tensor, at::Tensor>& grads);

// Whether conv2d_backward_contiguous takes grad_weight (and with it grad_bias) from the direct
// kernel for g (LeNet's conv1), which can take its dY image by image: conv2d_weight_grads_direct.
bool conv2d_weight_grad_is_direct(const Conv2dGeometry<int64_t>& g);
// grad_weight and grad_bias (if asked; else undefined) of that kernel, bitwise
// conv2d_backward_contiguous's, with image n's dY written by dy_of(n, image) into a contiguous
// out_channels x out_h x out_w scratch of x's dtype (called from several threads at once).
using Conv2dDyImage = std::function<void(int64_t n, void* dy_image)>;
std::tuple<at::Tensor, at::Tensor> conv2d_weight_grads_direct(const Conv2dGeometry<int64_t>& g,
                                                              const at::Tensor& x,
                                                              const at::Tensor& w, bool bias,
                                                              const Conv2dDyImage& dy_of);

// The gradients (each where mask asks; else undefined) of conv2d followed by relu and
// max_pool2d, from the pooled gradient (grad_output, with relu's step taken from the pooled
// result), the pooling's indices, x and w, summed over the pool's windows (cpu/
// conv2d_pooled_grad.cpp): those conv2d_backward_contiguous gives on the unpooled image, up to
// rounding. grad_input is left undefined where w is not finite (the caller's dense kernels then
// make it). False (grads untouched) where it does not apply: other than float32 on AVX-512, a
// dilated convolution, an image whose patch columns exceed 256 KB, a non-finite x where
// grad_weight is asked, an index outside its plane.
bool conv2d_grads_pooled(const Conv2dGeometry<int64_t>& conv, const Pool2dGeometry<int64_t>& pool,
                         const at::Tensor& grad_output, const at::Tensor& result,
                         const at::Tensor& indices, const at::Tensor& x, const at::Tensor& w,
                         std::array<bool, 3> mask,
                         std::tuple<at::Tensor, at::Tensor, at::Tensor>& grads);

// conv2d, then a 2x2 / stride-2 max_pool2d and relu, into preallocated contiguous output and
// indices, where the convolution runs batch-innermost and the pooling is that one (LeNet's
// conv2 block): the pooling is done before the convolution's output leaves its transposed
// layout. False (nothing written) elsewhere.
bool conv2d_max_pool2d_relu_fused(const Conv2dGeometry<int64_t>& conv,
                                  const Pool2dGeometry<int64_t>& pool, const at::Tensor& x,
                                  const at::Tensor& w, const at::Tensor& b, at::Tensor& output,
                                  at::Tensor& indices);

// Whether conv2d_forward_contiguous computes g on the direct kernel (LeNet's conv1), which can
// hand over its output image by image: conv2d_forward_direct_images (one group only), calling
// done(n, image) with image n's output (out_channels x out_h x out_w contiguous, of w's dtype,
// in a per-thread scratch; from several threads at once) in place of storing it.
bool conv2d_forward_is_direct(const Conv2dGeometry<int64_t>& g);
using Conv2dYImage = std::function<void(int64_t n, const void* y_image)>;
void conv2d_forward_direct_images(const Conv2dGeometry<int64_t>& g, const at::Tensor& x,
                                  const at::Tensor& w, const at::Tensor& b,
                                  const Conv2dYImage& done);

// max_pool2d_with_indices into preallocated contiguous output and indices (cpu/pool.cpp).
void max_pool2d_forward_contiguous(const Pool2dGeometry<int64_t>& g, const at::Tensor& x,
                                   at::Tensor& output, at::Tensor& indices);
// grad_input (contiguous, of input_sizes) from contiguous grad_output and indices; an index
// outside its plane raises, naming `op` and the pooled `plane` ("input", ...).
at::Tensor max_pool2d_backward_contiguous(const Pool2dGeometry<int64_t>& g,
                                          const at::Tensor& grad_output,
                                          const at::Tensor& indices, at::IntArrayRef input_sizes,
                                          const char* op, const char* plane);

// max_pool2d_with_indices of g.planes() contiguous planes (all of g's), single-threaded, on raw
// pointers; bitwise max_pool2d_forward_contiguous's.
template <typename T>
void max_pool2d_forward_planes(const Pool2dGeometry<int64_t>& g, const T* input, T* output,
                               int64_t* indices);

// The same for `planes` contiguous planes, single-threaded, on raw pointers: false at an index
// outside its plane (grad_input then partly written), where max_pool2d_backward_contiguous
// would raise.
template <typename T>
bool max_pool2d_backward_planes(const Pool2dGeometry<int64_t>& g, const T* grad_output,
                                const int64_t* indices, T* grad_input, int64_t planes);

}  // namespace cpu
}  // namespace pyengine
