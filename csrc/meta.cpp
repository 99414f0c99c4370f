// Shape-only (Meta) kernels for every pyengine operator: they run the same argument checks as the
// real kernels (csrc/common/checks.h) and allocate outputs of the right shape, dtype and strides
// (csrc/common/layout.h, the rules the real kernels follow). FakeTensor, torch.compile and
// torch.export use them; sizes are c10::SymInt so dynamic shapes trace without specialising on the
// batch size.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/layout.h"

namespace pyengine {
namespace {

using at::IntArrayRef;
using at::Tensor;
using c10::SymInt;
using OptTensor = std::optional<Tensor>;

Tensor empty_meta(c10::SymIntArrayRef sizes, const Tensor& like) {
  return at::empty_symint(sizes, like.options());
}
Tensor empty_meta(const std::vector<SymInt>& sizes, const Tensor& like) {
  return at::empty_symint(c10::SymIntArrayRef(sizes), like.options());
}

Tensor conv2d_meta(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                   IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
  auto s = check_conv2d<SymInt>(input, weight, bias, stride, padding, dilation, groups);
  return empty_image<SymInt>(s.output_sizes(), conv2d_channels_last(input, weight),
                             input.options());
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_meta(const Tensor& grad_output,
                                                        const Tensor& input, const Tensor& weight,
                                                        IntArrayRef stride, IntArrayRef padding,
                                                        IntArrayRef dilation, int64_t groups,
                                                        std::array<bool, 3> mask) {
  auto s = check_conv2d_backward<SymInt>(grad_output, input, weight, stride, padding, dilation,
                                         groups);
  const bool channels_last = conv2d_channels_last(input, weight);
  return {mask[0] ? empty_image<SymInt>(input.sym_sizes(), channels_last, input.options())
                  : Tensor(),
          mask[1] ? empty_image<SymInt>(weight.sym_sizes(), channels_last, weight.options())
                  : Tensor(),
          mask[2] ? empty_meta(std::vector<SymInt>{s.out_channels}, weight) : Tensor()};
}

Tensor max_pool2d_meta(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                       IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  auto s = check_max_pool2d<SymInt>(input, kernel_size, stride, padding, dilation, ceil_mode);
  return empty_image<SymInt>(s.output_sizes(), pool2d_channels_last(input), input.options());
}

std::tuple<Tensor, Tensor> max_pool2d_with_indices_meta(const Tensor& input,
                                                        IntArrayRef kernel_size,
                                                        IntArrayRef stride, IntArrayRef padding,
                                                        IntArrayRef dilation, bool ceil_mode) {
  auto s = check_max_pool2d<SymInt>(input, kernel_size, stride, padding, dilation, ceil_mode);
  const auto sizes = s.output_sizes();
  const bool channels_last = pool2d_channels_last(input);
  return {empty_image<SymInt>(sizes, channels_last, input.options()),
          empty_image<SymInt>(sizes, channels_last, input.options().dtype(at::kLong))};
}

Tensor max_pool2d_backward_meta(const Tensor& grad_output, const Tensor& input,
                                const Tensor& indices, IntArrayRef kernel_size, IntArrayRef stride,
                                IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  check_max_pool2d_backward<SymInt>(grad_output, input, indices, kernel_size, stride, padding,
                                    dilation, ceil_mode);
  return empty_image<SymInt>(input.sym_sizes(), pool2d_channels_last(input), input.options());
}

// Outputs in the layout common/layout.h's conv2d_pool2d_channels_last gives.
std::tuple<Tensor, Tensor> conv2d_relu_max_pool2d_meta(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, IntArrayRef stride,
    IntArrayRef padding, IntArrayRef dilation, int64_t groups, IntArrayRef pool_kernel_size,
    IntArrayRef pool_stride, IntArrayRef pool_padding, IntArrayRef pool_dilation,
    bool pool_ceil_mode) {
  auto s = check_conv2d_relu_max_pool2d<SymInt>(input, weight, bias, stride, padding, dilation,
                                                groups, pool_kernel_size, pool_stride,
                                                pool_padding, pool_dilation, pool_ceil_mode);
  const std::vector<SymInt> conv_out = s.conv.output_sizes();
  const bool channels_last =
      conv2d_pool2d_channels_last<SymInt>(input, weight, c10::ArrayRef<SymInt>(conv_out));
  const auto sizes = s.pool.output_sizes();
  return {empty_image<SymInt>(sizes, channels_last, input.options()),
          empty_image<SymInt>(sizes, channels_last, input.options().dtype(at::kLong))};
}

// As conv2d_backward's.
std::tuple<Tensor, Tensor, Tensor> conv2d_relu_max_pool2d_backward_meta(
    const Tensor& grad_output, const Tensor& result, const Tensor& indices, const Tensor& input,
    const Tensor& weight, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    int64_t groups, IntArrayRef pool_kernel_size, IntArrayRef pool_stride,
    IntArrayRef pool_padding, IntArrayRef pool_dilation, bool pool_ceil_mode,
    std::array<bool, 3> mask) {
  auto s = check_conv2d_relu_max_pool2d_backward<SymInt>(
      grad_output, result, indices, input, weight, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode);
  const bool channels_last = conv2d_channels_last(input, weight);
  return {mask[0] ? empty_image<SymInt>(input.sym_sizes(), channels_last, input.options())
                  : Tensor(),
          mask[1] ? empty_image<SymInt>(weight.sym_sizes(), channels_last, weight.options())
                  : Tensor(),
          mask[2] ? empty_meta(std::vector<SymInt>{s.conv.out_channels}, weight) : Tensor()};
}

Tensor linear_meta(const Tensor& input, const Tensor& weight, const OptTensor& bias) {
  auto s = check_linear<SymInt>(input, weight, bias);
  return empty_meta(s.output_sizes, input);
}

std::tuple<Tensor, Tensor, Tensor> linear_backward_meta(const Tensor& grad_output,
                                                        const Tensor& input, const Tensor& weight,
                                                        std::array<bool, 3> mask) {
  auto s = check_linear_backward<SymInt>(grad_output, input, weight);
  return {mask[0] ? empty_with_layout<SymInt>(input.sym_sizes(),
                                              linear_grad_input_layout<SymInt>(
                                                  input, s.rows, s.in_features, mask[1]),
                                              input.options())
                  : Tensor(),
          mask[1] ? empty_with_layout<SymInt>(weight.sym_sizes(),
                                              linear_grad_weight_layout<SymInt>(weight),
                                              weight.options())
                  : Tensor(),
          mask[2] ? empty_meta(std::vector<SymInt>{s.out_features}, weight) : Tensor()};
}

// ---- Activations: the output has the input's shape ------------------------------------------

Tensor unary_meta(const Tensor& input, const char* op) {
  check_floating(input, op, "input");
  return empty_elementwise<SymInt>({&input}, input.options());
}
Tensor relu_meta(const Tensor& input) { return unary_meta(input, "relu"); }
Tensor sigmoid_meta(const Tensor& input) { return unary_meta(input, "sigmoid"); }
Tensor tanh_meta(const Tensor& input) { return unary_meta(input, "tanh"); }
Tensor leaky_relu_meta(const Tensor& input, double) { return unary_meta(input, "leaky_relu"); }
// softmax and log_softmax: contiguous whatever the input's layout, as torch's.
Tensor softmax_like_meta(const Tensor& input, int64_t dim, const char* op) {
  wrap_dim(dim, input.dim(), op);
  check_floating(input, op, "input");
  return empty_meta(input.sym_sizes(), input);
}
Tensor softmax_meta(const Tensor& input, int64_t dim) {
  return softmax_like_meta(input, dim, "softmax");
}
Tensor log_softmax_meta(const Tensor& input, int64_t dim) {
  return softmax_like_meta(input, dim, "log_softmax");
}

Tensor activation_backward_meta(const Tensor& grad_output, const Tensor& saved,
                                const char* saved_arg, const char* op, BackwardLead lead) {
  check_elementwise_backward<SymInt>(grad_output, saved, saved_arg, op);
  return empty_activation_backward<SymInt>(grad_output, saved, lead);
}
Tensor relu_backward_meta(const Tensor& g, const Tensor& result) {
  return activation_backward_meta(g, result, "result", "relu_backward", kReluBackwardLead);
}
Tensor sigmoid_backward_meta(const Tensor& g, const Tensor& result) {
  return activation_backward_meta(g, result, "result", "sigmoid_backward", kSigmoidBackwardLead);
}
Tensor tanh_backward_meta(const Tensor& g, const Tensor& result) {
  return activation_backward_meta(g, result, "result", "tanh_backward", kTanhBackwardLead);
}
Tensor leaky_relu_backward_meta(const Tensor& g, const Tensor& input, double) {
  return activation_backward_meta(g, input, "input", "leaky_relu_backward",
                                  kLeakyReluBackwardLead);
}
Tensor softmax_like_backward_meta(const Tensor& g, const Tensor& result, int64_t dim,
                                  const char* op) {
  wrap_dim(dim, result.dim(), op);
  check_elementwise_backward<SymInt>(g, result, "result", op);
  return empty_meta(g.sym_sizes(), g);
}
Tensor softmax_backward_meta(const Tensor& g, const Tensor& result, int64_t dim) {
  return softmax_like_backward_meta(g, result, dim, "softmax_backward");
}
Tensor log_softmax_backward_meta(const Tensor& g, const Tensor& result, int64_t dim) {
  return softmax_like_backward_meta(g, result, dim, "log_softmax_backward");
}

// ---- Losses -------------------------------------------------------------------------------

Tensor mse_loss_meta(const Tensor& input, const Tensor& target, const OptTensor& weight,
                     int64_t reduction) {
  check_pointwise_loss<SymInt>(input, target, weight, reduction, "mse_loss");
  if (reduction != 0) return empty_meta(std::vector<SymInt>{}, input);
  const Tensor* w = weight.has_value() && weight->defined() ? &*weight : nullptr;
  return empty_with_layout<SymInt>(input.sym_sizes(), mse_loss_layout<SymInt>(input, target, w),
                                   input.options());
}
Tensor mse_loss_backward_meta(const Tensor& grad_output, const Tensor& input,
                              const Tensor& target, const OptTensor& weight, int64_t reduction) {
  check_pointwise_loss_backward<SymInt>(grad_output, input, target, weight, reduction,
                                        "mse_loss_backward");
  const Tensor* w = weight.has_value() && weight->defined() ? &*weight : nullptr;
  return empty_with_layout<SymInt>(
      input.sym_sizes(),
      mse_loss_backward_layout<SymInt>(grad_output, input, target, w, reduction),
      input.options());
}
Tensor binary_cross_entropy_meta(const Tensor& input, const Tensor& target,
                                 const OptTensor& weight, int64_t reduction) {
  check_pointwise_loss<SymInt>(input, target, weight, reduction, "binary_cross_entropy");
  if (reduction != 0) return empty_meta(std::vector<SymInt>{}, input);
  return empty_binary_cross_entropy(input);
}
Tensor binary_cross_entropy_backward_meta(const Tensor& grad_output, const Tensor& input,
                                          const Tensor& target, const OptTensor& weight,
                                          int64_t reduction) {
  check_pointwise_loss_backward<SymInt>(grad_output, input, target, weight, reduction,
                                        "binary_cross_entropy_backward");
  return empty_binary_cross_entropy(input);
}
Tensor binary_cross_entropy_target_backward_meta(const Tensor& grad_output, const Tensor& input,
                                                 const Tensor& target, const OptTensor& weight,
                                                 int64_t reduction) {
  check_pointwise_loss_backward<SymInt>(grad_output, input, target, weight, reduction,
                                        "binary_cross_entropy_target_backward");
  return empty_binary_cross_entropy_target_grad<SymInt>(input);
}
Tensor cross_entropy_meta(const Tensor& input, const Tensor& target, const OptTensor& weight,
                          int64_t reduction, int64_t ignore_index, double label_smoothing) {
  auto s = check_cross_entropy<SymInt>(input, target, weight, reduction, ignore_index,
                                       label_smoothing);
  return empty_meta(reduction == 0 ? s.loss_sizes : std::vector<SymInt>{}, input);
}
std::tuple<Tensor, Tensor> cross_entropy_with_log_sum_exp_meta(
    const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  auto s = check_cross_entropy<SymInt>(input, target, weight, reduction, ignore_index,
                                       label_smoothing);
  return {empty_meta(reduction == 0 ? s.loss_sizes : std::vector<SymInt>{}, input),
          empty_meta(log_sum_exp_sizes(s), input)};
}
Tensor cross_entropy_backward_meta(const Tensor& grad_output, const Tensor& input,
                                   const Tensor& target, const OptTensor& weight,
                                   int64_t reduction, int64_t ignore_index,
                                   double label_smoothing, const OptTensor& log_sum_exp) {
  check_cross_entropy_backward<SymInt>(grad_output, input, target, weight, reduction,
                                       ignore_index, label_smoothing, log_sum_exp);
  return empty_meta(input.sym_sizes(), input);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, Meta, m) {
  m.impl("conv2d", conv2d_meta);
  m.impl("conv2d_backward", conv2d_backward_meta);
  m.impl("max_pool2d", max_pool2d_meta);
  m.impl("max_pool2d_with_indices", max_pool2d_with_indices_meta);
  m.impl("max_pool2d_backward", max_pool2d_backward_meta);
  m.impl("conv2d_relu_max_pool2d", conv2d_relu_max_pool2d_meta);
  m.impl("conv2d_relu_max_pool2d_backward", conv2d_relu_max_pool2d_backward_meta);
  m.impl("linear", linear_meta);
  m.impl("linear_backward", linear_backward_meta);
  m.impl("relu", relu_meta);
  m.impl("relu_backward", relu_backward_meta);
  m.impl("leaky_relu", leaky_relu_meta);
  m.impl("leaky_relu_backward", leaky_relu_backward_meta);
  m.impl("sigmoid", sigmoid_meta);
  m.impl("sigmoid_backward", sigmoid_backward_meta);
  m.impl("tanh", tanh_meta);
  m.impl("tanh_backward", tanh_backward_meta);
  m.impl("softmax", softmax_meta);
  m.impl("softmax_backward", softmax_backward_meta);
  m.impl("log_softmax", log_softmax_meta);
  m.impl("log_softmax_backward", log_softmax_backward_meta);
  m.impl("mse_loss", mse_loss_meta);
  m.impl("mse_loss_backward", mse_loss_backward_meta);
  m.impl("binary_cross_entropy", binary_cross_entropy_meta);
  m.impl("binary_cross_entropy_backward", binary_cross_entropy_backward_meta);
  m.impl("binary_cross_entropy_target_backward", binary_cross_entropy_target_backward_meta);
  m.impl("cross_entropy", cross_entropy_meta);
  m.impl("cross_entropy_with_log_sum_exp", cross_entropy_with_log_sum_exp_meta);
  m.impl("cross_entropy_backward", cross_entropy_backward_meta);
}

}  // namespace pyengine
