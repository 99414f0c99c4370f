// Autograd for every pyengine operator, registered once at the Autograd key (all devices).
//
// Each forward op gets a torch::autograd::Function whose forward re-dispatches below autograd to
// the device kernel and saves what the backward op needs; its backward calls the backward op
// through the dispatcher, so torch.compile / AOTAutograd trace it as an operator of its own.
// When no input needs a gradient, the kernel skips building a graph node altogether: that keeps
// the host cost of an inference call close to a bare dispatch.
//
// The backward ops are not themselves differentiable: they get autograd's "not implemented"
// kernel, so double backward raises a clear error instead of silently returning zeros.
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <type_traits>

#include "op_handles.h"

namespace pyengine {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool needs_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const OptTensor& t) { return t.has_value() && needs_grad(*t); }
template <typename... Ts>
bool any_needs_grad(const Ts&... ts) {
  return at::GradMode::is_enabled() && (needs_grad(ts) || ...);
}

// A differentiable argument whose gradient pyengine does not compute: say so up front.
void refuse_grad(const OptTensor& t, const char* op, const char* arg) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && needs_grad(t)), "pyengine.", op,
              ": the gradient with respect to ", arg, " is not supported; pass ", arg,
              ".detach() or compute it outside pyengine");
}

std::vector<int64_t> saved_ints(AutogradContext* ctx, const char* key) {
  return ctx->saved_data[key].toIntVector();
}

// Which of (input, weight, bias) need gradients. needs_input_grad counts only the tensors that
// were passed, so an absent bias has no index of its own.
Mask3 grad_mask(AutogradContext* ctx) {
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
          has_bias && ctx->needs_input_grad(2)};
}

// ---- Convolution --------------------------------------------------------------------------

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptTensor& bias, IntArrayRef stride, IntArrayRef padding,
                        IntArrayRef dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Mask3 mask = grad_mask(ctx);
    auto [grad_input, grad_weight, grad_bias] = conv2d_backward_op().call(
        grads[0], saved[0], saved[1], saved_ints(ctx, "stride"), saved_ints(ctx, "padding"),
        saved_ints(ctx, "dilation"), ctx->saved_data["groups"].toInt(), mask);
    return {grad_input, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor conv2d_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                       IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                       int64_t groups) {
  if (!any_needs_grad(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return conv2d_op().call(input, weight, bias, stride, padding, dilation, groups);
  }
  return Conv2dFunction::apply(input, weight, bias, stride, padding, dilation, groups);
}

// ---- Max pooling --------------------------------------------------------------------------

struct MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
  // Returns (output, indices); indices are not differentiable.
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               IntArrayRef kernel_size, IntArrayRef stride, IntArrayRef padding,
                               IntArrayRef dilation, bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, indices] = max_pool2d_with_indices_op().call(input, kernel_size, stride,
                                                               padding, dilation, ceil_mode);
    ctx->save_for_backward({input, indices});
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->mark_non_differentiable({indices});
    // Otherwise autograd zero-fills a gradient for `indices` (int64, as large as the output)
    // on every backward pass, only for it to be ignored.
    ctx->set_materialize_grads(false);
    return {output, indices};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(6);  // the output was not used
    auto saved = ctx->get_saved_variables();
    Tensor grad_input = max_pool2d_backward_op().call(
        grads[0], saved[0], saved[1], saved_ints(ctx, "kernel_size"), saved_ints(ctx, "stride"),
        saved_ints(ctx, "padding"), saved_ints(ctx, "dilation"),
        ctx->saved_data["ceil_mode"].toBool());
    return {grad_input, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> max_pool2d_with_indices_autograd(const Tensor& input,
                                                            IntArrayRef kernel_size,
                                                            IntArrayRef stride,
                                                            IntArrayRef padding,
                                                            IntArrayRef dilation,
                                                            bool ceil_mode) {
  if (!any_needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return max_pool2d_with_indices_op().call(input, kernel_size, stride, padding, dilation,
                                             ceil_mode);
  }
  auto out = MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode);
  return {out[0], out[1]};
}

// Without a gradient to compute, the indices are not worth writing: use the plain kernel.
Tensor max_pool2d_autograd(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                           IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  if (!any_needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return max_pool2d_op().call(input, kernel_size, stride, padding, dilation, ceil_mode);
  }
  return MaxPool2dFunction::apply(input, kernel_size, stride, padding, dilation, ceil_mode)[0];
}

// ---- Linear -------------------------------------------------------------------------------

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const OptTensor& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return linear_op().call(input, weight, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Mask3 mask = grad_mask(ctx);
    auto [grad_input, grad_weight, grad_bias] =
        linear_backward_op().call(grads[0], saved[0], saved[1], mask);
    return {grad_input, grad_weight, grad_bias};
  }
};

Tensor linear_autograd(const Tensor& input, const Tensor& weight, const OptTensor& bias) {
  if (!any_needs_grad(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_op().call(input, weight, bias);
  }
  return LinearFunction::apply(input, weight, bias);
}

// ---- Activations --------------------------------------------------------------------------

// Elementwise ops whose derivative is cheapest from the result: relu, sigmoid, tanh.
#define PE_RESULT_ACTIVATION(name)                                                          \
  struct name##_function : public torch::autograd::Function<name##_function> {             \
    static Tensor forward(AutogradContext* ctx, const Tensor& input) {                     \
      at::AutoDispatchBelowADInplaceOrView guard;                                          \
      Tensor result = name##_op().call(input);                                             \
      ctx->save_for_backward({result});                                                    \
      return result;                                                                       \
    }                                                                                      \
    static variable_list backward(AutogradContext* ctx, variable_list grads) {             \
      return {name##_backward_op().call(grads[0], ctx->get_saved_variables()[0])};         \
    }                                                                                      \
  };                                                                                       \
  Tensor name##_autograd(const Tensor& input) {                                            \
    if (!any_needs_grad(input)) {                                                          \
      at::AutoDispatchBelowADInplaceOrView guard;                                          \
      return name##_op().call(input);                                                      \
    }                                                                                      \
    return name##_function::apply(input);                                                  \
  }

PE_RESULT_ACTIVATION(relu)
PE_RESULT_ACTIVATION(sigmoid)
PE_RESULT_ACTIVATION(tanh)
#undef PE_RESULT_ACTIVATION

struct LeakyReluFunction : public torch::autograd::Function<LeakyReluFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, double negative_slope) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input});
    ctx->saved_data["negative_slope"] = negative_slope;
    return leaky_relu_op().call(input, negative_slope);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {leaky_relu_backward_op().call(grads[0], ctx->get_saved_variables()[0],
                                          ctx->saved_data["negative_slope"].toDouble()),
            Tensor()};
  }
};

Tensor leaky_relu_autograd(const Tensor& input, double negative_slope) {
  if (!any_needs_grad(input)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return leaky_relu_op().call(input, negative_slope);
  }
  return LeakyReluFunction::apply(input, negative_slope);
}

// softmax and log_softmax: both differentiate from their result along `dim`.
#define PE_SOFTMAX_LIKE(name)                                                               \
  struct name##_function : public torch::autograd::Function<name##_function> {             \
    static Tensor forward(AutogradContext* ctx, const Tensor& input, int64_t dim) {        \
      at::AutoDispatchBelowADInplaceOrView guard;                                          \
      Tensor result = name##_op().call(input, dim);                                        \
      ctx->save_for_backward({result});                                                    \
      ctx->saved_data["dim"] = dim;                                                        \
      return result;                                                                       \
    }                                                                                      \
    static variable_list backward(AutogradContext* ctx, variable_list grads) {             \
      return {name##_backward_op().call(grads[0], ctx->get_saved_variables()[0],           \
                                        ctx->saved_data["dim"].toInt()),                   \
              Tensor()};                                                                   \
    }                                                                                      \
  };                                                                                       \
  Tensor name##_autograd(const Tensor& input, int64_t dim) {                               \
    if (!any_needs_grad(input)) {                                                          \
      at::AutoDispatchBelowADInplaceOrView guard;                                          \
      return name##_op().call(input, dim);                                                 \
    }                                                                                      \
    return name##_function::apply(input, dim);                                             \
  }

PE_SOFTMAX_LIKE(softmax)
PE_SOFTMAX_LIKE(log_softmax)
#undef PE_SOFTMAX_LIKE

// ---- Losses -------------------------------------------------------------------------------

struct MseLossFunction : public torch::autograd::Function<MseLossFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                        const OptTensor& weight, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, target, weight.value_or(Tensor())});
    ctx->saved_data["reduction"] = reduction;
    return mse_loss_op().call(input, target, weight, reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    OptTensor weight = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    Tensor grad_input, grad_target;
    if (ctx->needs_input_grad(0))
      grad_input = mse_loss_backward_op().call(grads[0], saved[0], saved[1], weight, reduction);
    // (x - t)^2 is symmetric in x and t: d/dt is the same op with the two swapped.
    if (ctx->needs_input_grad(1))
      grad_target = mse_loss_backward_op().call(grads[0], saved[1], saved[0], weight, reduction);
    return {grad_input, grad_target, Tensor(), Tensor()};
  }
};

Tensor mse_loss_autograd(const Tensor& input, const Tensor& target, const OptTensor& weight,
                         int64_t reduction) {
  refuse_grad(weight, "mse_loss", "weight");
  if (!any_needs_grad(input, target)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return mse_loss_op().call(input, target, weight, reduction);
  }
  return MseLossFunction::apply(input, target, weight, reduction);
}

struct BinaryCrossEntropyFunction
    : public torch::autograd::Function<BinaryCrossEntropyFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                        const OptTensor& weight, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, target, weight.value_or(Tensor())});
    ctx->saved_data["reduction"] = reduction;
    return binary_cross_entropy_op().call(input, target, weight, reduction);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    OptTensor weight = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    Tensor grad_input, grad_target;
    if (ctx->needs_input_grad(0))
      grad_input = binary_cross_entropy_backward_op().call(grads[0], saved[0], saved[1], weight,
                                                           reduction);
    if (ctx->needs_input_grad(1))
      grad_target = binary_cross_entropy_target_backward_op().call(grads[0], saved[0], saved[1],
                                                                   weight, reduction);
    return {grad_input, grad_target, Tensor(), Tensor()};
  }
};

Tensor binary_cross_entropy_autograd(const Tensor& input, const Tensor& target,
                                     const OptTensor& weight, int64_t reduction) {
  refuse_grad(weight, "binary_cross_entropy", "weight");
  if (!any_needs_grad(input, target)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return binary_cross_entropy_op().call(input, target, weight, reduction);
  }
  return BinaryCrossEntropyFunction::apply(input, target, weight, reduction);
}

// d loss / d target of class probabilities (input (N, C) or (C)): torch's autograd of its
// formula -sum(log_softmax(input) * q * w) (/ rows for 'mean'), q = target * (1 - eps) + eps / C:
// -a_n * w_c * log_softmax(input)_nc * (1 - eps), a = grad_output (/ rows for 'mean'), with
// pyengine's log_softmax.
Tensor cross_entropy_target_grad(const Tensor& grad_output, const Tensor& input,
                                 const OptTensor& weight, int64_t reduction,
                                 double label_smoothing) {
  const bool batched = input.dim() == 2;
  Tensor a = reduction == 0 && batched ? grad_output.unsqueeze(1) : grad_output;
  if (reduction == 1) a = a.div(batched ? input.size(0) : 1);
  a = a.neg();
  if (weight.has_value() && weight->defined()) a = a.mul(*weight);
  Tensor grad_target = a.mul(log_softmax_op().call(input, input.dim() - 1));
  return label_smoothing > 0 ? grad_target.mul(1 - label_smoothing) : grad_target;
}

struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                        const OptTensor& weight, int64_t reduction, int64_t ignore_index,
                        double label_smoothing) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, target, weight.value_or(Tensor())});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    return cross_entropy_op().call(input, target, weight, reduction, ignore_index,
                                   label_smoothing);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    OptTensor weight = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    Tensor grad_input, grad_target;
    if (ctx->needs_input_grad(0))
      grad_input = cross_entropy_backward_op().call(grads[0], saved[0], saved[1], weight,
                                                    reduction,
                                                    ctx->saved_data["ignore_index"].toInt(),
                                                    label_smoothing);
    // Only a target of class probabilities (floating) can need a gradient.
    if (ctx->needs_input_grad(1))
      grad_target = cross_entropy_target_grad(grads[0], saved[0], weight, reduction,
                                              label_smoothing);
    return {grad_input, grad_target, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor cross_entropy_autograd(const Tensor& input, const Tensor& target, const OptTensor& weight,
                              int64_t reduction, int64_t ignore_index, double label_smoothing) {
  refuse_grad(weight, "cross_entropy", "weight");
  if (!any_needs_grad(input, target)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return cross_entropy_op().call(input, target, weight, reduction, ignore_index,
                                   label_smoothing);
  }
  return CrossEntropyFunction::apply(input, target, weight, reduction, ignore_index,
                                     label_smoothing);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Autograd, m) {
  // Each forward op of op_handles.h: its name##_autograd above, which must take the op's
  // signature (checked here at compile time, and against the schema by m.impl at load).
#define PYENGINE_REGISTER_AUTOGRAD(name, signature)                                         \
  static_assert(std::is_same_v<decltype(name##_autograd), signature>,                      \
                #name "_autograd must have the signature of pyengine::" #name);            \
  m.impl(#name, name##_autograd);
  PYENGINE_FORWARD_OPS(PYENGINE_REGISTER_AUTOGRAD)
#undef PYENGINE_REGISTER_AUTOGRAD

  // Each backward op: not differentiable (see the top of this file).
#define PYENGINE_REGISTER_NOT_DIFFERENTIABLE(name, signature) \
  m.impl(#name, torch::autograd::autogradNotImplementedFallback());
  PYENGINE_BACKWARD_OPS(PYENGINE_REGISTER_NOT_DIFFERENTIABLE)
#undef PYENGINE_REGISTER_NOT_DIFFERENTIABLE
}

}  // namespace pyengine
