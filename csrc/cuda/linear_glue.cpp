// CUDA glue of linear and linear_backward (kernels: linear.cu, gemm.cuh). Same checks as the CPU
// kernels (common/checks.h). Empty dims need no special case: a GEMM with K = 0 writes zeros (or
// the bias), so grad_weight of an empty batch is zeros, as on CPU. Gradients have torch's layout
// (common/layout.h): the kernels write contiguous results, so a column-major gradient is computed
// into a contiguous buffer and copied.
#include <torch/library.h>

#include "cuda/glue.h"

namespace pyengine {
namespace cuda {
namespace {

Tensor linear_cuda(const Tensor& input, const Tensor& weight, const OptTensor& bias) {
  const auto s = check_linear<int64_t>(input, weight, bias);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b = contiguous_or_undefined(bias);
  Tensor out = at::empty(s.output_sizes, x.options());
  if (out.numel() == 0) return out;
  dispatch_floating_16bit(x.scalar_type(), "linear", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(linear_forward<T>(cptr<T>(x), cptr<T>(w), ptr_or_null<T>(b), mptr<T>(out),
                                     s.rows, s.in_features, s.out_features, current_stream()));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_backward_cuda(const Tensor& grad_output,
                                                        const Tensor& input, const Tensor& weight,
                                                        std::array<bool, 3> mask) {
  const auto s = check_linear_backward<int64_t>(grad_output, input, weight);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor g = grad_output.contiguous();
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  const int64_t rows = s.rows, in = s.in_features, out = s.out_features;
  Tensor grad_input, grad_weight, grad_bias;
  if (mask[0])
    grad_input = empty_with_layout<int64_t>(
        input.sizes(), linear_grad_input_layout<int64_t>(input, rows, in, mask[1]), x.options());
  if (mask[1])
    grad_weight = empty_with_layout<int64_t>(
        weight.sizes(), linear_grad_weight_layout<int64_t>(weight), x.options());
  if (mask[2]) grad_bias = at::empty({out}, x.options());
  auto contiguous_buffer = [](const Tensor& t) {
    return !t.defined() || t.is_contiguous() ? t : at::empty(t.sizes(), t.options());
  };
  Tensor gi = contiguous_buffer(grad_input), gw = contiguous_buffer(grad_weight);
  const cudaStream_t stream = current_stream();
  dispatch_floating_16bit(x.scalar_type(), "linear_backward", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    const T* pg = cptr<T>(g);
    if (mask[0] && gi.numel() > 0) {
      C10_CUDA_CHECK(linear_grad_input<T>(pg, cptr<T>(w), mptr<T>(gi), rows, in, out, stream));
    }
    if (mask[1] && gw.numel() > 0) {
      Tensor ws = workspace(linear_grad_weight_workspace(rows, in, out),
                            compute_dtype(x.scalar_type()), x);
      C10_CUDA_CHECK(linear_grad_weight<T>(pg, cptr<T>(x), mptr<T>(gw), rows, in, out,
                                           mutable_ptr_or_null<compute_t<T>>(ws), stream));
    }
    if (mask[2] && out > 0) {
      Tensor ws = workspace(channel_sum_workspace(rows, out, 1), at::kDouble, x);
      C10_CUDA_CHECK(channel_sum<T>(pg, rows, out, 1, mptr<T>(grad_bias),
                                    mutable_ptr_or_null<double>(ws), stream));
    }
  });
  if (gi.defined() && !gi.is_same(grad_input)) grad_input.copy_(gi);
  if (gw.defined() && !gw.is_same(grad_weight)) grad_weight.copy_(gw);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("linear", PE_KERNEL_NATIVE_16BIT(linear_cuda));
  m.impl("linear_backward", PE_KERNEL_NATIVE_16BIT(linear_backward_cuda));
}

}  // namespace cuda
}  // namespace pyengine
