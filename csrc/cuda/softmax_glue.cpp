// CUDA glue of softmax, log_softmax and their backward passes (kernels: softmax.cu). Checks in
// the order of the CPU kernels: the dim first, then dtype / shapes.
#include <torch/library.h>

#include "cuda/glue.h"

namespace pyengine {
namespace cuda {
namespace {

struct Shape3 {
  int64_t outer = 1, D = 1, inner = 1;
};

// (outer, D, inner) around `dim`; a 0-d tensor is one row of one element.
Shape3 split_at(const Tensor& t, int64_t dim) {
  Shape3 s;
  if (t.dim() == 0) return s;
  for (int64_t i = 0; i < dim; ++i) s.outer *= t.size(i);
  s.D = t.size(dim);
  for (int64_t i = dim + 1; i < t.dim(); ++i) s.inner *= t.size(i);
  return s;
}

Tensor forward(const Tensor& input, int64_t dim, bool log, const char* op) {
  dim = wrap_dim(dim, input.dim(), op);
  check_floating(input, op, "input");
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor x = input.contiguous();
  Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const Shape3 s = split_at(x, dim);
  dispatch_floating_16bit(x.scalar_type(), op, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(softmax_forward<T>(cptr<T>(x), mptr<T>(y), s.outer,
                                      s.D, s.inner, log, current_stream()));
  });
  return y;
}

Tensor backward(const Tensor& grad_output, const Tensor& result, int64_t dim, bool log,
                const char* op) {
  dim = wrap_dim(dim, result.dim(), op);
  check_elementwise_backward<int64_t>(grad_output, result, "result", op);
  c10::cuda::CUDAGuard guard(grad_output.device());
  const Tensor g = grad_output.contiguous();
  const Tensor y = result.contiguous();
  Tensor gx = at::empty(g.sizes(), g.options());
  if (g.numel() == 0) return gx;
  const Shape3 s = split_at(g, dim);
  dispatch_floating_16bit(g.scalar_type(), op, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    C10_CUDA_CHECK(softmax_backward<T>(cptr<T>(g), cptr<T>(y),
                                       mptr<T>(gx), s.outer, s.D, s.inner, log,
                                       current_stream()));
  });
  return gx;
}

Tensor softmax_cuda(const Tensor& input, int64_t dim) {
  return forward(input, dim, false, "softmax");
}
Tensor log_softmax_cuda(const Tensor& input, int64_t dim) {
  return forward(input, dim, true, "log_softmax");
}
Tensor softmax_backward_cuda(const Tensor& grad_output, const Tensor& result, int64_t dim) {
  return backward(grad_output, result, dim, false, "softmax_backward");
}
Tensor log_softmax_backward_cuda(const Tensor& grad_output, const Tensor& result, int64_t dim) {
  return backward(grad_output, result, dim, true, "log_softmax_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("softmax", PE_KERNEL_NATIVE_16BIT(softmax_cuda));
  m.impl("softmax_backward", PE_KERNEL_NATIVE_16BIT(softmax_backward_cuda));
  m.impl("log_softmax", PE_KERNEL_NATIVE_16BIT(log_softmax_cuda));
  m.impl("log_softmax_backward", PE_KERNEL_NATIVE_16BIT(log_softmax_backward_cuda));
}

}  // namespace cuda
}  // namespace pyengine
