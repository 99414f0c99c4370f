#pragma once
// The window geometry of conv2d and max_pool2d, and the window arithmetic around it. One
// description of a call, filled once by the shared argument checks (checks.h: check_conv2d,
// check_max_pool2d, which also bound every size below) and read by the CPU, CUDA and Meta kernels.
// Torch-free on purpose: the CUDA kernels include it (plain nvcc, C++17).
//
// Sizes are templates over Int: int64_t for the real kernels, c10::SymInt for the Meta kernels
// under dynamic shapes (checks.h). Window parameters (kernel, stride, padding, dilation, groups)
// are concrete int64. Derived values are member functions, written here once; the CPU and CUDA
// kernels use the int64_t instantiation (the PE_HOST_DEVICE members are callable from device
// code). An unbatched (C, H, W) input is a batch of one (`batched` false).
#include <cstdint>
#include <vector>

#include "macros.h"

namespace pyengine {

// ---- Window arithmetic ----------------------------------------------------------------------

// Bound on the padded input (input + 2 * padding) and on the dilated kernel along each axis, which
// the shared checks (checks.h) enforce before any kernel runs. Every window position, start or
// end, then lies in (-2^62, 2^62), so a kernel may add two of them, or a position and an output
// index, in plain int64 arithmetic without overflow. (It is also the most negative value a
// c10::SymInt can hold, -2^62, mirrored.) Strides are not bounded: a stride is only ever
// multiplied by an output index (the product is a window position) or divided by.
constexpr int64_t kMaxExtent = int64_t(1) << 62;

// Length covered by a kernel of `kernel` taps spaced `dilation` apart.
PE_HOST_DEVICE inline int64_t effective_kernel(int64_t kernel, int64_t dilation) {
  return dilation * (kernel - 1) + 1;
}

// ceil(a / b) for a >= 0 and b >= 1, without forming a + b - 1 (b may be a stride near 2^63).
PE_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// First in-bounds tap at or after a window's `start` on a grid of step `dilation`: start itself,
// or for a start in the padding (start < 0) the first tap at or after 0 (torch's
// `while (i < 0) i += dilation`).
PE_HOST_DEVICE inline int64_t first_tap(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + ceil_div(-start, dilation) * dilation;
}

// Whether the window of output position `o` along one axis has no tap inside the input [0, in):
// dilation with padding can put every tap of a window in the padding (its max is then -inf).
PE_HOST_DEVICE inline bool window_misses_input(int64_t o, int64_t stride, int64_t padding,
                                               int64_t effective, int64_t dilation, int64_t in) {
  const int64_t start = o * stride - padding;
  const int64_t end = start + effective < in ? start + effective : in;
  return first_tap(start, dilation) >= end;
}

// A half-open range [begin, end) of output positions along one axis.
struct IndexRange {
  int64_t begin, end;
  PE_HOST_DEVICE bool contains(int64_t i) const { return i >= begin && i < end; }
};

// The output positions along one axis whose whole window, [o * stride - padding, ... + effective),
// lies inside the input [0, in): no tap of theirs falls in the padding. Empty (begin == end) when
// there are none.
PE_HOST_DEVICE inline IndexRange inner_windows(int64_t in, int64_t out, int64_t effective,
                                               int64_t stride, int64_t padding) {
  // o * stride - padding >= 0  and  o * stride - padding + effective <= in.
  const int64_t first = ceil_div(padding, stride);
  const int64_t begin = first < out ? first : out;
  const int64_t last_start = in - effective + padding;  // the largest o * stride allowed
  int64_t end = last_start < 0 ? 0 : last_start / stride + 1;
  end = end < out ? end : out;
  return {begin, end > begin ? end : begin};
}

// ---- conv2d ---------------------------------------------------------------------------------
// input (batch, in_channels, in_h, in_w), weight (out_channels, in_channels / groups, kernel_h,
// kernel_w), output (batch, out_channels, out_h, out_w). A tap is one (input channel of the group,
// kernel row, kernel column): a group's filter has taps_per_group() of them.

template <typename Int>
struct Conv2dGeometry {
  bool batched;  // input was (N, C, H, W) rather than (C, H, W)
  Int batch, in_channels, in_h, in_w;
  Int out_channels, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;
  int64_t groups;

  // The output's shape, in the input's own rank.
  std::vector<Int> output_sizes() const {
    if (batched) return {batch, out_channels, out_h, out_w};
    return {out_channels, out_h, out_w};
  }

  PE_HOST_DEVICE int64_t effective_kernel_h() const {
    return effective_kernel(kernel_h, dilation_h);
  }
  PE_HOST_DEVICE int64_t effective_kernel_w() const {
    return effective_kernel(kernel_w, dilation_w);
  }
  PE_HOST_DEVICE int64_t kernel_pixels() const { return kernel_h * kernel_w; }
  PE_HOST_DEVICE Int in_channels_per_group() const { return in_channels / groups; }
  PE_HOST_DEVICE Int out_channels_per_group() const { return out_channels / groups; }
  // The GEMM's reduction length per group: in_channels / groups * kernel_h * kernel_w.
  PE_HOST_DEVICE Int taps_per_group() const { return in_channels_per_group() * kernel_pixels(); }
  PE_HOST_DEVICE Int in_pixels() const { return in_h * in_w; }
  PE_HOST_DEVICE Int out_pixels() const { return out_h * out_w; }
  // Elements of one image of the input and of the output.
  PE_HOST_DEVICE Int in_image() const { return in_channels * in_pixels(); }
  PE_HOST_DEVICE Int out_image() const { return out_channels * out_pixels(); }
  // Output rows / columns whose every tap lies inside the input (no padding taps).
  PE_HOST_DEVICE IndexRange inner_rows() const {
    return inner_windows(in_h, out_h, effective_kernel_h(), stride_h, padding_h);
  }
  PE_HOST_DEVICE IndexRange inner_cols() const {
    return inner_windows(in_w, out_w, effective_kernel_w(), stride_w, padding_w);
  }
};

// ---- max_pool2d -----------------------------------------------------------------------------
// input (batch, channels, in_h, in_w), output (batch, channels, out_h, out_w): every (image,
// channel) plane is pooled on its own.

template <typename Int>
struct Pool2dGeometry {
  bool batched;  // input was (N, C, H, W) rather than (C, H, W)
  Int batch, channels, in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;

  // The output's shape, in the input's own rank.
  std::vector<Int> output_sizes() const {
    if (batched) return {batch, channels, out_h, out_w};
    return {channels, out_h, out_w};
  }

  PE_HOST_DEVICE int64_t effective_kernel_h() const {
    return effective_kernel(kernel_h, dilation_h);
  }
  PE_HOST_DEVICE int64_t effective_kernel_w() const {
    return effective_kernel(kernel_w, dilation_w);
  }
  PE_HOST_DEVICE Int planes() const { return batch * channels; }
  PE_HOST_DEVICE Int in_pixels() const { return in_h * in_w; }
  PE_HOST_DEVICE Int out_pixels() const { return out_h * out_w; }
  // Output columns whose whole window lies inside the input (no padding taps).
  PE_HOST_DEVICE IndexRange inner_cols() const {
    return inner_windows(in_w, out_w, effective_kernel_w(), stride_w, padding_w);
  }
  // Whether the window of output row oh / column ow has no tap inside the input.
  PE_HOST_DEVICE bool row_misses_input(int64_t oh) const {
    return window_misses_input(oh, stride_h, padding_h, effective_kernel_h(), dilation_h, in_h);
  }
  PE_HOST_DEVICE bool col_misses_input(int64_t ow) const {
    return window_misses_input(ow, stride_w, padding_w, effective_kernel_w(), dilation_w, in_w);
  }
  // Whether some window has no input element at all (its output is -inf).
  bool has_empty_window() const {
    for (int64_t oh = 0; oh < out_h; ++oh)
      if (row_misses_input(oh)) return true;
    for (int64_t ow = 0; ow < out_w; ++ow)
      if (col_misses_input(ow)) return true;
    return false;
  }
  // 2x2 windows at stride 2, no padding or dilation, each output inside the input: the case the
  // CPU kernels have a dedicated vector kernel for.
  PE_HOST_DEVICE bool is_2x2_stride_2() const {
    return kernel_h == 2 && kernel_w == 2 && stride_h == 2 && stride_w == 2 && dilation_h == 1 &&
           dilation_w == 1 && padding_h == 0 && padding_w == 0 && 2 * out_h <= in_h &&
           2 * out_w <= in_w;
  }
};

}  // namespace pyengine
