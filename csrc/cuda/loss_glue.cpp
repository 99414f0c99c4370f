// CUDA glue of mse_loss, binary_cross_entropy, cross_entropy and their backward passes (kernels:
// loss.cu). Same data-independent checks as csrc/cpu/loss.cpp (common/checks.h). The
// data-dependent ones (binary_cross_entropy's [0, 1] domain, cross_entropy's target range) are
// device-side asserts in the kernels: raising them here would need a host sync. Output layouts as
// on CPU (common/layout.h): 'none' results and gradients are allocated in torch's layout and the
// elementwise kernels read every operand in that storage order.
#include <torch/library.h>

#include "cuda/glue.h"

namespace pyengine {
namespace cuda {
namespace {

// `none_output` allocates the 'none' result in torch's layout.
Tensor pointwise_loss(const Tensor& input, const Tensor& target, const OptTensor& weight,
                      int64_t reduction, PointwiseLoss loss, bool mean_over_weight,
                      const char* op, Tensor (*none_output)(const Tensor&, const Tensor&,
                                                            const OptTensor&)) {
  check_pointwise_loss<int64_t>(input, target, weight, reduction, op);
  c10::cuda::CUDAGuard guard(input.device());
  Tensor out =
      reduction == 0 ? none_output(input, target, weight) : at::empty({}, input.options());
  auto operand = [&](const Tensor& v) {
    return reduction == 0 ? in_order_of(v, out) : v.contiguous();
  };
  const Tensor x = operand(input);
  const Tensor t = operand(target);
  const Tensor w = has(weight) ? operand(*weight) : Tensor();
  const int64_t n = x.numel();
  if (out.numel() == 0) return out;
  Tensor ws = workspace(pointwise_loss_workspace(n, reduction), at::kDouble, x);
  dispatch_floating_16bit(x.scalar_type(), op, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(pointwise_loss_forward<T>(loss, cptr<T>(x), cptr<T>(t),
                                             ptr_or_null<T>(w), n, reduction, mean_over_weight,
                                             mptr<T>(out),
                                             mutable_ptr_or_null<double>(ws), current_stream()));
  });
  return out;
}

// `empty_grad_input`: grad_input allocated in torch's layout.
Tensor pointwise_loss_backward(const Tensor& grad_output, const Tensor& input,
                               const Tensor& target, const OptTensor& weight, int64_t reduction,
                               PointwiseLoss loss, bool mean_over_weight, const char* op,
                               Tensor (*empty_grad_input)(const Tensor&, const Tensor&,
                                                          const Tensor&, const OptTensor&,
                                                          int64_t)) {
  check_pointwise_loss_backward<int64_t>(grad_output, input, target, weight, reduction, op);
  c10::cuda::CUDAGuard guard(input.device());
  Tensor grad_input = empty_grad_input(grad_output, input, target, weight, reduction);
  const Tensor x = in_order_of(input, grad_input);
  const Tensor t = in_order_of(target, grad_input);
  const Tensor w = has(weight) ? in_order_of(*weight, grad_input) : Tensor();
  const Tensor g = reduction == 0 ? in_order_of(grad_output, grad_input) : grad_output;
  const int64_t n = x.numel();
  if (n == 0) return grad_input;
  Tensor ws = workspace(
      pointwise_loss_backward_workspace(n, reduction, mean_over_weight, w.defined()),
      at::kDouble, x);
  dispatch_floating_16bit(x.scalar_type(), op, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(pointwise_loss_backward<T>(
        loss, cptr<T>(g), cptr<T>(x), cptr<T>(t),
        ptr_or_null<T>(w), n, reduction, mean_over_weight, mptr<T>(grad_input),
        mutable_ptr_or_null<double>(ws), current_stream()));
  });
  return grad_input;
}

// Output layouts of the pointwise losses (common/layout.h).
Tensor mse_loss_output(const Tensor& input, const Tensor& target, const OptTensor& weight) {
  return empty_with_layout<int64_t>(
      input.sizes(), mse_loss_layout<int64_t>(input, target, has(weight) ? &*weight : nullptr),
      input.options());
}
Tensor mse_loss_grad_input(const Tensor& grad_output, const Tensor& input, const Tensor& target,
                           const OptTensor& weight, int64_t reduction) {
  return empty_with_layout<int64_t>(
      input.sizes(),
      mse_loss_backward_layout<int64_t>(grad_output, input, target,
                                        has(weight) ? &*weight : nullptr, reduction),
      input.options());
}
Tensor bce_output(const Tensor& input, const Tensor&, const OptTensor&) {
  return empty_binary_cross_entropy(input);
}
Tensor bce_grad_input(const Tensor&, const Tensor& input, const Tensor&, const OptTensor&,
                      int64_t) {
  return empty_binary_cross_entropy(input);
}
Tensor bce_grad_target(const Tensor&, const Tensor& input, const Tensor&, const OptTensor&,
                       int64_t) {
  return empty_binary_cross_entropy_target_grad<int64_t>(input);
}

Tensor mse_loss_cuda(const Tensor& input, const Tensor& target, const OptTensor& weight,
                     int64_t reduction) {
  return pointwise_loss(input, target, weight, reduction, PointwiseLoss::Mse, true, "mse_loss",
                        mse_loss_output);
}
Tensor mse_loss_backward_cuda(const Tensor& grad_output, const Tensor& input,
                              const Tensor& target, const OptTensor& weight, int64_t reduction) {
  return pointwise_loss_backward(grad_output, input, target, weight, reduction,
                                 PointwiseLoss::Mse, true, "mse_loss_backward",
                                 mse_loss_grad_input);
}
Tensor binary_cross_entropy_cuda(const Tensor& input, const Tensor& target,
                                 const OptTensor& weight, int64_t reduction) {
  return pointwise_loss(input, target, weight, reduction, PointwiseLoss::BinaryCrossEntropy,
                        false, "binary_cross_entropy", bce_output);
}
Tensor binary_cross_entropy_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                          const Tensor& target, const OptTensor& weight,
                                          int64_t reduction) {
  return pointwise_loss_backward(grad_output, input, target, weight, reduction,
                                 PointwiseLoss::BinaryCrossEntropy, false,
                                 "binary_cross_entropy_backward", bce_grad_input);
}
Tensor binary_cross_entropy_target_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                                 const Tensor& target, const OptTensor& weight,
                                                 int64_t reduction) {
  return pointwise_loss_backward(grad_output, input, target, weight, reduction,
                                 PointwiseLoss::BinaryCrossEntropyTarget, false,
                                 "binary_cross_entropy_target_backward", bce_grad_target);
}

// The target's two kinds (common/checks.h): class indices or probabilities, the other null.
const int64_t* class_indices(const Tensor& t, bool probabilities) {
  return probabilities ? nullptr : t.const_data_ptr<int64_t>();
}
template <typename T>
const T* probabilities_or_null(const Tensor& t, bool probabilities) {
  return probabilities ? cptr<T>(t) : nullptr;
}

// The kernels take rows of C contiguous classes. (N, C, d1, ...) input (and a probability
// target of its shape) becomes the rows (N * d1 * ..., C) by a copy with the classes moved last;
// a class-index target's (N, d1, ...) is already in row order. The CPU kernel reads the classes
// at stride d1 * ... in place (cpu/cross_entropy.cpp); here that stays a copy until the kernels
// learn the stride.
Tensor as_rows(const Tensor& t, const CrossEntropyShape<int64_t>& s) {
  if (t.dim() <= 2) return t.contiguous();
  if (!t.is_floating_point()) return t.reshape({-1}).contiguous();
  return t.movedim(1, -1).reshape({-1, s.classes}).contiguous();
}

// with_lse: also each row's log-sum-exp (cross_entropy_with_log_sum_exp); undefined otherwise.
std::tuple<Tensor, Tensor> cross_entropy_forward_cuda(const Tensor& input, const Tensor& target,
                                                      const OptTensor& weight, int64_t reduction,
                                                      int64_t ignore_index,
                                                      double label_smoothing, bool with_lse) {
  const auto s = check_cross_entropy<int64_t>(input, target, weight, reduction, ignore_index,
                                              label_smoothing);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = as_rows(input, s);
  const Tensor t = as_rows(target, s);
  const Tensor w = contiguous_or_undefined(weight);
  Tensor out = at::empty(reduction == 0 ? s.loss_sizes : std::vector<int64_t>{}, x.options());
  Tensor lse = with_lse ? at::empty(log_sum_exp_sizes(s), x.options()) : Tensor();
  if (out.numel() == 0) return {out, lse};
  const int64_t rows = s.rows();
  Tensor ws = workspace(cross_entropy_workspace(rows, reduction), at::kDouble, x);
  dispatch_floating_16bit(x.scalar_type(), "cross_entropy", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(cross_entropy_forward<T>(
        cptr<T>(x), class_indices(t, s.probabilities),
        probabilities_or_null<T>(t, s.probabilities), ptr_or_null<T>(w), rows, s.classes,
        reduction, ignore_index, label_smoothing, /*unbatched=*/!s.batched, mptr<T>(out),
        with_lse && lse.numel() > 0 ? mptr<T>(lse) : nullptr, mutable_ptr_or_null<double>(ws),
        current_stream()));
  });
  return {out, lse};
}

Tensor cross_entropy_cuda(const Tensor& input, const Tensor& target, const OptTensor& weight,
                          int64_t reduction, int64_t ignore_index, double label_smoothing) {
  return std::get<0>(cross_entropy_forward_cuda(input, target, weight, reduction, ignore_index,
                                                label_smoothing, /*with_lse=*/false));
}

std::tuple<Tensor, Tensor> cross_entropy_with_log_sum_exp_cuda(
    const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  return cross_entropy_forward_cuda(input, target, weight, reduction, ignore_index,
                                    label_smoothing, /*with_lse=*/true);
}

// log_sum_exp is checked and not read: the kernel's max and sum run over the row it reads anyway
// (one warp per row, memory-bound), where on the CPU they were passes of their own.
Tensor cross_entropy_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                   const Tensor& target, const OptTensor& weight,
                                   int64_t reduction, int64_t ignore_index,
                                   double label_smoothing, const OptTensor& log_sum_exp) {
  const auto s = check_cross_entropy_backward<int64_t>(grad_output, input, target, weight,
                                                       reduction, ignore_index, label_smoothing,
                                                       log_sum_exp);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = as_rows(input, s);
  const Tensor t = as_rows(target, s);
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor g = grad_output.contiguous();
  Tensor grad_rows = at::empty(x.sizes(), x.options());
  if (grad_rows.numel() == 0) return at::empty(input.sizes(), input.options());
  const int64_t rows = s.rows();
  Tensor ws = workspace(cross_entropy_backward_workspace(rows, reduction, s.probabilities),
                        at::kDouble, x);
  dispatch_floating_16bit(x.scalar_type(), "cross_entropy_backward", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(cross_entropy_backward<T>(
        cptr<T>(g), cptr<T>(x), class_indices(t, s.probabilities),
        probabilities_or_null<T>(t, s.probabilities), ptr_or_null<T>(w), rows, s.classes,
        reduction, ignore_index, label_smoothing, mptr<T>(grad_rows),
        mutable_ptr_or_null<double>(ws), current_stream()));
  });
  if (input.dim() <= 2) return grad_rows;
  // (N * d1 * ..., C) rows back to (N, C, d1, ...), contiguous as torch returns it.
  std::vector<int64_t> class_last(s.loss_sizes);
  class_last.push_back(s.classes);
  return grad_rows.view(class_last).movedim(-1, 1).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("mse_loss", PE_KERNEL_NATIVE_16BIT(mse_loss_cuda));
  m.impl("mse_loss_backward", PE_KERNEL_NATIVE_16BIT(mse_loss_backward_cuda));
  m.impl("binary_cross_entropy", PE_KERNEL_NATIVE_16BIT(binary_cross_entropy_cuda));
  m.impl("binary_cross_entropy_backward",
         PE_KERNEL_NATIVE_16BIT(binary_cross_entropy_backward_cuda));
  m.impl("binary_cross_entropy_target_backward",
         PE_KERNEL_NATIVE_16BIT(binary_cross_entropy_target_backward_cuda));
  m.impl("cross_entropy", PE_KERNEL_NATIVE_16BIT(cross_entropy_cuda));
  m.impl("cross_entropy_with_log_sum_exp",
         PE_KERNEL_NATIVE_16BIT(cross_entropy_with_log_sum_exp_cuda));
  m.impl("cross_entropy_backward", PE_KERNEL_NATIVE_16BIT(cross_entropy_backward_cuda));
}

}  // namespace cuda
}  // namespace pyengine
