// CUDA glue of relu, leaky_relu, sigmoid, tanh and their backward passes (kernels:
// activation.cu). Same checks, in the same order, and the same output layouts as
// csrc/cpu/activation.cpp: the kernels run flat over dense storage in the output's order.
#include <torch/library.h>

#include "cuda/glue.h"

namespace pyengine {
namespace cuda {
namespace {

Tensor unary(const Tensor& input, const char* op, Activation act, double slope = 0.0) {
  check_floating(input, op, "input");
  c10::cuda::CUDAGuard guard(input.device());
  Tensor out = empty_elementwise<int64_t>({&input}, input.options());
  const Tensor x = in_order_of(input, out);
  dispatch_floating_16bit(x.scalar_type(), op, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(activation_forward<T>(act, cptr<T>(x), mptr<T>(out),
                                         x.numel(), slope, current_stream()));
  });
  return out;
}

Tensor binary(const Tensor& grad_output, const Tensor& saved, const char* saved_arg,
              const char* op, BackwardLead lead, Activation act, double slope = 0.0) {
  check_elementwise_backward<int64_t>(grad_output, saved, saved_arg, op);
  c10::cuda::CUDAGuard guard(grad_output.device());
  Tensor out = empty_activation_backward<int64_t>(grad_output, saved, lead);
  const Tensor g = in_order_of(grad_output, out);
  const Tensor s = in_order_of(saved, out);
  dispatch_floating_16bit(g.scalar_type(), op, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(activation_backward<T>(act, cptr<T>(g), cptr<T>(s),
                                          mptr<T>(out), g.numel(), slope,
                                          current_stream()));
  });
  return out;
}

Tensor relu_cuda(const Tensor& input) { return unary(input, "relu", Activation::Relu); }
Tensor relu_backward_cuda(const Tensor& grad_output, const Tensor& result) {
  return binary(grad_output, result, "result", "relu_backward", kReluBackwardLead,
                Activation::Relu);
}
Tensor leaky_relu_cuda(const Tensor& input, double negative_slope) {
  return unary(input, "leaky_relu", Activation::LeakyRelu, negative_slope);
}
Tensor leaky_relu_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                double negative_slope) {
  return binary(grad_output, input, "input", "leaky_relu_backward", kLeakyReluBackwardLead,
                Activation::LeakyRelu, negative_slope);
}
Tensor sigmoid_cuda(const Tensor& input) { return unary(input, "sigmoid", Activation::Sigmoid); }
Tensor sigmoid_backward_cuda(const Tensor& grad_output, const Tensor& result) {
  return binary(grad_output, result, "result", "sigmoid_backward", kSigmoidBackwardLead,
                Activation::Sigmoid);
}
Tensor tanh_cuda(const Tensor& input) { return unary(input, "tanh", Activation::Tanh); }
Tensor tanh_backward_cuda(const Tensor& grad_output, const Tensor& result) {
  return binary(grad_output, result, "result", "tanh_backward", kTanhBackwardLead,
                Activation::Tanh);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("relu", PE_KERNEL_NATIVE_16BIT(relu_cuda));
  m.impl("relu_backward", PE_KERNEL_NATIVE_16BIT(relu_backward_cuda));
  m.impl("leaky_relu", PE_KERNEL_NATIVE_16BIT(leaky_relu_cuda));
  m.impl("leaky_relu_backward", PE_KERNEL_NATIVE_16BIT(leaky_relu_backward_cuda));
  m.impl("sigmoid", PE_KERNEL_NATIVE_16BIT(sigmoid_cuda));
  m.impl("sigmoid_backward", PE_KERNEL_NATIVE_16BIT(sigmoid_backward_cuda));
  m.impl("tanh", PE_KERNEL_NATIVE_16BIT(tanh_cuda));
  m.impl("tanh_backward", PE_KERNEL_NATIVE_16BIT(tanh_backward_cuda));
}

}  // namespace cuda
}  // namespace pyengine
