#pragma once
// Typed dispatcher handles for pyengine's operators (schemas: csrc/ops.cpp). Autograd calls
// through them, and so do the pybind11 entry points, which is what makes an eager call cheap:
// the dispatcher is entered directly, without torch.ops' Python-side argument parsing.
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

// PE_OP(name, return type, argument types...) defines `name##_op()`, the operator's handle,
// looked up once.
#define PE_OP(name, ret, ...)                                                              \
  inline const c10::TypedOperatorHandle<ret(__VA_ARGS__)>& name##_op() {                 \
    static const auto handle = c10::Dispatcher::singleton()                              \
                                   .findSchemaOrThrow("pyengine::" #name, "")            \
                                   .typed<ret(__VA_ARGS__)>();                            \
    return handle;                                                                        \
  }

PE_OP(conv2d, Tensor, const Tensor&, const Tensor&, const OptTensor&, IntArrayRef, IntArrayRef,
      IntArrayRef, int64_t)
PE_OP(conv2d_backward, Tensor3, const Tensor&, const Tensor&, const Tensor&, IntArrayRef,
      IntArrayRef, IntArrayRef, int64_t, std::array<bool, 3>)

PE_OP(max_pool2d, Tensor, const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, bool)
PE_OP(max_pool2d_with_indices, Tensor2, const Tensor&, IntArrayRef,
      IntArrayRef, IntArrayRef, IntArrayRef, bool)
PE_OP(max_pool2d_backward, Tensor, const Tensor&, const Tensor&, const Tensor&, IntArrayRef,
      IntArrayRef, IntArrayRef, IntArrayRef, bool)

PE_OP(linear, Tensor, const Tensor&, const Tensor&, const OptTensor&)
PE_OP(linear_backward, Tensor3, const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>)

PE_OP(relu, Tensor, const Tensor&)
PE_OP(relu_backward, Tensor, const Tensor&, const Tensor&)
PE_OP(leaky_relu, Tensor, const Tensor&, double)
PE_OP(leaky_relu_backward, Tensor, const Tensor&, const Tensor&, double)
PE_OP(sigmoid, Tensor, const Tensor&)
PE_OP(sigmoid_backward, Tensor, const Tensor&, const Tensor&)
PE_OP(tanh, Tensor, const Tensor&)
PE_OP(tanh_backward, Tensor, const Tensor&, const Tensor&)
PE_OP(softmax, Tensor, const Tensor&, int64_t)
PE_OP(softmax_backward, Tensor, const Tensor&, const Tensor&, int64_t)
PE_OP(log_softmax, Tensor, const Tensor&, int64_t)
PE_OP(log_softmax_backward, Tensor, const Tensor&, const Tensor&, int64_t)

PE_OP(mse_loss, Tensor, const Tensor&, const Tensor&, const OptTensor&, int64_t)
PE_OP(mse_loss_backward, Tensor, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      int64_t)
PE_OP(binary_cross_entropy, Tensor, const Tensor&, const Tensor&, const OptTensor&, int64_t)
PE_OP(binary_cross_entropy_backward, Tensor, const Tensor&, const Tensor&, const Tensor&,
      const OptTensor&, int64_t)
PE_OP(cross_entropy, Tensor, const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t)
PE_OP(cross_entropy_backward, Tensor, const Tensor&, const Tensor&, const Tensor&,
      const OptTensor&, int64_t, int64_t)

#undef PE_OP

}  // namespace pyengine
