// CUDA glue of linear and linear_backward (kernels: linear.cu, gemm.cuh). Same checks as the CPU
// kernels (common/checks.h). Empty dims need no special case: a GEMM with K = 0 writes zeros (or
// the bias), so grad_weight of an empty batch is zeros, as on CPU.
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
  dispatch_floating(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(linear_forward<T>(x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                     ptr_or_null<T>(b), out.mutable_data_ptr<T>(), s.rows,
                                     s.in_features, s.out_features, current_stream()));
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
  if (mask[0]) grad_input = at::empty(input.sizes(), x.options());
  if (mask[1]) grad_weight = at::empty(weight.sizes(), x.options());
  if (mask[2]) grad_bias = at::empty({out}, x.options());
  const cudaStream_t stream = current_stream();
  dispatch_floating(x.scalar_type(), "linear_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* pg = g.const_data_ptr<T>();
    if (mask[0] && grad_input.numel() > 0) {
      C10_CUDA_CHECK(linear_grad_input<T>(pg, w.const_data_ptr<T>(),
                                          grad_input.mutable_data_ptr<T>(), rows, in, out,
                                          stream));
    }
    if (mask[1] && grad_weight.numel() > 0) {
      Tensor ws = workspace(linear_grad_weight_workspace(rows, in, out), x.scalar_type(), x);
      C10_CUDA_CHECK(linear_grad_weight<T>(pg, x.const_data_ptr<T>(),
                                           grad_weight.mutable_data_ptr<T>(), rows, in, out,
                                           mutable_ptr_or_null<T>(ws), stream));
    }
    if (mask[2] && out > 0) {
      Tensor ws = workspace(channel_sum_workspace(rows, out, 1), at::kDouble, x);
      C10_CUDA_CHECK(channel_sum<T>(pg, rows, out, 1, grad_bias.mutable_data_ptr<T>(),
                                    mutable_ptr_or_null<double>(ws), stream));
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("linear", linear_cuda);
  m.impl("linear_backward", linear_backward_cuda);
}

}  // namespace cuda
}  // namespace pyengine
