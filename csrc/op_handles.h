#pragma once
// pyengine's operators as C++ sees them: the one list of their C++ signatures, and a typed
// dispatcher handle for each (the schemas themselves: csrc/ops.cpp). Everything C++ that is done
// once per operator is generated from these lists:
//
//   name##_op()        the typed handle (below); autograd calls through it;
//   pyengine._C.name   the eager fast path for each forward op (csrc/python.cpp): a pybind11
//                      entry that enters the dispatcher directly, without torch.ops' Python-side
//                      argument parsing, which is what makes an eager call cheap;
//   Autograd kernels   name##_autograd for each forward op, autograd's "not implemented" kernel
//                      for each backward op (csrc/autograd.cpp).
//
// Adding an operator: its schema in csrc/ops.cpp, one line here (a signature that does not
// match the schema fails at load, in .typed<>()), its name##_autograd function if it is a forward
// op, its kernels, and its samples in tests/samples.py. tests/test_registry.py fails until every
// schema has all of them.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace pyengine {

using at::IntArrayRef;
using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Mask3 = std::array<bool, 3>;

// X(name, signature): one entry per operator, the signature a C++ function type whose argument
// names are the schema's. (Return types are the one-word aliases above: a macro argument may hold
// commas only inside parentheses.)
#define PYENGINE_FORWARD_OPS(X)                                                               \
  X(conv2d, Tensor(const Tensor& input, const Tensor& weight, const OptTensor& bias,           \
                   IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,               \
                   int64_t groups))                                                             \
  X(max_pool2d, Tensor(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,       \
                       IntArrayRef padding, IntArrayRef dilation, bool ceil_mode))              \
  X(max_pool2d_with_indices,                                                                  \
    Tensor2(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,                  \
            IntArrayRef padding, IntArrayRef dilation, bool ceil_mode))                        \
  X(conv2d_relu_max_pool2d,                                                                   \
    Tensor2(const Tensor& input, const Tensor& weight, const OptTensor& bias,                  \
            IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,      \
            IntArrayRef pool_kernel_size, IntArrayRef pool_stride, IntArrayRef pool_padding,    \
            IntArrayRef pool_dilation, bool pool_ceil_mode))                                    \
  X(linear, Tensor(const Tensor& input, const Tensor& weight, const OptTensor& bias))          \
  X(relu, Tensor(const Tensor& input))                                                        \
  X(leaky_relu, Tensor(const Tensor& input, double negative_slope))                           \
  X(sigmoid, Tensor(const Tensor& input))                                                     \
  X(tanh, Tensor(const Tensor& input))                                                        \
  X(softmax, Tensor(const Tensor& input, int64_t dim))                                        \
  X(log_softmax, Tensor(const Tensor& input, int64_t dim))                                    \
  X(mse_loss, Tensor(const Tensor& input, const Tensor& target, const OptTensor& weight,       \
                     int64_t reduction))                                                        \
  X(binary_cross_entropy, Tensor(const Tensor& input, const Tensor& target,                   \
                                 const OptTensor& weight, int64_t reduction))                  \
  X(cross_entropy, Tensor(const Tensor& input, const Tensor& target, const OptTensor& weight,  \
                          int64_t reduction, int64_t ignore_index, double label_smoothing))   \
  X(cross_entropy_with_log_sum_exp,                                                           \
    Tensor2(const Tensor& input, const Tensor& target, const OptTensor& weight,                \
            int64_t reduction, int64_t ignore_index, double label_smoothing))

#define PYENGINE_BACKWARD_OPS(X)                                                              \
  X(conv2d_backward, Tensor3(const Tensor& grad_output, const Tensor& input,                   \
                             const Tensor& weight, IntArrayRef stride, IntArrayRef padding,     \
                             IntArrayRef dilation, int64_t groups, Mask3 output_mask))          \
  X(max_pool2d_backward,                                                                      \
    Tensor(const Tensor& grad_output, const Tensor& input, const Tensor& indices,              \
           IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,                   \
           IntArrayRef dilation, bool ceil_mode))                                              \
  X(conv2d_relu_max_pool2d_backward,                                                          \
    Tensor3(const Tensor& grad_output, const Tensor& result, const Tensor& indices,            \
            const Tensor& input, const Tensor& weight, IntArrayRef stride,                     \
            IntArrayRef padding, IntArrayRef dilation, int64_t groups,                         \
            IntArrayRef pool_kernel_size, IntArrayRef pool_stride, IntArrayRef pool_padding,    \
            IntArrayRef pool_dilation, bool pool_ceil_mode, Mask3 output_mask))                 \
  X(linear_backward, Tensor3(const Tensor& grad_output, const Tensor& input,                   \
                             const Tensor& weight, Mask3 output_mask))                          \
  X(relu_backward, Tensor(const Tensor& grad_output, const Tensor& result))                   \
  X(leaky_relu_backward,                                                                      \
    Tensor(const Tensor& grad_output, const Tensor& input, double negative_slope))             \
  X(sigmoid_backward, Tensor(const Tensor& grad_output, const Tensor& result))                \
  X(tanh_backward, Tensor(const Tensor& grad_output, const Tensor& result))                   \
  X(softmax_backward, Tensor(const Tensor& grad_output, const Tensor& result, int64_t dim))   \
  X(log_softmax_backward,                                                                     \
    Tensor(const Tensor& grad_output, const Tensor& result, int64_t dim))                      \
  X(mse_loss_backward, Tensor(const Tensor& grad_output, const Tensor& input,                 \
                              const Tensor& target, const OptTensor& weight,                   \
                              int64_t reduction))                                               \
  X(binary_cross_entropy_backward,                                                            \
    Tensor(const Tensor& grad_output, const Tensor& input, const Tensor& target,               \
           const OptTensor& weight, int64_t reduction))                                        \
  X(binary_cross_entropy_target_backward,                                                     \
    Tensor(const Tensor& grad_output, const Tensor& input, const Tensor& target,               \
           const OptTensor& weight, int64_t reduction))                                        \
  X(cross_entropy_backward,                                                                   \
    Tensor(const Tensor& grad_output, const Tensor& input, const Tensor& target,               \
           const OptTensor& weight, int64_t reduction, int64_t ignore_index,                   \
           double label_smoothing, const OptTensor& log_sum_exp))

// `name##_op()`: the operator's handle, looked up once.
#define PYENGINE_DEFINE_HANDLE(name, signature)                                               \
  inline const c10::TypedOperatorHandle<signature>& name##_op() {                            \
    static const auto handle = c10::Dispatcher::singleton()                                   \
                                   .findSchemaOrThrow("pyengine::" #name, "")                 \
                                   .typed<signature>();                                       \
    return handle;                                                                            \
  }

PYENGINE_FORWARD_OPS(PYENGINE_DEFINE_HANDLE)
PYENGINE_BACKWARD_OPS(PYENGINE_DEFINE_HANDLE)

#undef PYENGINE_DEFINE_HANDLE

}  // namespace pyengine
