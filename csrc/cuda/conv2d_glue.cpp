// CUDA glue of conv2d and conv2d_backward (kernels: conv2d.cu, bias gradient: linear.cu's
// channel_sum). Same checks as the CPU kernels (common/checks.h); an unbatched (C, H, W) input is
// a batch of one. Empty dims need no special case: a GEMM with K = 0 writes zeros (or the bias).
// The kernels compute in NCHW; results are copied into channels_last when torch would give
// channels_last (common/layout.h), as on CPU.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cuda/glue.h"
#include "cuda/glue_kernels.h"

namespace pyengine {
namespace cuda {

// The kernels index one filter's taps (channels / groups x kernel_h x kernel_w) in 32 bits.
void check_taps_fit_int32(const Conv2dGeometry<int64_t>& g) {
  const int64_t channels = std::max(g.in_channels, g.out_channels) / g.groups;
  const int64_t taps = channels * g.kernel_pixels();
  TORCH_CHECK(taps <= std::numeric_limits<int32_t>::max(), "pyengine.conv2d: the CUDA kernels "
              "support at most 2^31 - 1 weights per filter (channels / groups * kH * kW), but got ",
              taps);
}

Tensor conv2d_forward_contiguous(const Conv2dGeometry<int64_t>& g, const Tensor& x,
                                 const Tensor& w, const Tensor& b) {
  Tensor out = at::empty(g.output_sizes(), x.options());
  if (out.numel() == 0) return out;
  dispatch_floating_16bit(x.scalar_type(), "conv2d", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(conv2d_forward<T>(cptr<T>(x), cptr<T>(w), ptr_or_null<T>(b), mptr<T>(out), g,
                                     current_stream()));
  });
  return out;
}

Tensor conv2d_forward_contiguous_unrounded(const Conv2dGeometry<int64_t>& g, const Tensor& x,
                                           const Tensor& w, const Tensor& b) {
  Tensor out = at::empty(g.output_sizes(), x.options().dtype(compute_dtype(x.scalar_type())));
  if (out.numel() == 0) return out;
  dispatch_floating_16bit(x.scalar_type(), "conv2d", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(conv2d_forward_to_compute<T>(cptr<T>(x), cptr<T>(w), ptr_or_null<T>(b),
                                                mptr<compute_t<T>>(out), g, current_stream()));
  });
  return out;
}

namespace {

// The three gradients from grad_output pg of type G: T, or compute_t<T> (unrounded).
template <typename T, typename G>
void conv2d_backward_launch(const Conv2dGeometry<int64_t>& g, const G* pg, const Tensor& x,
                            const Tensor& w, Tensor& grad_input, Tensor& grad_weight,
                            Tensor& grad_bias, std::array<bool, 3> mask) {
  constexpr bool kSame = std::is_same_v<G, T>;
  const cudaStream_t stream = current_stream();
  if (mask[0] && grad_input.numel() > 0) {
    Tensor flag = workspace(conv2d_grad_input_workspace(), at::kInt, x);
    if constexpr (kSame) {
      C10_CUDA_CHECK(conv2d_grad_input<T>(pg, cptr<T>(w), mptr<T>(grad_input), g,
                                          mutable_ptr_or_null<int>(flag), stream));
    } else {
      C10_CUDA_CHECK(conv2d_grad_input_from_compute<T>(pg, cptr<T>(w), mptr<T>(grad_input), g,
                                                       mutable_ptr_or_null<int>(flag), stream));
    }
  }
  if (mask[1] && grad_weight.numel() > 0) {
    Tensor ws = workspace(conv2d_grad_weight_workspace(g), compute_dtype(x.scalar_type()), x);
    compute_t<T>* pws = mutable_ptr_or_null<compute_t<T>>(ws);
    if constexpr (kSame) {
      C10_CUDA_CHECK(conv2d_grad_weight<T>(pg, cptr<T>(x), mptr<T>(grad_weight), g, pws, stream));
    } else {
      C10_CUDA_CHECK(conv2d_grad_weight_from_compute<T>(pg, cptr<T>(x), mptr<T>(grad_weight), g,
                                                        pws, stream));
    }
  }
  if (mask[2] && g.out_channels > 0) {
    const int64_t spatial = g.out_pixels();
    Tensor ws = workspace(channel_sum_workspace(g.batch, g.out_channels, spatial), at::kDouble, x);
    double* pws = mutable_ptr_or_null<double>(ws);
    if constexpr (kSame) {
      C10_CUDA_CHECK(channel_sum<T>(pg, g.batch, g.out_channels, spatial, mptr<T>(grad_bias), pws,
                                    stream));
    } else {
      C10_CUDA_CHECK(channel_sum_from_compute<T>(pg, g.batch, g.out_channels, spatial,
                                                 mptr<T>(grad_bias), pws, stream));
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_contiguous(const Conv2dGeometry<int64_t>& g,
                                                              const Tensor& go, const Tensor& x,
                                                              const Tensor& w,
                                                              std::array<bool, 3> mask) {
  Tensor grad_input, grad_weight, grad_bias;
  if (mask[0]) grad_input = at::empty(x.sizes(), x.options());
  if (mask[1]) grad_weight = at::empty(w.sizes(), x.options());
  if (mask[2]) grad_bias = at::empty({g.out_channels}, x.options());
  dispatch_floating_16bit(x.scalar_type(), "conv2d_backward", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    if (go.scalar_type() == x.scalar_type()) {
      conv2d_backward_launch<T>(g, cptr<T>(go), x, w, grad_input, grad_weight, grad_bias, mask);
    } else {
      TORCH_INTERNAL_ASSERT(go.scalar_type() == compute_dtype(x.scalar_type()));
      conv2d_backward_launch<T>(g, cptr<compute_t<T>>(go), x, w, grad_input, grad_weight,
                                grad_bias, mask);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

namespace {

using at::IntArrayRef;

Tensor conv2d_cuda(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                   IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                   int64_t groups) {
  const auto g = check_conv2d<int64_t>(input, weight, bias, stride, padding, dilation, groups);
  check_taps_fit_int32(g);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor out = conv2d_forward_contiguous(g, input.contiguous(), weight.contiguous(),
                                               contiguous_or_undefined(bias));
  return as_image_layout(out, conv2d_channels_last(input, weight));
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cuda(const Tensor& grad_output,
                                                        const Tensor& input, const Tensor& weight,
                                                        IntArrayRef stride, IntArrayRef padding,
                                                        IntArrayRef dilation, int64_t groups,
                                                        std::array<bool, 3> mask) {
  const auto g = check_conv2d_backward<int64_t>(grad_output, input, weight, stride, padding,
                                                dilation, groups);
  check_taps_fit_int32(g);
  c10::cuda::CUDAGuard guard(input.device());
  return conv2d_grads_in_layout(
      conv2d_backward_contiguous(g, grad_output.contiguous(), input.contiguous(),
                                 weight.contiguous(), mask),
      input, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("conv2d", PE_KERNEL_NATIVE_16BIT(conv2d_cuda));
  m.impl("conv2d_backward", PE_KERNEL_NATIVE_16BIT(conv2d_backward_cuda));
}

}  // namespace cuda
}  // namespace pyengine
