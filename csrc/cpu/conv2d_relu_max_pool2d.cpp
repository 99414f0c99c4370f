// CPU kernels of conv2d_relu_max_pool2d and its backward: conv2d, max_pool2d and relu chained
// on contiguous NCHW tensors (cpu/kernels.h), with the relu moved to where it is cheapest.
//
// Napkin math, LeNet's conv1 block at batch 256 (6 x 28 x 28 fp32 convolution output, 4.8 MB;
// pooled 1.2 MB + 2.4 MB of int64 indices): the three separate operators make seven passes of
// 4.8 MB over memory outside the convolution itself (relu reads and writes the image; max_pool2d
// reads it; backward, max_pool2d_backward writes a gradient image that relu_backward reads with
// the saved relu output and writes again), and keep the relu'd image alive until the backward.
// Here relu runs on the pooled maxima (a quarter of the elements: relu is monotonic, so
// max(relu(y)) = relu(max(y)), and the windows' positions are y's maxima either way), and the
// backward masks grad_output (relu's step, read from the pooled result) before scattering it
// into the convolution's gradient image: three 4.8 MB passes are left (convolution out, pooling
// in, gradient image out), and nothing of the image's size is kept for the backward. Where no
// grad_input is wanted and the direct kernel computes grad_weight (LeNet's conv1), the gradient
// image is made one image at a time where that kernel reads it: two passes. (A pooling
// geometry with a window of no input element, whose value is -inf, not relu's 0, takes relu
// before the pooling instead: the gradients are the same.) Two geometries never store the
// image at all: where the convolution runs batch-innermost and the pooling is 2x2 / stride 2
// (LeNet's conv2), the forward pools before the convolution's output leaves that layout and the
// backward unpools straight into it (cpu/conv2d_batch_inner.cpp); where it runs on the direct
// kernel (LeNet's conv1), each image is pooled as the kernel finishes it, in cache. In bfloat16
// on AMX tiles (LeNet's conv2 block on CPUs with them: cpu/conv2d_bf16.cpp) the convolution's
// float32 sums are stored and pooled, and the backward unpools into a bfloat16 gradient image
// for conv2d_backward's tiles: they save more than those passes cost (the block at batch 256:
// forward 0.71 -> 0.41 ms, backward 1.47 -> 0.86). In float32 with AVX-512 (and bfloat16 on
// float32 copies) the backward needs no gradient image at all: each pool window adds its gradient
// times the patch under its index's pixel to grad_weight and times the weights to that patch of
// grad_input (cpu/conv2d_pooled_grad.cpp; a quarter of the dense work for a 2x2 pool, less where
// relu zeroes windows); the paths below serve the other levels and dtypes, and the inputs it
// leaves to them (a non-finite x or w).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/elementwise.h"
#include "common/layout.h"
#include "common/low_precision.h"
#include "cpu/conv2d.h"
#include "cpu/image_layout.h"
#include "cpu/kernels.h"
#include "cpu/loops.h"
#include "op_handles.h"

namespace pyengine {
namespace {

using at::IntArrayRef;
using at::Tensor;

constexpr int64_t kElementGrain = 32768;  // elements per parallel task of the elementwise loops

void relu_in_place(Tensor& t) {  // contiguous
  dispatch_floating(t.scalar_type(), "conv2d_relu_max_pool2d", [&](auto tag) {
    using T = decltype(tag);
    T* p = t.mutable_data_ptr<T>();
    at::parallel_for(0, t.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) p[i] = relu_fwd(p[i]);
    });
  });
}

std::tuple<Tensor, Tensor> conv2d_relu_max_pool2d_cpu(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups,
    IntArrayRef pool_kernel_size, IntArrayRef pool_stride, IntArrayRef pool_padding,
    IntArrayRef pool_dilation, bool pool_ceil_mode) {
  const auto s = check_conv2d_relu_max_pool2d<int64_t>(
      input, weight, bias, stride, padding, dilation, groups, pool_kernel_size, pool_stride,
      pool_padding, pool_dilation, pool_ceil_mode);
  // bfloat16 (registered native, below): x is read as it is by the kernels that copy it into
  // their own layouts anyway (the direct and batch-innermost convolutions: cpu/conv2d.h), weight
  // and bias (small) and the other kernels' x go to float32 copies, and the pooled result is
  // rounded once: the bits of the float32 kernels on float32 copies of everything.
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor x = cpu::contiguous_image(input);
  const Tensor w = cpu::contiguous_image(low_precision::widen(weight));
  const Tensor b = has_bias ? low_precision::widen(*bias).contiguous() : Tensor();
  const std::vector<int64_t> sizes = s.pool.output_sizes();
  Tensor output = empty_of(sizes, w.options());  // (the compute dtype)
  Tensor indices = empty_of(sizes, input.options().dtype(at::kLong));
  // bfloat16 where the convolution takes AMX tiles (LeNet's conv2 block, on CPUs with them):
  // bfloat16 products summed in float32 on the tiles, the float32 sums pooled, then rounded once.
  const bool on_tiles =
      bf16 && output.numel() > 0 && cpu::conv2d::bf16_forward_fits(s.conv) &&
      ((s.conv.padding_h == 0 && s.conv.padding_w == 0) || cpu::conv2d::all_finite_bf16(weight));
  // Otherwise LeNet's conv2 block is pooled in its convolution's batch-innermost layout (cpu/
  // kernels.h), its conv1 block image by image; other blocks store the convolution's output,
  // then pool it.
  const bool pooled_inside =
      !on_tiles && cpu::conv2d_max_pool2d_relu_fused(s.conv, s.pool, x, w, b, output, indices);
  if (!on_tiles && !pooled_inside && output.numel() > 0 && s.conv.groups == 1 &&
      !s.pool.has_empty_window() && cpu::conv2d_forward_is_direct(s.conv)) {
    // LeNet's conv1 block: each image pooled as the direct kernel finishes it, still in cache
    // (the convolution's output, 4.8 MB at batch 256, is never stored whole). The same pooling
    // and relu, image by image: bitwise the batch-wide passes below.
    Pool2dGeometry<int64_t> one_image = s.pool;
    one_image.batch = 1;
    const int64_t per_image = s.pool.channels * s.pool.out_pixels();
    dispatch_floating(w.scalar_type(), "conv2d_relu_max_pool2d", [&](auto tag) {
      using T = decltype(tag);
      T* out = output.mutable_data_ptr<T>();
      int64_t* at = indices.mutable_data_ptr<int64_t>();
      cpu::conv2d_forward_direct_images(s.conv, x, w, b, [&](int64_t n, const void* image) {
        T* o = out + n * per_image;
        cpu::max_pool2d_forward_planes<T>(one_image, static_cast<const T*>(image), o,
                                          at + n * per_image);
        for (int64_t i = 0; i < per_image; ++i) o[i] = relu_fwd(o[i]);
      });
    });
  } else if (!pooled_inside && output.numel() > 0) {
    Tensor conv_out =
        on_tiles ? cpu::conv2d::forward_bf16(s.conv, x, weight, has_bias ? *bias : Tensor(),
                                            /*channels_last=*/false, /*float_output=*/true)
                 : cpu::conv2d_forward_contiguous(s.conv, low_precision::widen(x), w, b);
    // A window with no input element (dilation with padding) is -inf, which relu after pooling
    // would make 0: such geometries take relu first, on the whole image (rare; same gradients).
    const bool relu_first = s.pool.has_empty_window();
    if (relu_first) relu_in_place(conv_out);
    cpu::max_pool2d_forward_contiguous(s.pool, conv_out, output, indices);
    if (!relu_first) relu_in_place(output);
  }
  const std::vector<int64_t> conv_sizes = s.conv.output_sizes();
  const bool channels_last =
      conv2d_pool2d_channels_last<int64_t>(input, weight, at::IntArrayRef(conv_sizes));
  if (bf16) output = low_precision::narrow(output, at::kBFloat16);
  return {cpu::as_image_layout(output, channels_last),
          cpu::as_image_layout(indices, channels_last)};
}

std::tuple<Tensor, Tensor, Tensor> conv2d_relu_max_pool2d_backward_cpu(
    const Tensor& grad_output, const Tensor& result, const Tensor& indices, const Tensor& input,
    const Tensor& weight, IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation,
    int64_t groups, IntArrayRef pool_kernel_size, IntArrayRef pool_stride,
    IntArrayRef pool_padding, IntArrayRef pool_dilation, bool pool_ceil_mode,
    std::array<bool, 3> mask) {
  const char* op = "conv2d_relu_max_pool2d_backward";
  const auto s = check_conv2d_relu_max_pool2d_backward<int64_t>(
      grad_output, result, indices, input, weight, stride, padding, dilation, groups,
      pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode);
  if (!mask[0] && !mask[1] && !mask[2]) return {};
  // bfloat16 (every floating argument is, after the checks): grad_output and result are read
  // as they are where relu's step masks them, in the one pass that reads them anyway (cpu/
  // loops.h's Storage widens each element); input as in the forward (read as it is by the
  // direct and batch-innermost kernels, a float32 copy for the others); weight as a float32
  // copy; the gradients come back rounded once: the bits of the float32 kernels on float32
  // copies of all.
  const bool bf16 = grad_output.scalar_type() == at::kBFloat16;
  const Tensor x = cpu::contiguous_image(input);
  const Tensor w = cpu::contiguous_image(low_precision::widen(weight));
  auto in_layout = [&](std::tuple<Tensor, Tensor, Tensor> grads) {
    grads = conv2d_grads_in_layout(std::move(grads), input, weight, cpu::as_image_layout);
    return bf16 ? low_precision::narrow(std::move(grads), at::kBFloat16) : grads;
  };
  // The gradients summed over the pool's windows (a quarter of the dense work for a 2x2 pool,
  // less where relu zeroes windows: cpu/conv2d_pooled_grad.cpp); grad_input by the paths below
  // where that leaves it out (a non-finite weight). bfloat16 on AMX tiles keeps them (below).
  std::tuple<Tensor, Tensor, Tensor> pooled;
  if (!(bf16 && cpu::conv2d::bf16_backward_weight_fits(s.conv)) &&
      cpu::conv2d_grads_pooled(s.conv, s.pool, grad_output, result, indices, x, w, mask,
                               pooled)) {
    auto grads = in_layout(std::move(pooled));
    if (mask[0] && !std::get<0>(grads).defined())
      std::get<0>(grads) = std::get<0>(conv2d_relu_max_pool2d_backward_cpu(
          grad_output, result, indices, input, weight, stride, padding, dilation, groups,
          pool_kernel_size, pool_stride, pool_padding, pool_dilation, pool_ceil_mode,
          {true, false, false}));
    return grads;
  }
  // The gradient of the pooled maxima before relu: grad_output where the result is > 0.
  const Tensor go = cpu::contiguous_image(grad_output);
  const Tensor r = cpu::contiguous_image(result);
  if (!mask[0] && mask[1] && !s.pool.has_empty_window() &&
      cpu::conv2d_weight_grad_is_direct(s.conv)) {
    // LeNet's conv1 (no grad_input; grad_weight from the direct kernel): each image's gradient
    // is unpooled where that kernel reads it, in cache, instead of into a batch of them in
    // memory (4.8 MB at batch 256, written once, read back once). The same values in the same
    // order as below: bitwise the same gradients. An index outside its plane leaves this path
    // for the one below, which names it.
    const Tensor ix = indices.contiguous();
    const int64_t channels = s.conv.out_channels, pooled = s.pool.out_pixels();
    std::atomic<bool> bad{false};
    Tensor grad_weight, grad_bias;
    dispatch_elementwise(go.scalar_type(), op, [&](auto tag) {
      using S = decltype(tag);                       // grad_output's and result's storage
      using T = decltype(Storage<S>::load(S{}));     // the arithmetic (and x's) type
      const S* g = go.const_data_ptr<S>();
      const S* y = r.const_data_ptr<S>();
      const int64_t* at = ix.const_data_ptr<int64_t>();
      const cpu::Conv2dDyImage unpool = [&](int64_t n, void* image) {
        thread_local std::vector<T> masked;  // the image's pooled gradient, relu's step applied
        masked.resize(static_cast<size_t>(channels * pooled));
        const int64_t o0 = n * channels * pooled;
        for (int64_t o = 0; o < channels * pooled; ++o)
          masked[o] = relu_bwd(Storage<S>::load(g[o0 + o]), Storage<S>::load(y[o0 + o]));
        if (!cpu::max_pool2d_backward_planes<T>(s.pool, masked.data(), at + o0,
                                                 static_cast<T*>(image), channels))
          bad = true;
      };
      std::tie(grad_weight, grad_bias) =
          cpu::conv2d_weight_grads_direct(s.conv, x, w, mask[2], unpool);
    });
    if (!bad) return in_layout({Tensor(), grad_weight, grad_bias});
  }
  Tensor pooled_grad = empty_of(go.sizes(), w.options());
  dispatch_elementwise(go.scalar_type(), op, [&](auto tag) {
    using S = decltype(tag);
    using T = decltype(Storage<S>::load(S{}));
    const S* g = go.const_data_ptr<S>();
    const S* y = r.const_data_ptr<S>();
    T* d = pooled_grad.mutable_data_ptr<T>();
    at::parallel_for(0, go.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        d[i] = relu_bwd(Storage<S>::load(g[i]), Storage<S>::load(y[i]));
    });
  });
  const Tensor ix = indices.contiguous();
  const std::vector<int64_t> conv_sizes = s.conv.output_sizes();
  // bfloat16 where the convolution's backward takes AMX tiles (LeNet's conv2 block, on CPUs
  // with them): the unpooled gradient goes through conv2d_backward's bfloat16 kernels. It is
  // exact in bfloat16 where windows do not overlap (LeNet's 2x2 / 2: unpooling moves values,
  // relu's step keeps or zeroes them); overlapping windows' float32 sums are rounded once.
  if (bf16 && cpu::conv2d::bf16_backward_weight_fits(s.conv)) {
    const Tensor conv_grad = low_precision::narrow(
        cpu::max_pool2d_backward_contiguous(s.pool, pooled_grad, ix,
                                            at::IntArrayRef(conv_sizes), op,
                                            "convolution output"),
        at::kBFloat16);
    return conv2d_grads_in_layout(
        conv2d_backward_op().call(conv_grad, x, weight, stride, padding, dilation, groups, mask),
        input, weight);
  }
  // LeNet's conv2 block: unpooled straight into its convolution's batch-innermost layout.
  std::tuple<Tensor, Tensor, Tensor> grads;
  if (cpu::conv2d_max_pool2d_backward_fused(s.conv, s.pool, pooled_grad, ix, x, w, mask, grads))
    return in_layout(std::move(grads));
  const Tensor conv_grad = cpu::max_pool2d_backward_contiguous(
      s.pool, pooled_grad, ix, at::IntArrayRef(conv_sizes), op,
      "convolution output");
  return in_layout(cpu::conv2d_backward_contiguous(s.conv, conv_grad, x, w, mask));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("conv2d_relu_max_pool2d",
         PE_KERNEL_NATIVE_BF16(conv2d_relu_max_pool2d_cpu, low_precision::always));
  m.impl("conv2d_relu_max_pool2d_backward",
         PE_KERNEL_NATIVE_BF16(conv2d_relu_max_pool2d_backward_cpu, low_precision::always));
}

}  // namespace pyengine
