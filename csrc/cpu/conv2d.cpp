// CPU kernels of conv2d and conv2d_backward on pyengine's GEMM (cpu/gemm.h): the operators, and
// the rules that pick an algorithm per result from the shapes alone (use_batch_inner,
// pointwise, winograd_fits, implicit_fits below):
//
// 1. im2col (conv2d_im2col.cpp), any geometry: per group, the taps of a strip of output columns
//    are copied into a scratch matrix (K = C_in / groups * kH * kW rows) that stays in L2, and
//    each pass is a GEMM with it; col2im adds grad_input's columns back. A 1x1, stride-1,
//    unpadded convolution skips the copy (the input is its own im2col).
// 2. Batch innermost (conv2d_batch_inner.cpp), stride 1 with output rows of at most 16 columns
//    and a batch of at least 16 (LeNet's conv2): with the batch as the innermost dimension every
//    tap of every output pixel is a contiguous vector, so the GEMMs read the input in place
//    through pointer tables and no im2col is needed.
// 3. Implicit GEMM (conv2d_implicit.cpp) for 16 or more output channels per group (the layers
//    of real CNNs): the output channels are the GEMM's vector dimension and a zero-padded copy of
//    the input is read in place; forward, grad_input (a convolution of dY with the flipped
//    weight; by stride phases where strided) and grad_weight (channels-last GEMMs, one per
//    kernel position). On the
//    suite's 3x3 convolutions it reaches 53-80% of the fp32 peak where im2col reached 31-45%
//    (benchmarks/results).
// 4. Direct (conv2d_direct.cpp), forward and grad_weight (with grad_bias), for stride 1 and
//    fewer than 16 output channels (LeNet's conv1), and the NCHW forward of wider layers with
//    few taps (an RGB input's 3 -> 64 3x3: direct_fits): each output, or each weight's sum over
//    the pixels, accumulated in registers, no GEMM.
// 5. Winograd F(2x2, 3x3) (conv2d_winograd.cpp), forward and grad_input, for 3x3, stride 1,
//    undilated, ungrouped layers of 32 or more channels in and out (the 3x3 layers of ResNet-style
//    networks), and grad_weight from 128 channels: 2.25x fewer multiply-adds than the implicit
//    GEMM; 20-35% faster than it on the suite's 3x3 layers (2 threads). A result that is not finite is computed again by the next
//    algorithm in line, whose Inf and NaN placement is torch's.
//
// All are deterministic: each output element is summed in a fixed order that depends on the
// shapes only, so results are bitwise identical across runs and thread counts.
//
// Layout: the kernels compute in contiguous NCHW. When torch would compute in channels_last
// (input or weight channels_last: common/layout.h), the results are channels_last as torch's
// are. Winograd (forward, grad_input), the implicit GEMM (forward, grad_input, grad_weight) and
// pointwise layers' GEMMs read and write channels_last images as they are (conv2d::Order;
// conv2d_forward_channels_last and conv2d_backward_channels_last below); the other algorithms
// take the input as one copy into NCHW and give each result as one copy into channels_last
// (float32: register transposes, cpu/image_layout.h).
//
// Napkin math, LeNet at batch 64, fp32, per pass (forward, grad_input, grad_weight), on the
// reference machine (csrc/cpu/README.md: ~240 GFLOP/s fp32 per core, 2 cores):
//   conv1 1->6, 5x5, 32x32 -> 28x28 (im2col): K = 25, 784 columns per image. Forward
//     2*64*6*25*784 = 15.1 MFLOP, grad_weight the same: a GEMM floor of ~0.03 ms per pass on 2
//     cores. But with 6 output channels each im2col element (25*784 per image, 5 MB over the
//     batch, written and read once in L2) feeds only 6 FMAs, so im2col, at a few cycles per
//     28-float row, costs about as much as the FMAs.
//   conv2 6->16, 5x5, 14x14 -> 10x10 (batch innermost): K = 150. Forward 2*64*16*150*100 =
//     30.7 MFLOP, grad_weight and grad_input the same: ~0.06 ms per pass at the floor on 2 cores.
//     im2col would copy 150 * 100 = 15000 elements per image in 10-float rows (1500 rows per
//     image, 0.096 M rows over the batch) for 16 FMAs each, as slow as the GEMM; the
//     batch-innermost layout instead moves each of x, y, dY and dX once (0.36 M elements in all)
//     and runs the GEMMs at near peak.
// Achieved figures: the benchmark suite (python -m benchmarks).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "common/low_precision.h"
#include "cpu/conv2d.h"
#include "cpu/image_layout.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace pyengine {
namespace cpu {
namespace conv2d {

// row_sums (conv2d.h): vectorisable without reassociation, so every level sums in the same order.
template <typename T>
PE_INLINE void row_sums_impl(const T* buf, int64_t ld, int64_t rows, int64_t len, T* out) {
  constexpr int L = 16;
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = buf + r * ld;
    T acc[L] = {};
    int64_t j = 0;
    for (; j + L <= len; j += L)
      PE_LANES for (int l = 0; l < L; ++l) acc[l] += p[j + l];
    for (int l = 0; j + l < len; ++l) acc[l] += p[j + l];
    for (int w = L / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    out[r] += acc[0];
  }
}
#define PE_DEFINE_ROW_SUMS(T)                                                       \
  PE_ISA_FUNCTION(Family::Conv2d, void, row_sums,                                   \
                  (const T* buf, int64_t ld, int64_t rows, int64_t len, T* out),    \
                  (buf, ld, rows, len, out), row_sums_impl<T>)
PE_DEFINE_ROW_SUMS(float)
PE_DEFINE_ROW_SUMS(double)
#undef PE_DEFINE_ROW_SUMS

// out[c] += sum of buf[j * ld + c] over j < len, for c < cols: row_sums' sums of the columns of a
// channels-last dY (pixels x channels), each in row_sums' order (row j into lane j % 16, then the
// lanes' tree), so that both layouts give the same bits; vectorised across the columns instead of
// along them. Up to kColumnsPerPass columns in one pass over the rows (their lanes: 8 KB of
// float32 in L1): a pass per 16 columns read each row's line of them 1 KB or more from the last
// one's, from memory, once per 16 columns (13% of a channels_last 1x1 64 -> 256 @56 backward,
// perf, two threads).
constexpr int64_t kColumnsPerPass = 128;
template <typename T>
PE_INLINE void column_sums_impl(const T* buf, int64_t ld, int64_t len, int64_t cols, T* out) {
  constexpr int L = 16;
  for (int64_t c0 = 0; c0 < cols; c0 += kColumnsPerPass) {
    const int64_t nc = std::min<int64_t>(kColumnsPerPass, cols - c0);
    T acc[L][kColumnsPerPass] = {};  // [lane of row_sums][column]
    const T* p = buf + c0;
    for (int64_t j = 0; j < len; ++j) {
      T* lane = acc[j % L];
      const T* row = p + j * ld;
      PE_LANES for (int64_t c = 0; c < nc; ++c) lane[c] += row[c];
    }
    for (int w = L / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l)
        PE_LANES for (int64_t c = 0; c < nc; ++c) acc[l][c] += acc[l + w][c];
    for (int64_t c = 0; c < nc; ++c) out[c0 + c] += acc[0][c];
  }
}
#define PE_DEFINE_COLUMN_SUMS(T)                                                      \
  PE_ISA_FUNCTION(Family::Conv2d, void, column_sums,                                  \
                  (const T* buf, int64_t ld, int64_t len, int64_t cols, T* out),      \
                  (buf, ld, len, cols, out), column_sums_impl<T>)
PE_DEFINE_COLUMN_SUMS(float)
PE_DEFINE_COLUMN_SUMS(double)
#undef PE_DEFINE_COLUMN_SUMS

template <typename T>
PE_INLINE void store_pixel_rows_impl(const T* src, int64_t ld, int64_t count, int64_t channels,
                                     const T* bias, T* dst, int64_t dst_ld) {
  for (int64_t q = 0; q < count; ++q) {
    const T* s = src + q * ld;
    T* d = dst + q * dst_ld;
    if (bias)
      for (int64_t c = 0; c < channels; ++c) d[c] = s[c] + bias[c];
    else
      for (int64_t c = 0; c < channels; ++c) d[c] = s[c];
  }
}
#define PE_DEFINE_STORE_PIXEL_ROWS(T)                                                        \
  PE_ISA_FUNCTION(Family::Conv2d, void, store_pixel_rows,                                    \
                  (const T* src, int64_t ld, int64_t count, int64_t channels, const T* bias, \
                   T* dst, int64_t dst_ld),                                                  \
                  (src, ld, count, channels, bias, dst, dst_ld), store_pixel_rows_impl<T>)
PE_DEFINE_STORE_PIXEL_ROWS(float)
PE_DEFINE_STORE_PIXEL_ROWS(double)
#undef PE_DEFINE_STORE_PIXEL_ROWS

template <typename T>
void bias_grad(const Geometry& g, const T* dy, T* db, Order dy_order) {
  const int64_t P = g.out_pixels();
  if (dy_order == Order::ChannelsLast) {  // blocks of 16 channels: a cache line of each pixel
    const int64_t blocks = ceil_div(g.out_channels, 16);
    at::parallel_for(0, blocks, grain_for(double(g.batch) * P * 16), [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * 16, c1 = std::min(g.out_channels, b1 * 16);
      std::fill(db + c0, db + c1, T(0));
      for (int64_t n = 0; n < g.batch; ++n)
        column_sums(dy + n * g.out_image() + c0, g.out_channels, P, c1 - c0, db + c0);
    });
    return;
  }
  at::parallel_for(0, g.out_channels, grain_for(double(g.batch) * P), [&](int64_t c0, int64_t c1) {
    std::fill(db + c0, db + c1, T(0));
    for (int64_t n = 0; n < g.batch; ++n)
      row_sums(dy + n * g.out_image() + c0 * P, P, c1 - c0, P, db + c0);
  });
}
template void bias_grad<float>(const Geometry&, const float*, float*, Order);
template void bias_grad<double>(const Geometry&, const double*, double*, Order);

namespace {
// AVX-512: 16 exponents a step (all ones: inf or NaN), no branch.
PE_TARGET_AVX512 bool all_finite_avx512(const float* p, int64_t n) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1u);
    const __m512i e = _mm512_and_si512(_mm512_maskz_loadu_epi32(m, p + i), exponent);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, e, exponent);
  }
  return bad == 0;
}
template <typename T>
bool all_finite_portable(const T* p, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(p[i]);
  return finite;
}
}  // namespace

bool all_finite(const float* p, int64_t n) {
  return cpu::isa_for(Family::Conv2d) == cpu::Isa::Avx512 ? all_finite_avx512(p, n)
                                                          : all_finite_portable(p, n);
}
bool all_finite(const double* p, int64_t n) { return all_finite_portable(p, n); }

}  // namespace conv2d
}  // namespace cpu

namespace {

using at::Tensor;
using cpu::conv2d::Geometry;

// The batch-innermost path (conv2d_batch_inner.cpp) where its GEMMs beat im2col's: stride 1 (a
// tap's input vectors are then the output's, shifted), output rows of at most 16 columns (where
// im2col's row copies cost as much as the GEMM) and a batch of at least 16 (the vectors' length).
bool use_batch_inner(const Geometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.batch >= 16 && g.out_w <= 16;
}

// 1x1, stride 1, no padding: the input is its own im2col (conv2d_im2col.cpp's GEMM per image).
bool pointwise(const Geometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
         g.padding_h == 0 && g.padding_w == 0;
}

}  // namespace

namespace cpu {

namespace {

// f(T{}, S{}): T the compute type (w's, float or double), S x's storage: T itself, or bfloat16
// with float (the direct and batch-innermost kernels widen x as they copy it: cpu/conv2d.h).
template <typename F>
void dispatch_with_input(const Tensor& x, const Tensor& w, const char* op, F&& f) {
  if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat)
    f(float{}, c10::BFloat16{});
  else
    dispatch_floating(x.scalar_type(), op, [&](auto tag) { f(tag, tag); });
}

}  // namespace

// The forward on contiguous NCHW tensors (b undefined: no bias), into a contiguous output.
Tensor conv2d_forward_contiguous(const conv2d::Geometry& g, const Tensor& x, const Tensor& w,
                                 const Tensor& b) {
  const bool has_bias = b.defined();
  Tensor out = empty_of(g.output_sizes(), x.options());
  if (out.numel() == 0) return out;
  dispatch_floating(x.scalar_type(), "conv2d", [&](auto tag) {
    using T = decltype(tag);
    if (use_batch_inner(g)) {
      cpu::conv2d::forward_batch_inner<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                          has_bias ? b.const_data_ptr<T>() : nullptr,
                                          out.mutable_data_ptr<T>());
      return;
    }
    if (cpu::conv2d::winograd_fits(g) &&
        cpu::conv2d::forward_winograd<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                         has_bias ? b.const_data_ptr<T>() : nullptr,
                                         out.mutable_data_ptr<T>()))
      return;  // (a non-finite output is computed again below, as torch would have it)
    // (direct before implicit: direct_fits takes the wide layers with few taps where it is the
    // faster of the two.)
    if (cpu::conv2d::direct_fits(g)) {
      cpu::conv2d::forward_direct<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                     has_bias ? b.const_data_ptr<T>() : nullptr,
                                     out.mutable_data_ptr<T>());
      return;
    }
    if (!pointwise(g) && cpu::conv2d::implicit_fits(g)) {
      cpu::conv2d::forward_implicit<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                       has_bias ? b.const_data_ptr<T>() : nullptr,
                                       out.mutable_data_ptr<T>());
      return;
    }
    cpu::conv2d::forward_im2col<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                   has_bias ? b.const_data_ptr<T>() : nullptr,
                                   out.mutable_data_ptr<T>());
  });
  return out;
}

namespace {

// The forward of a channels_last call (conv2d_channels_last) on the kernels that read and write
// channels_last images: a pointwise layer's GEMMs over the batch's pixel rows (the input made
// channels_last where it is not), and Winograd or the implicit GEMM where
// conv2d_forward_contiguous would choose them (the input as it is where dense channels_last,
// else contiguous NCHW); the output written channels_last. (A wide layer with few taps, which the
// NCHW forward gives the direct kernel (direct_fits), stays on the implicit GEMM here: its pixel
// rows are the channels_last output as they are, with no transpose for the direct kernel to save,
// and NCHW copies around the direct kernel took twice its time (3 -> 64 3x3 @32, batch 64). The
// two layouts' outputs then agree to rounding, not bitwise.) Undefined where none takes the call,
// or where Winograd's output came out non-finite: the caller then runs the NCHW kernels on
// copies.
Tensor conv2d_forward_channels_last(const conv2d::Geometry& g, const Tensor& input,
                                    const Tensor& weight, const Tensor& bias) {
  const bool by_pixel_rows = pointwise(g);
  const bool winograd = !by_pixel_rows && !use_batch_inner(g) && conv2d::winograd_fits(g);
  const bool implicit = !by_pixel_rows && !use_batch_inner(g) && !winograd &&
                        conv2d::implicit_fits(g);
  if (g.batch == 0 || g.out_pixels() == 0 || g.in_channels == 0 || g.out_channels == 0 ||
      input.scalar_type() != weight.scalar_type() || !(by_pixel_rows || winograd || implicit))
    return Tensor();  // (empty sizes: the NCHW path's handling)
  const bool x_cl = dense_channels_last(input);
  const Tensor x = x_cl            ? input
                   : by_pixel_rows ? as_image_layout(input.contiguous(), true)
                                   : input.contiguous();
  // The implicit GEMM takes a channels_last weight as it lies (its taps in (ki, kj, ci) order);
  // made contiguous, a 128 x 64 x 3 x 3 weight cost ATen's permuted copy 13 us a call (two
  // threads), 0.7% of a stride-2 3x3 64->128 channels_last forward at batch 8.
  const bool w_cl = implicit && dense_channels_last(weight);
  const Tensor w = w_cl ? weight : weight.contiguous();
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  Tensor out = empty_image<int64_t>(at::IntArrayRef(g.output_sizes()), true, x.options());
  bool ok = true;
  dispatch_floating(x.scalar_type(), "conv2d", [&](auto tag) {
    using T = decltype(tag);
    const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
    if (by_pixel_rows) {
      conv2d::forward_pointwise_channels_last<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                                 bp, out.mutable_data_ptr<T>());
      return;
    }
    const conv2d::Order x_order = x_cl ? conv2d::Order::ChannelsLast : conv2d::Order::Nchw;
    if (implicit) {
      conv2d::forward_implicit<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(), bp,
                                  out.mutable_data_ptr<T>(), x_order,
                                  conv2d::Order::ChannelsLast,
                                  w_cl ? conv2d::Order::ChannelsLast : conv2d::Order::Nchw);
      return;
    }
    ok = conv2d::forward_winograd<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(), bp,
                                     out.mutable_data_ptr<T>(), x_order,
                                     conv2d::Order::ChannelsLast);
  });
  return ok ? out : Tensor();
}

}  // namespace

bool conv2d_forward_is_direct(const conv2d::Geometry& g) {
  // The choice conv2d_forward_contiguous makes, in its order (a geometry Winograd takes is not
  // counted as direct even where a non-finite output would send it on).
  return g.batch > 0 && g.out_pixels() > 0 && !use_batch_inner(g) &&
         !cpu::conv2d::winograd_fits(g) && cpu::conv2d::direct_fits(g);
}

void conv2d_forward_direct_images(const conv2d::Geometry& g, const Tensor& x, const Tensor& w,
                                  const Tensor& b, const Conv2dYImage& done) {
  TORCH_INTERNAL_ASSERT(conv2d_forward_is_direct(g) && g.groups == 1);
  dispatch_with_input(x, w, "conv2d", [&](auto tag, auto in_tag) {
    using T = decltype(tag);
    using S = decltype(in_tag);
    const cpu::conv2d::YImage<T> typed = [&](int64_t n, const T* image) { done(n, image); };
    cpu::conv2d::forward_direct<T, S>(g, x.const_data_ptr<S>(), w.const_data_ptr<T>(),
                                      b.defined() ? b.const_data_ptr<T>() : nullptr, nullptr,
                                      &typed);
  });
}

bool conv2d_max_pool2d_relu_fused(const conv2d::Geometry& g, const Pool2dGeometry<int64_t>& pool,
                                  const Tensor& x, const Tensor& w, const Tensor& b,
                                  Tensor& output, Tensor& indices) {
  if (!use_batch_inner(g) || !pool.is_2x2_stride_2() || pool.out_h != g.out_h / 2 ||
      pool.out_w != g.out_w / 2 || output.numel() == 0)
    return false;
  dispatch_with_input(x, w, "conv2d_relu_max_pool2d", [&](auto tag, auto in_tag) {
    using T = decltype(tag);
    using S = decltype(in_tag);
    cpu::conv2d::forward_batch_inner_pool2x2_relu<T, S>(
        g, x.const_data_ptr<S>(), w.const_data_ptr<T>(),
        b.defined() ? b.const_data_ptr<T>() : nullptr, output.mutable_data_ptr<T>(),
        indices.mutable_data_ptr<int64_t>());
  });
  return true;
}

}  // namespace cpu

namespace {

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups) {
  const Geometry g =
      check_conv2d<int64_t>(input, weight, bias, stride, padding, dilation, groups);
  const bool has_bias = bias.has_value() && bias->defined();
  if (input.scalar_type() == at::kBFloat16) {
    // Registered with PE_KERNEL_NATIVE_BF16: bfloat16 calls arrive as they are where the CPU has
    // AMX or AVX512_BF16 (cpu::conv2d::bf16_kernels_available). The geometries its kernels take
    // run on them; the others on float32 copies, as everywhere else (common/low_precision.h).
    if (cpu::conv2d::bf16_forward_fits(g) &&
        ((g.padding_h == 0 && g.padding_w == 0) || cpu::conv2d::all_finite_bf16(weight)))
      return cpu::conv2d::forward_bf16(g, input, weight, has_bias ? *bias : Tensor(),
                                      conv2d_channels_last(input, weight));
    return low_precision::narrow(
        conv2d_cpu(low_precision::widen(input), low_precision::widen(weight),
                   low_precision::widen(bias), stride, padding, dilation, groups),
        at::kBFloat16);
  }
  const bool channels_last = conv2d_channels_last(input, weight);
  if (channels_last) {
    Tensor out = cpu::conv2d_forward_channels_last(g, input, weight,
                                                   has_bias ? *bias : Tensor());
    if (out.defined()) return out;
  }
  const Tensor out = cpu::conv2d_forward_contiguous(
      g, cpu::contiguous_image(input), cpu::contiguous_image(weight),
      has_bias ? bias->contiguous() : Tensor());
  return cpu::as_image_layout(out, channels_last);
}

}  // namespace

namespace cpu {

namespace {

// grad_input and grad_weight (with grad_bias) of the layers that do not run batch-innermost, on
// the fastest algorithm that fits each; im2col takes what is left.
template <typename T>
void backward_other(const conv2d::Geometry& g, const T* dy, const T* x, const T* w, T* dx,
                    T* dw, T* db) {
  if (dx && pointwise(g)) {
    cpu::conv2d::backward_input_pointwise<T>(g, dy, w, dx);
    dx = nullptr;
  } else if (dx && cpu::conv2d::winograd_fits(g) &&
             cpu::conv2d::backward_input_winograd<T>(g, dy, w, dx)) {
    dx = nullptr;  // (a non-finite one is computed again below)
  } else if (dx && cpu::conv2d::implicit_fits_backward_input(g) &&
             cpu::conv2d::all_finite(w, g.out_channels * g.taps_per_group())) {
    // (As a convolution of dY padded with zeros, it would multiply an Inf or NaN weight by
    // padding, where torch's grad_input has no term: such weights take im2col.)
    cpu::conv2d::backward_input_implicit<T>(g, dy, w, dx);
    dx = nullptr;
  }
  if (dw && cpu::conv2d::winograd_fits_backward_weight(g) &&
      cpu::conv2d::backward_weight_winograd<T>(g, dy, x, dw))
    dw = nullptr;  // (a non-finite one is computed again below)
  if (dw && !pointwise(g) && cpu::conv2d::implicit_fits_backward_weight(g)) {
    cpu::conv2d::backward_weight_implicit<T>(g, dy, x, dw);
    dw = nullptr;
  }
  if (dw && cpu::conv2d::direct_fits_backward_weight(g)) {
    cpu::conv2d::backward_weight_direct<T>(g, dy, x, dw, db);
    dw = nullptr;
    db = nullptr;
  }
  if (dw && pointwise(g)) {
    cpu::conv2d::backward_weight_pointwise<T>(g, dy, x, dw);
    dw = nullptr;
  }
  // A grad_bias whose grad_weight went elsewhere: straight from dY (im2col's pass for it alone
  // zero-filled a partial grad_weight per slot: 19 MB a call for 256->256 3x3, an eighth of
  // its Winograd grad_weight's time).
  if (db && !dw) {
    cpu::conv2d::bias_grad<T>(g, dy, db);
    db = nullptr;
  }
  if (!dx && !dw && !db) return;
  cpu::conv2d::backward_im2col<T>(g, dy, x, w, dx, dw, db);
}

}  // namespace

// The backward on contiguous NCHW tensors, into contiguous gradients (undefined where `mask`
// does not ask for them).
std::tuple<Tensor, Tensor, Tensor> conv2d_backward_contiguous(const conv2d::Geometry& g,
                                                              const Tensor& dy, const Tensor& x,
                                                              const Tensor& w,
                                                              std::array<bool, 3> mask) {
  if (x.scalar_type() != w.scalar_type() && !use_batch_inner(g))  // (bfloat16 x: cpu/kernels.h)
    return conv2d_backward_contiguous(g, dy, low_precision::widen(x), w, mask);
  Tensor grad_input, grad_weight, grad_bias;  // (in the compute type: w's)
  if (mask[0]) grad_input = empty_of(x.sizes(), w.options());
  if (mask[1]) grad_weight = empty_of(w.sizes(), w.options());
  if (mask[2]) grad_bias = empty_of(at::IntArrayRef{g.out_channels}, w.options());
  dispatch_with_input(x, w, "conv2d_backward", [&](auto tag, auto in_tag) {
    using T = decltype(tag);
    using S = decltype(in_tag);
    T* dx = mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr;
    T* dw = mask[1] ? grad_weight.mutable_data_ptr<T>() : nullptr;
    T* db = mask[2] ? grad_bias.mutable_data_ptr<T>() : nullptr;
    if (g.batch == 0) {  // empty batch: no contribution
      if (dw) std::fill(dw, dw + grad_weight.numel(), T(0));
      if (db) std::fill(db, db + g.out_channels, T(0));
      return;
    }
    if (!dx && !dw && !db) return;
    if (use_batch_inner(g)) {
      cpu::conv2d::backward_batch_inner<T, S>(g, dy.const_data_ptr<T>(), x.const_data_ptr<S>(),
                                              w.const_data_ptr<T>(), dx, dw, db);
      return;
    }
    if constexpr (std::is_same_v<T, S>)  // (a bfloat16 x was widened above)
      backward_other<T>(g, dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                        w.const_data_ptr<T>(), dx, dw, db);
  });
  return {grad_input, grad_weight, grad_bias};
}

namespace {

// The backward of a channels_last call (conv2d_channels_last): a pointwise layer's on GEMMs over
// the batch's pixel rows (dY and x made channels_last where they are not); otherwise grad_input
// where Winograd or the implicit GEMM takes it and grad_weight (with grad_bias) where the
// implicit GEMM does, as conv2d_backward_contiguous would choose them, read dY and x as they are
// (dense channels_last, else contiguous NCHW) and give grad_input channels_last; whatever else
// the mask asks for runs on NCHW copies. The results are in torch's layout (common/layout.h's
// conv2d_grads_in_layout), as those copies'.
std::tuple<Tensor, Tensor, Tensor> conv2d_backward_channels_last(const conv2d::Geometry& g,
                                                                 const Tensor& grad_output,
                                                                 const Tensor& input,
                                                                 const Tensor& weight,
                                                                 std::array<bool, 3> mask) {
  using conv2d::Order;
  Tensor grad_input, grad_weight, grad_bias;
  std::array<bool, 3> rest = mask;
  const bool same_types = input.scalar_type() == weight.scalar_type() &&
                          grad_output.scalar_type() == weight.scalar_type();
  // (empty sizes: the NCHW path's handling)
  const bool sized = g.batch > 0 && g.in_channels > 0 && g.out_channels > 0;
  if (sized && same_types && pointwise(g)) {
    const auto pixel_rows = [](const Tensor& t) {
      return dense_channels_last(t) ? t : as_image_layout(t.contiguous(), true);
    };
    const Tensor dy = pixel_rows(grad_output), w = weight.contiguous();
    const Tensor x = mask[1] ? pixel_rows(input) : Tensor();
    if (mask[0]) grad_input = empty_image<int64_t>(input.sizes(), true, w.options());
    Tensor dw = mask[1] ? empty_of(w.sizes(), w.options()) : Tensor();
    if (mask[2]) grad_bias = empty_of(at::IntArrayRef{g.out_channels}, w.options());
    dispatch_floating(w.scalar_type(), "conv2d_backward", [&](auto tag) {
      using T = decltype(tag);
      conv2d::backward_pointwise_channels_last<T>(
          g, dy.const_data_ptr<T>(), mask[1] ? x.const_data_ptr<T>() : nullptr,
          w.const_data_ptr<T>(), mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr,
          mask[1] ? dw.mutable_data_ptr<T>() : nullptr);
      if (mask[2])
        conv2d::bias_grad<T>(g, dy.const_data_ptr<T>(), grad_bias.mutable_data_ptr<T>(),
                             Order::ChannelsLast);
    });
    if (mask[1]) grad_weight = as_image_layout(dw, true);
    return {grad_input, grad_weight, grad_bias};
  }
  const bool native = sized && !use_batch_inner(g) && !pointwise(g) && same_types;
  // The kernels' weight (OIHW), made contiguous once for the finiteness check and the kernels.
  const Tensor w = native ? weight.contiguous() : weight;
  const auto finite_weight = [&w] {
    bool finite = true;
    dispatch_floating(w.scalar_type(), "conv2d_backward", [&](auto tag) {
      using T = decltype(tag);
      finite = conv2d::all_finite(w.const_data_ptr<T>(), w.numel());
    });
    return finite;
  };
  const bool dx_winograd = native && mask[0] && conv2d::winograd_fits(g);
  // (conv2d_backward_contiguous's next choice; a non-finite weight goes to im2col: see there)
  const bool dx_implicit = native && mask[0] && !dx_winograd &&
                           conv2d::implicit_fits_backward_input(g) && finite_weight();
  const bool dx_native = dx_winograd || dx_implicit;
  const bool dw_native = native && mask[1] && !conv2d::winograd_fits_backward_weight(g) &&
                         conv2d::implicit_fits_backward_weight(g);
  if (dx_native || dw_native) {
    const bool dy_cl = dense_channels_last(grad_output), x_cl = dense_channels_last(input);
    const Tensor dy = dy_cl ? grad_output : grad_output.contiguous();
    const Order dy_order = dy_cl ? Order::ChannelsLast : Order::Nchw;
    dispatch_floating(w.scalar_type(), "conv2d_backward", [&](auto tag) {
      using T = decltype(tag);
      if (dx_native) {
        Tensor dx = empty_image<int64_t>(input.sizes(), true, w.options());
        if (dx_implicit) {
          conv2d::backward_input_implicit<T>(g, dy.const_data_ptr<T>(), w.const_data_ptr<T>(),
                                             dx.mutable_data_ptr<T>(), dy_order,
                                             Order::ChannelsLast);
          grad_input = dx;
          rest[0] = false;
        } else if (conv2d::backward_input_winograd<T>(
                       g, dy.const_data_ptr<T>(), w.const_data_ptr<T>(),
                       dx.mutable_data_ptr<T>(), dy_order, Order::ChannelsLast)) {
          grad_input = dx;
          rest[0] = false;  // (a non-finite one is computed again below)
        }
      }
      if (dw_native) {
        const Tensor x = x_cl ? input : input.contiguous();
        Tensor dw = empty_of(w.sizes(), w.options());
        conv2d::backward_weight_implicit<T>(g, dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                                            dw.mutable_data_ptr<T>(), dy_order,
                                            x_cl ? Order::ChannelsLast : Order::Nchw);
        grad_weight = as_image_layout(dw, true);
        rest[1] = false;
        if (mask[2]) {
          grad_bias = empty_of(at::IntArrayRef{g.out_channels}, w.options());
          conv2d::bias_grad<T>(g, dy.const_data_ptr<T>(), grad_bias.mutable_data_ptr<T>(),
                               dy_order);
          rest[2] = false;
        }
      }
    });
  }
  if (rest[0] || rest[1] || rest[2]) {
    // (x is read for grad_weight only: cpu/kernels.h. Without it, no copy is made.)
    auto [dx, dw, db] = conv2d_grads_in_layout(
        conv2d_backward_contiguous(g, contiguous_image(grad_output),
                                   rest[1] ? contiguous_image(input) : input,
                                   contiguous_image(weight), rest),
        input, weight, as_image_layout);
    if (rest[0]) grad_input = dx;
    if (rest[1]) grad_weight = dw;
    if (rest[2]) grad_bias = db;
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

bool conv2d_max_pool2d_backward_fused(const conv2d::Geometry& g,
                                      const Pool2dGeometry<int64_t>& pool,
                                      const Tensor& pooled_grad, const Tensor& indices,
                                      const Tensor& x, const Tensor& w, std::array<bool, 3> mask,
                                      std::tuple<Tensor, Tensor, Tensor>& grads) {
  if (g.batch == 0 || !use_batch_inner(g) || !pool.is_2x2_stride_2() ||
      pool.out_h != g.out_h / 2 || pool.out_w != g.out_w / 2)
    return false;
  Tensor grad_input, grad_weight, grad_bias;  // (in the compute type: w's)
  if (mask[0]) grad_input = empty_of(x.sizes(), w.options());
  if (mask[1]) grad_weight = empty_of(w.sizes(), w.options());
  if (mask[2]) grad_bias = empty_of(at::IntArrayRef{g.out_channels}, w.options());
  bool ok = true;
  dispatch_with_input(x, w, "conv2d_relu_max_pool2d_backward", [&](auto tag, auto in_tag) {
    using T = decltype(tag);
    using S = decltype(in_tag);
    const cpu::conv2d::PooledGrad<T> pooled{pooled_grad.const_data_ptr<T>(),
                                            indices.const_data_ptr<int64_t>(),
                                            g.out_channels * pool.out_h * pool.out_w};
    ok = cpu::conv2d::backward_batch_inner<T, S>(
        g, nullptr, x.const_data_ptr<S>(), w.const_data_ptr<T>(),
        mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr,
        mask[1] ? grad_weight.mutable_data_ptr<T>() : nullptr,
        mask[2] ? grad_bias.mutable_data_ptr<T>() : nullptr, &pooled);
  });
  if (ok) grads = {grad_input, grad_weight, grad_bias};
  return ok;
}

bool conv2d_weight_grad_is_direct(const conv2d::Geometry& g) {
  // The choice conv2d_backward_contiguous makes for grad_weight, in its order.
  return g.batch > 0 && !use_batch_inner(g) &&
         (pointwise(g) || !cpu::conv2d::implicit_fits_backward_weight(g)) &&
         cpu::conv2d::direct_fits_backward_weight(g);
}

std::tuple<Tensor, Tensor> conv2d_weight_grads_direct(const conv2d::Geometry& g, const Tensor& x,
                                                      const Tensor& w, bool bias,
                                                      const Conv2dDyImage& dy_of) {
  TORCH_INTERNAL_ASSERT(conv2d_weight_grad_is_direct(g));
  Tensor grad_weight = empty_of(w.sizes(), w.options()), grad_bias;
  if (bias) grad_bias = empty_of(at::IntArrayRef{g.out_channels}, w.options());
  dispatch_with_input(x, w, "conv2d_backward", [&](auto tag, auto in_tag) {
    using T = decltype(tag);
    using S = decltype(in_tag);
    const cpu::conv2d::DyImage<T> typed = [&](int64_t n, T* image) { dy_of(n, image); };
    cpu::conv2d::backward_weight_direct<T, S>(
        g, static_cast<const T*>(nullptr), x.const_data_ptr<S>(),
        grad_weight.mutable_data_ptr<T>(), bias ? grad_bias.mutable_data_ptr<T>() : nullptr,
        &typed);
  });
  return {grad_weight, grad_bias};
}

}  // namespace cpu

namespace {

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cpu(const Tensor& grad_output,
                                                       const Tensor& input, const Tensor& weight,
                                                       at::IntArrayRef stride,
                                                       at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups,
                                                       std::array<bool, 3> mask) {
  const Geometry g = check_conv2d_backward<int64_t>(grad_output, input, weight, stride,
                                                    padding, dilation, groups);
  if (grad_output.scalar_type() == at::kBFloat16) {
    // Registered with PE_KERNEL_NATIVE_BF16 (see conv2d_cpu): grad_input, and grad_weight with
    // grad_bias, on AMX tiles or dot products where those kernels take them; the rest on
    // float32 copies.
    const bool channels_last = conv2d_channels_last(input, weight);
    Tensor grad_input, grad_weight, grad_bias;
    std::array<bool, 3> rest = mask;
    if (mask[0] && g.batch > 0 && cpu::conv2d::bf16_backward_input_fits(g) &&
        cpu::conv2d::all_finite_bf16(weight)) {
      grad_input = cpu::conv2d::backward_input_bf16(g, grad_output, weight, channels_last);
      rest[0] = false;
    }
    if (mask[1] && g.batch > 0 && cpu::conv2d::bf16_backward_weight_fits(g)) {
      auto [dw, db] = cpu::conv2d::backward_weight_bf16(g, grad_output, input, mask[2]);
      if (dw.defined()) {  // (undefined: a non-finite x, left to float32 below)
        grad_weight = cpu::as_image_layout(dw, channels_last);
        grad_bias = db;
        rest[1] = rest[2] = false;
      }
    }
    if (!rest[0] && !rest[1] && !rest[2]) return {grad_input, grad_weight, grad_bias};
    auto grads = low_precision::narrow(
        conv2d_backward_cpu(low_precision::widen(grad_output), low_precision::widen(input),
                            low_precision::widen(weight), stride, padding, dilation, groups,
                            rest),
        at::kBFloat16);
    if (grad_input.defined()) std::get<0>(grads) = grad_input;
    if (grad_weight.defined()) std::get<1>(grads) = grad_weight;
    if (grad_bias.defined()) std::get<2>(grads) = grad_bias;
    return grads;
  }
  if (conv2d_channels_last(input, weight))
    return cpu::conv2d_backward_channels_last(g, grad_output, input, weight, mask);
  return conv2d_grads_in_layout(
      cpu::conv2d_backward_contiguous(g, cpu::contiguous_image(grad_output),
                                      cpu::contiguous_image(input),
                                      cpu::contiguous_image(weight), mask),
      input, weight, cpu::as_image_layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("conv2d", PE_KERNEL_NATIVE_BF16(conv2d_cpu, cpu::conv2d::bf16_kernels_available));
  m.impl("conv2d_backward",
         PE_KERNEL_NATIVE_BF16(conv2d_backward_cpu, cpu::conv2d::bf16_kernels_available));
}

}  // namespace pyengine
