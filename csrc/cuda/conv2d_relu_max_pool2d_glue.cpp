// CUDA glue of conv2d_relu_max_pool2d and its backward: conv2d's, max_pool2d's and relu's
// kernels chained, with relu on the pooled maxima and relu's step applied to grad_output before
// the scatter, as csrc/cpu/conv2d_relu_max_pool2d.cpp does (the reasons are there). Same checks
// and output layouts as the CPU kernels.
//
// bfloat16 / float16: the intermediates the CPU operator keeps in float32 stay unrounded in the
// compute dtype here too (float32: the convolution's output, the gradient the pooling scatters
// into the convolution's backward), so the pooling picks its maxima (and indices) among the same
// values and each result is rounded once. The pooled maxima are rounded before relu, which
// commutes with rounding (relu(round(m)) == round(relu(m))). float / double: the compute dtype is
// the dtype itself.
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/glue_kernels.h"

namespace pyengine {
namespace cuda {
namespace {

using at::IntArrayRef;

std::tuple<Tensor, Tensor> conv2d_relu_max_pool2d_cuda(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, IntArrayRef stride,
    IntArrayRef padding, IntArrayRef dilation, int64_t groups, IntArrayRef pool_kernel_size,
    IntArrayRef pool_stride, IntArrayRef pool_padding, IntArrayRef pool_dilation,
    bool pool_ceil_mode) {
  const char* op = "conv2d_relu_max_pool2d";
  const auto s = check_conv2d_relu_max_pool2d<int64_t>(
      input, weight, bias, stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, pool_dilation, pool_ceil_mode);
  check_taps_fit_int32(s.conv);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor conv_out = conv2d_forward_contiguous_unrounded(s.conv, input.contiguous(),
                                                              weight.contiguous(),
                                                              contiguous_or_undefined(bias));
  const std::vector<int64_t> sizes = s.pool.output_sizes();
  Tensor output = at::empty(sizes, input.options());
  Tensor indices = at::empty(sizes, input.options().dtype(at::kLong));
  // relu from one buffer into another (the kernels take __restrict__ pointers: not in place).
  auto relu = [&](const Tensor& from, Tensor& to) {
    dispatch_floating_16bit(from.scalar_type(), op, [&](auto tag) {
      using T = storage_t<decltype(tag)>;
      C10_CUDA_CHECK(activation_forward<T>(Activation::Relu, cptr<T>(from), mptr<T>(to),
                                           from.numel(), 0.0, current_stream()));
    });
  };
  if (output.numel() > 0) {
    if (s.pool.has_empty_window()) {
      // Such a window is -inf, which relu after pooling would make 0: relu first (rare), on the
      // unrounded values; the pooling rounds.
      Tensor relu_out = at::empty(conv_out.sizes(), conv_out.options());
      relu(conv_out, relu_out);
      max_pool2d_forward_contiguous(s.pool, relu_out, output, &indices, op);
    } else {
      // The maxima (rounded), then relu into the output.
      Tensor maxima = at::empty(sizes, input.options());
      max_pool2d_forward_contiguous(s.pool, conv_out, maxima, &indices, op);
      relu(maxima, output);
    }
  }
  const std::vector<int64_t> conv_sizes = s.conv.output_sizes();
  const bool channels_last =
      conv2d_pool2d_channels_last<int64_t>(input, weight, IntArrayRef(conv_sizes));
  return {as_image_layout(output, channels_last), as_image_layout(indices, channels_last)};
}

std::tuple<Tensor, Tensor, Tensor> conv2d_relu_max_pool2d_backward_cuda(
    const Tensor& grad_output, const Tensor& result, const Tensor& indices, const Tensor& input,
    const Tensor& weight, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    int64_t groups, IntArrayRef pool_kernel_size, IntArrayRef pool_stride,
    IntArrayRef pool_padding, IntArrayRef pool_dilation, bool pool_ceil_mode,
    std::array<bool, 3> mask) {
  const char* op = "conv2d_relu_max_pool2d_backward";
  const auto s = check_conv2d_relu_max_pool2d_backward<int64_t>(
      grad_output, result, indices, input, weight, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode);
  check_taps_fit_int32(s.conv);
  if (!mask[0] && !mask[1] && !mask[2]) return {};
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor go = grad_output.contiguous();
  const Tensor r = result.contiguous();
  Tensor pooled_grad = at::empty(go.sizes(), go.options());
  if (go.numel() > 0) {
    dispatch_floating_16bit(go.scalar_type(), op, [&](auto tag) {
      using T = storage_t<decltype(tag)>;
      C10_CUDA_CHECK(activation_backward<T>(Activation::Relu, cptr<T>(go), cptr<T>(r),
                                            mptr<T>(pooled_grad), go.numel(), 0.0,
                                            current_stream()));
    });
  }
  const std::vector<int64_t> conv_sizes = s.conv.output_sizes();
  // Unrounded (the compute dtype): the CPU operator's float32 scatter.
  const Tensor conv_grad = max_pool2d_backward_contiguous(s.pool, pooled_grad,
                                                          indices.contiguous(),
                                                          IntArrayRef(conv_sizes), true);
  return conv2d_grads_in_layout(conv2d_backward_contiguous(s.conv, conv_grad, input.contiguous(),
                                                           weight.contiguous(), mask),
                                input, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("conv2d_relu_max_pool2d", PE_KERNEL_NATIVE_16BIT(conv2d_relu_max_pool2d_cuda));
  m.impl("conv2d_relu_max_pool2d_backward",
         PE_KERNEL_NATIVE_16BIT(conv2d_relu_max_pool2d_backward_cuda));
}

}  // namespace cuda
}  // namespace pyengine
