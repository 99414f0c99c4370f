// CUDA glue of max_pool2d, max_pool2d_with_indices and max_pool2d_backward (kernels: pool.cu).
// Same checks and output layouts as csrc/cpu/pool.cpp (common/checks.h, common/layout.h);
// unbatched (C, H, W) inputs are one batch.
#include <torch/library.h>

#include "cuda/glue.h"
#include "cuda/glue_kernels.h"

namespace pyengine {
namespace cuda {

void max_pool2d_forward_contiguous(const Pool2dGeometry<int64_t>& g, const Tensor& x,
                                   Tensor& output, Tensor* indices, const char* op) {
  dispatch_floating_16bit(output.scalar_type(), op, [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    int64_t* ix = indices ? indices->mutable_data_ptr<int64_t>() : nullptr;
    if (x.scalar_type() == output.scalar_type()) {
      C10_CUDA_CHECK(max_pool2d_forward<T>(cptr<T>(x), mptr<T>(output), ix, g, current_stream()));
    } else {
      TORCH_INTERNAL_ASSERT(x.scalar_type() == compute_dtype(output.scalar_type()));
      C10_CUDA_CHECK(max_pool2d_forward_from_compute<T>(cptr<compute_t<T>>(x), mptr<T>(output),
                                                        ix, g, current_stream()));
    }
  });
}

Tensor max_pool2d_backward_contiguous(const Pool2dGeometry<int64_t>& g, const Tensor& go,
                                      const Tensor& ix, at::IntArrayRef input_sizes,
                                      bool unrounded) {
  const at::ScalarType dtype = unrounded ? compute_dtype(go.scalar_type()) : go.scalar_type();
  Tensor grad_input = at::empty(input_sizes, go.options().dtype(dtype));
  Tensor flag = workspace(max_pool2d_backward_workspace(), at::kInt, go);
  dispatch_floating_16bit(go.scalar_type(), "max_pool2d_backward", [&](auto tag) {
    using T = storage_t<decltype(tag)>;
    if (!unrounded) {
      C10_CUDA_CHECK(max_pool2d_backward<T>(cptr<T>(go), ix.const_data_ptr<int64_t>(),
                                            mptr<T>(grad_input), g,
                                            mutable_ptr_or_null<int>(flag), current_stream()));
    } else {
      C10_CUDA_CHECK(max_pool2d_backward_to_compute<T>(
          cptr<T>(go), ix.const_data_ptr<int64_t>(), mptr<compute_t<T>>(grad_input), g,
          mutable_ptr_or_null<int>(flag), current_stream()));
    }
  });
  return grad_input;
}

namespace {

using at::IntArrayRef;

using Geometry = Pool2dGeometry<int64_t>;

void forward(const Tensor& input, const Geometry& g, Tensor& output, Tensor* indices,
             const char* op) {
  c10::cuda::CUDAGuard guard(input.device());
  max_pool2d_forward_contiguous(g, input.contiguous(), output, indices, op);
}

Tensor max_pool2d_cuda(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                       IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  const Geometry g =
      check_max_pool2d<int64_t>(input, kernel_size, stride, padding, dilation, ceil_mode);
  Tensor output = at::empty(g.output_sizes(), input.options());
  forward(input, g, output, nullptr, "max_pool2d");
  return as_image_layout(output, pool2d_channels_last(input));
}

std::tuple<Tensor, Tensor> max_pool2d_with_indices_cuda(const Tensor& input,
                                                        IntArrayRef kernel_size,
                                                        IntArrayRef stride, IntArrayRef padding,
                                                        IntArrayRef dilation, bool ceil_mode) {
  const Geometry g =
      check_max_pool2d<int64_t>(input, kernel_size, stride, padding, dilation, ceil_mode);
  const auto sizes = g.output_sizes();
  Tensor output = at::empty(sizes, input.options());
  Tensor indices = at::empty(sizes, input.options().dtype(at::kLong));
  forward(input, g, output, &indices, "max_pool2d_with_indices");
  const bool channels_last = pool2d_channels_last(input);
  return {as_image_layout(output, channels_last), as_image_layout(indices, channels_last)};
}

Tensor max_pool2d_backward_cuda(const Tensor& grad_output, const Tensor& input,
                                const Tensor& indices, IntArrayRef kernel_size,
                                IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
                                bool ceil_mode) {
  const Geometry g = check_max_pool2d_backward<int64_t>(grad_output, input, indices, kernel_size,
                                                        stride, padding, dilation, ceil_mode);
  c10::cuda::CUDAGuard guard(input.device());
  const Tensor grad_input = max_pool2d_backward_contiguous(g, grad_output.contiguous(),
                                                          indices.contiguous(), input.sizes());
  return as_image_layout(grad_input, pool2d_channels_last(input));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("max_pool2d", PE_KERNEL_NATIVE_16BIT(max_pool2d_cuda));
  m.impl("max_pool2d_with_indices", PE_KERNEL_NATIVE_16BIT(max_pool2d_with_indices_cuda));
  m.impl("max_pool2d_backward", PE_KERNEL_NATIVE_16BIT(max_pool2d_backward_cuda));
}

}  // namespace cuda
}  // namespace pyengine
