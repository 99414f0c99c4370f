// CPU kernels of the elementwise activations (relu, leaky_relu, sigmoid, tanh) and their
// backward passes. The per-element math lives in common/elementwise.h, shared with CUDA.
//
// Napkin math: each op reads one (forward) or two (backward) arrays and writes one, with a few
// flops per element: memory-bound. On this 2-core machine (~20 GB/s) a 1M-float relu moves 8 MB,
// a ~0.4 ms floor; small tensors are dominated by host overhead (see DESIGN.md).
#include <torch/library.h>

#include "common/checks.h"
#include "common/elementwise.h"
#include "cpu/loops.h"

namespace pyengine {
namespace {

using at::Tensor;

Tensor relu_cpu(const Tensor& input) {
  return map_unary(input, "relu", [](auto x) { return relu_fwd(x); });
}
Tensor relu_backward_cpu(const Tensor& grad_output, const Tensor& result) {
  check_elementwise_backward<int64_t>(grad_output, result, "result", "relu_backward");
  return map_binary(grad_output, result, "relu_backward",
                    [](auto g, auto y) { return relu_bwd(g, y); });
}

Tensor leaky_relu_cpu(const Tensor& input, double negative_slope) {
  return map_unary(input, "leaky_relu", [negative_slope](auto x) {
    using T = decltype(x);
    return leaky_relu_fwd(x, static_cast<T>(negative_slope));
  });
}
Tensor leaky_relu_backward_cpu(const Tensor& grad_output, const Tensor& input,
                               double negative_slope) {
  check_elementwise_backward<int64_t>(grad_output, input, "input", "leaky_relu_backward");
  return map_binary(grad_output, input, "leaky_relu_backward", [negative_slope](auto g, auto x) {
    using T = decltype(x);
    return leaky_relu_bwd(g, x, static_cast<T>(negative_slope));
  });
}

Tensor sigmoid_cpu(const Tensor& input) {
  return map_unary(input, "sigmoid", [](auto x) { return sigmoid_fwd(x); });
}
Tensor sigmoid_backward_cpu(const Tensor& grad_output, const Tensor& result) {
  check_elementwise_backward<int64_t>(grad_output, result, "result", "sigmoid_backward");
  return map_binary(grad_output, result, "sigmoid_backward",
                    [](auto g, auto y) { return sigmoid_bwd(g, y); });
}

Tensor tanh_cpu(const Tensor& input) {
  return map_unary(input, "tanh", [](auto x) { return tanh_fwd(x); });
}
Tensor tanh_backward_cpu(const Tensor& grad_output, const Tensor& result) {
  check_elementwise_backward<int64_t>(grad_output, result, "result", "tanh_backward");
  return map_binary(grad_output, result, "tanh_backward",
                    [](auto g, auto y) { return tanh_bwd(g, y); });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("relu", relu_cpu);
  m.impl("relu_backward", relu_backward_cpu);
  m.impl("leaky_relu", leaky_relu_cpu);
  m.impl("leaky_relu_backward", leaky_relu_backward_cpu);
  m.impl("sigmoid", sigmoid_cpu);
  m.impl("sigmoid_backward", sigmoid_backward_cpu);
  m.impl("tanh", tanh_cpu);
  m.impl("tanh_backward", tanh_backward_cpu);
}

}  // namespace pyengine
