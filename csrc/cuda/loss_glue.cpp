// CUDA glue of mse_loss, binary_cross_entropy, cross_entropy and their backward passes (kernels:
// loss.cu). Same data-independent checks as csrc/cpu/loss.cpp (common/checks.h). The
// data-dependent ones (binary_cross_entropy's [0, 1] domain, cross_entropy's target range) are
// device-side asserts in the kernels: raising them here would need a host sync.
#include <torch/library.h>

#include "cuda/glue.h"

namespace pyengine {
namespace cuda {
namespace {

Tensor pointwise_loss(const Tensor& input, const Tensor& target, const OptTensor& weight,
                      int64_t reduction, PointwiseLoss loss, bool mean_over_weight,
                      const char* op) {
  check_pointwise_loss<int64_t>(input, target, weight, reduction, op);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor w = contiguous_or_undefined(weight);
  const int64_t n = x.numel();
  Tensor out = at::empty(loss_output_sizes<int64_t>(x, reduction), x.options());
  if (out.numel() == 0) return out;
  Tensor ws = workspace(pointwise_loss_workspace(n, reduction), at::kDouble, x);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(pointwise_loss_forward<T>(loss, x.const_data_ptr<T>(), t.const_data_ptr<T>(),
                                             ptr_or_null<T>(w), n, reduction, mean_over_weight,
                                             out.mutable_data_ptr<T>(),
                                             mutable_ptr_or_null<double>(ws), current_stream()));
  });
  return out;
}

Tensor pointwise_loss_backward(const Tensor& grad_output, const Tensor& input,
                               const Tensor& target, const OptTensor& weight, int64_t reduction,
                               PointwiseLoss loss, bool mean_over_weight, const char* op) {
  check_pointwise_loss_backward<int64_t>(grad_output, input, target, weight, reduction, op);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor g = grad_output.contiguous();
  const int64_t n = x.numel();
  Tensor grad_input = at::empty(x.sizes(), x.options());
  if (n == 0) return grad_input;
  Tensor ws = workspace(
      pointwise_loss_backward_workspace(n, reduction, mean_over_weight, w.defined()),
      at::kDouble, x);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(pointwise_loss_backward<T>(
        loss, g.const_data_ptr<T>(), x.const_data_ptr<T>(), t.const_data_ptr<T>(),
        ptr_or_null<T>(w), n, reduction, mean_over_weight, grad_input.mutable_data_ptr<T>(),
        mutable_ptr_or_null<double>(ws), current_stream()));
  });
  return grad_input;
}

Tensor mse_loss_cuda(const Tensor& input, const Tensor& target, const OptTensor& weight,
                     int64_t reduction) {
  return pointwise_loss(input, target, weight, reduction, PointwiseLoss::Mse, true, "mse_loss");
}
Tensor mse_loss_backward_cuda(const Tensor& grad_output, const Tensor& input,
                              const Tensor& target, const OptTensor& weight, int64_t reduction) {
  return pointwise_loss_backward(grad_output, input, target, weight, reduction,
                                 PointwiseLoss::Mse, true, "mse_loss_backward");
}
Tensor binary_cross_entropy_cuda(const Tensor& input, const Tensor& target,
                                 const OptTensor& weight, int64_t reduction) {
  return pointwise_loss(input, target, weight, reduction, PointwiseLoss::BinaryCrossEntropy,
                        false, "binary_cross_entropy");
}
Tensor binary_cross_entropy_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                          const Tensor& target, const OptTensor& weight,
                                          int64_t reduction) {
  return pointwise_loss_backward(grad_output, input, target, weight, reduction,
                                 PointwiseLoss::BinaryCrossEntropy, false,
                                 "binary_cross_entropy_backward");
}

Tensor cross_entropy_cuda(const Tensor& input, const Tensor& target, const OptTensor& weight,
                          int64_t reduction, int64_t ignore_index) {
  const auto s = check_cross_entropy<int64_t>(input, target, weight, reduction);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor w = contiguous_or_undefined(weight);
  std::vector<int64_t> sizes;
  if (reduction == 0 && s.batched) sizes.push_back(s.batch);
  Tensor out = at::empty(sizes, x.options());
  if (out.numel() == 0) return out;
  Tensor ws = workspace(cross_entropy_workspace(s.batch, reduction), at::kDouble, x);
  dispatch_floating(x.scalar_type(), "cross_entropy", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cross_entropy_forward<T>(
        x.const_data_ptr<T>(), t.const_data_ptr<int64_t>(), ptr_or_null<T>(w), s.batch,
        s.classes, reduction, ignore_index, out.mutable_data_ptr<T>(),
        mutable_ptr_or_null<double>(ws), current_stream()));
  });
  return out;
}

Tensor cross_entropy_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                   const Tensor& target, const OptTensor& weight,
                                   int64_t reduction, int64_t ignore_index) {
  const auto s = check_cross_entropy_backward<int64_t>(grad_output, input, target, weight,
                                                       reduction);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor g = grad_output.contiguous();
  Tensor grad_input = at::empty(x.sizes(), x.options());
  if (grad_input.numel() == 0) return grad_input;
  Tensor ws = workspace(cross_entropy_backward_workspace(s.batch, reduction), at::kDouble, x);
  dispatch_floating(x.scalar_type(), "cross_entropy_backward", [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(cross_entropy_backward<T>(
        g.const_data_ptr<T>(), x.const_data_ptr<T>(), t.const_data_ptr<int64_t>(),
        ptr_or_null<T>(w), s.batch, s.classes, reduction, ignore_index,
        grad_input.mutable_data_ptr<T>(), mutable_ptr_or_null<double>(ws), current_stream()));
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("mse_loss", mse_loss_cuda);
  m.impl("mse_loss_backward", mse_loss_backward_cuda);
  m.impl("binary_cross_entropy", binary_cross_entropy_cuda);
  m.impl("binary_cross_entropy_backward", binary_cross_entropy_backward_cuda);
  m.impl("cross_entropy", cross_entropy_cuda);
  m.impl("cross_entropy_backward", cross_entropy_backward_cuda);
}

}  // namespace cuda
}  // namespace pyengine
