#pragma once
// The CPU conv2d kernels' internal interface: the two algorithms (conv2d_im2col.cpp,
// conv2d_batch_inner.cpp), the rule that picks one per call (conv2d.cpp, with the operators) and
// the helpers both use.
//
// Every pointer is to contiguous memory, of the compute type T (float or double), but for x,
// which the direct and batch-innermost kernels also read as bfloat16 (S) where T is float: they
// copy it into their own layouts anyway, and widen it there (cpu/convert.h). Shapes: x and dx
// (batch, in_channels, in_h, in_w), w and dw (out_channels, in_channels / groups, kernel_h,
// kernel_w), y and dy (batch, out_channels, out_h, out_w), bias and db (out_channels). bias, and
// any of dx / dw / db, may be null (not wanted).
// The geometry has batch >= 1 and non-empty sizes otherwise (conv2d.cpp handles empty ones).
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <tuple>

#include "common/geometry.h"

namespace pyengine {
namespace cpu {
namespace conv2d {

using Geometry = Conv2dGeometry<int64_t>;

// Where an image argument's elements lie (x, dx, y, dy; the header's "contiguous" above is Nchw):
// contiguous NCHW, or dense channels_last (each pixel's channels contiguous, torch's
// channels_last memory format). The Winograd and implicit-GEMM kernels read and write either:
// conv2d.cpp hands them channels_last images as they are instead of copying them into NCHW and
// their results back.
enum class Order { Nchw, ChannelsLast };

// im2col strips and GEMMs, any geometry (conv2d_im2col.cpp).
template <typename T>
void forward_im2col(const Geometry& g, const T* x, const T* w, const T* bias, T* y);
template <typename T>
void backward_im2col(const Geometry& g, const T* dy, const T* x, const T* w, T* dx, T* dw, T* db);

// Direct convolution, stride 1, rows of 16 or more, fewer than 16 output channels per group
// (LeNet's conv1) or few taps on rows that fill its 16-column chunks (3 -> 64 3x3 at 32x32):
// outputs accumulated in registers from a zero-padded input (conv2d_direct.cpp). grad_weight:
// the narrow layers only.
bool direct_fits(const Geometry& g);
// y_done, when given (one group only), receives image n's output (out_channels x out_h x out_w,
// in a per-thread scratch, still in cache) instead of it being stored into y (y unused): a
// fused operator's pooling, image by image, of an output never stored whole.
template <typename T>
using YImage = std::function<void(int64_t n, const T* y_image)>;
template <typename T, typename S = T>
void forward_direct(const Geometry& g, const S* x, const T* w, const T* bias, T* y,
                    const YImage<T>* y_done = nullptr);
// grad_weight (and grad_bias, db may be null) of the same layers, accumulated in registers from
// the zero-padded input and dY (conv2d_direct.cpp). dy_of, when given, writes image n's dY
// (out_channels x out_h x out_w) into a scratch image instead of dy being read (dy unused): a
// fused operator's gradient, made image by image in cache and never stored whole.
bool direct_fits_backward_weight(const Geometry& g);
template <typename T>
using DyImage = std::function<void(int64_t n, T* dy_image)>;
template <typename T, typename S = T>
void backward_weight_direct(const Geometry& g, const T* dy, const S* x, T* dw, T* db,
                            const DyImage<T>* dy_of = nullptr);

// grad_input of a 1x1, stride-1, unpadded convolution: a GEMM per image (conv2d_im2col.cpp).
template <typename T>
void backward_input_pointwise(const Geometry& g, const T* dy, const T* w, T* dx);
// grad_weight of the same: a GEMM per image, dY X^T.
template <typename T>
void backward_weight_pointwise(const Geometry& g, const T* dy, const T* x, T* dw);

// The same layers with x and y (dx and dy) channels_last (conv2d::Order): the batch's pixels are
// then one (pixels x channels) matrix, and each pass one GEMM over it per group
// (conv2d_im2col.cpp; dx or dw may be null).
template <typename T>
void forward_pointwise_channels_last(const Geometry& g, const T* x, const T* w, const T* bias,
                                     T* y);
template <typename T>
void backward_pointwise_channels_last(const Geometry& g, const T* dy, const T* x, const T* w,
                                      T* dx, T* dw);

// The batch-innermost layout: no im2col, every GEMM over contiguous batch vectors; for stride 1
// and small images (conv2d_batch_inner.cpp; conv2d.cpp says when).
template <typename T, typename S = T>
void forward_batch_inner(const Geometry& g, const S* x, const T* w, const T* bias, T* y);
// pooled, when given, stands for dy (unused): a 2x2 / stride-2 max-pool's gradient over the
// output (out_h / 2 x out_w / 2 windows), unpooled straight into the kernel's transposed dY
// (conv2d_relu_max_pool2d's backward). False then (outputs partly written) at an index that is
// not one of its window's taps; true otherwise.
template <typename T>
struct PooledGrad {
  const T* grad;           // (batch, out_channels, out_h / 2, out_w / 2)
  const int64_t* indices;  // the same shape: each window's maximum, a flat index in its plane
  int64_t per_image;       // out_channels * (out_h / 2) * (out_w / 2)
};
template <typename T, typename S = T>
bool backward_batch_inner(const Geometry& g, const T* dy, const S* x, const T* w, T* dx, T* dw,
                          T* db, const PooledGrad<T>* pooled = nullptr);
// The same forward with a 2x2, stride-2 max-pool (windows inside the output) and relu applied
// before the transpose back: out and indices (batch, out_channels, out_h / 2, out_w / 2), as
// max_pool2d_with_indices then relu would give them (conv2d_relu_max_pool2d).
template <typename T, typename S = T>
void forward_batch_inner_pool2x2_relu(const Geometry& g, const S* x, const T* w, const T* bias,
                                      T* out, int64_t* indices);

// Implicit GEMM over a zero-padded copy of the input, no im2col, for layers with 16 or more
// output channels per group (conv2d_implicit.cpp); grad_input for 16 or more input channels per
// group (by stride phases where strided).
bool implicit_fits(const Geometry& g);
bool implicit_fits_backward_input(const Geometry& g);
bool implicit_fits_backward_weight(const Geometry& g);
// w: contiguous NCHW, or dense channels-last where w_order says so (read as it lies).
template <typename T>
void forward_implicit(const Geometry& g, const T* x, const T* w, const T* bias, T* y,
                      Order x_order = Order::Nchw, Order y_order = Order::Nchw,
                      Order w_order = Order::Nchw);
template <typename T>
void backward_input_implicit(const Geometry& g, const T* dy, const T* w, T* dx,
                             Order dy_order = Order::Nchw, Order dx_order = Order::Nchw);
template <typename T>
void backward_weight_implicit(const Geometry& g, const T* dy, const T* x, T* dw,
                              Order dy_order = Order::Nchw, Order x_order = Order::Nchw);

// Winograd F(2x2, 3x3): 3x3, stride 1, one group, 32 or more channels in and out
// (conv2d_winograd.cpp). False where an output came out non-finite (the output then partly
// written): the caller computes it on another path.
bool winograd_fits(const Geometry& g);
template <typename T>
bool forward_winograd(const Geometry& g, const T* x, const T* w, const T* bias, T* y,
                      Order x_order = Order::Nchw, Order y_order = Order::Nchw);
template <typename T>
bool backward_input_winograd(const Geometry& g, const T* dy, const T* w, T* dx,
                             Order dy_order = Order::Nchw, Order dx_order = Order::Nchw);
// grad_weight where the channels are wide enough to pay for its transforms (128+ in and out).
bool winograd_fits_backward_weight(const Geometry& g);
template <typename T>
bool backward_weight_winograd(const Geometry& g, const T* dy, const T* x, T* dw);

// bfloat16 forward on AMX tiles or AVX512_BF16's dot products (conv2d_bf16.cpp):
// bf16_kernels_available() where the CPU runs level amx_bf16 or avx512_bf16
// (isa_for(Family::GemmBf16); PYENGINE_CPU_ISA=avx512 turns both off with the linear GEMM's);
// bf16_forward_fits(g) where it takes the geometry (one group, 16+ output channels; 16+ input
// channels, or, on tiles only, a kernel row's kernel_w x in_channels values filling at least
// half of its 32-value steps: LeNet's 6 -> 16 5x5). forward_bf16 returns y in bfloat16, in the
// layout channels_last says.
// bf16_backward_input_fits(g): grad_input on the same kernel (per phase of the stride, a
// convolution of dY by the phase's taps of the flipped weight; dilation 1 where strided;
// wherever the forward runs on tiles). Both multiply padding zeros by every weight, so a
// non-finite weight (all_finite_bf16) must take the float32 kernels, whose Inf / NaN placement
// is torch's.
bool bf16_kernels_available();
bool bf16_forward_fits(const Geometry& g);
bool bf16_backward_input_fits(const Geometry& g);
// grad_weight (and grad_bias) on tiles or dot products, any stride, wherever the forward runs
// on them (16+ input channels tap by tap; narrower ones, on tiles, as strips over pairs of
// images). Returns undefined
// tensors when x holds an Inf or NaN (the call then takes the float32 kernels: see
// conv2d_bf16.cpp).
bool bf16_backward_weight_fits(const Geometry& g);
std::tuple<at::Tensor, at::Tensor> backward_weight_bf16(const Geometry& g,
                                                       const at::Tensor& grad_output,
                                                       const at::Tensor& input, bool bias);
bool all_finite_bf16(const at::Tensor& t);
// False where an element of p[0, n) is Inf or NaN: the kernels that would multiply such a value
// by 0 where torch has no term (or 0 * Inf = NaN where they skip one) leave it to others.
bool all_finite(const float* p, int64_t n);
bool all_finite(const double* p, int64_t n);
// float_output: y in float32, unrounded (the fused conv + relu + max-pool block rounds once,
// after pooling); bias (bfloat16) included either way.
at::Tensor forward_bf16(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& bias, bool channels_last, bool float_output = false);
at::Tensor backward_input_bf16(const Geometry& g, const at::Tensor& grad_output,
                              const at::Tensor& weight, bool channels_last);

// ---- Shared helpers ---------------------------------------------------------------------------

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// at::parallel_for grain: enough items that a task does ~64K multiply-adds (or element moves);
// a parallel region costs a few microseconds, more than the work of a tiny layer.
inline int64_t grain_for(double work_per_item) {
  return std::max<int64_t>(1, static_cast<int64_t>(65536.0 / std::max(1.0, work_per_item)));
}

// out[r] += sum of buf[r * ld + j] over j < len, for r < rows: the bias gradient of a block of
// output channels. 16 interleaved partial sums, then a fixed tree: deterministic (conv2d.cpp).
void row_sums(const float* buf, int64_t ld, int64_t rows, int64_t len, float* out);
void row_sums(const double* buf, int64_t ld, int64_t rows, int64_t len, double* out);

// dst[q * dst_ld + c] = src[q * ld + c] (+ bias[c] when not null) for q < count, c < channels:
// a GEMM's pixel rows into a channels-last image (the one addition the NCHW kernels' transpose
// into NCHW makes: the same bits either way).
void store_pixel_rows(const float* src, int64_t ld, int64_t count, int64_t channels,
                      const float* bias, float* dst, int64_t dst_ld);
void store_pixel_rows(const double* src, int64_t ld, int64_t count, int64_t channels,
                      const double* bias, double* dst, int64_t dst_ld);

// grad_bias from dY: per channel, each image's row_sums in image order (the same sums on any
// thread count; a channels_last dY's are summed in the same order, bit for bit).
template <typename T>
void bias_grad(const Geometry& g, const T* dy, T* db, Order dy_order = Order::Nchw);

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
