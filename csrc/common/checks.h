#pragma once
// Argument checks shared by the CPU, CUDA and Meta kernels of every operator, so a bad call gets
// the same message on every backend. Messages name the operator and the argument and say what was
// expected and what was given, like torch's own.
//
// Size-dependent checks are templates over `Int`: int64_t for real kernels (t.sizes()) and
// c10::SymInt for Meta kernels under dynamic shapes (t.sym_sizes()). A symbolic comparison is
// turned into a bool by guarding on it (`truth`), which is what torch's own meta functions do.
//
// Exception classes follow torch's for the same mistake, so one `except` clause catches both
// libraries' errors: RuntimeError (TORCH_CHECK) for bad shapes, arguments, sizes and mismatched
// dtypes or devices; NotImplementedError, itself a RuntimeError, for dtypes pyengine has no
// kernel for; IndexError for a dim out of range; ValueError only where torch raises one too.
#include <ATen/core/Tensor.h>
#include <c10/core/SymBool.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "geometry.h"

namespace pyengine {

inline bool truth(bool b) { return b; }
inline bool truth(const c10::SymBool& b) { return b.guard_bool(__FILE__, __LINE__); }
inline int64_t concrete(int64_t v) { return v; }
inline int64_t concrete(const c10::SymInt& v) { return v.guard_int(__FILE__, __LINE__); }

template <typename Int>
inline c10::ArrayRef<Int> sizes_of(const at::Tensor& t);
template <>
inline c10::ArrayRef<int64_t> sizes_of<int64_t>(const at::Tensor& t) { return t.sizes(); }
template <>
inline c10::ArrayRef<c10::SymInt> sizes_of<c10::SymInt>(const at::Tensor& t) {
  return t.sym_sizes();
}

// Whether two shapes are the same (symbolic sizes guarded, as every check here).
template <typename Int>
inline bool same_sizes(c10::ArrayRef<Int> a, c10::ArrayRef<Int> b) {
  bool same = a.size() == b.size();
  for (size_t i = 0; same && i < a.size(); ++i) same = truth(a[i] == b[i]);
  return same;
}

// ---- Checked size arithmetic --------------------------------------------------------------
//
// Sizes computed from user arguments (padding, stride, dilation, kernel and group counts may be
// anything up to 2^63 - 1) are computed with overflow checks: plain int64 arithmetic would wrap
// into negative or small sizes, and so into wrong shapes, out-of-bounds writes or messages full of
// nonsense numbers. Each check's error names the arguments and the values given.

// A size's value when it is known: always for int64_t, for a SymInt unless it is symbolic.
// Symbolic sizes (Meta kernels under dynamic shapes) are exact integers in torch's shape
// environment and cannot wrap; the real kernel checks the concrete sizes when it runs.
inline std::optional<int64_t> known(int64_t v) { return v; }
inline std::optional<int64_t> known(const c10::SymInt& v) { return v.maybe_as_int(); }

// a + b and a * b, or nullopt when the exact result does not fit in int64.
inline std::optional<int64_t> add_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}
inline std::optional<int64_t> mul_checked(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// Whether the non-zero sizes multiply within int64. Kernels multiply subsets of a shape (a plane,
// an image), which must fit even when another size is 0 and the tensor holds nothing.
template <typename Int>
bool sizes_multiply_within_int64(c10::ArrayRef<Int> sizes) {
  int64_t product = 1;
  for (const Int& size : sizes) {
    const std::optional<int64_t> v = known(size);
    if (!v || *v == 0) continue;
    const std::optional<int64_t> p = mul_checked(product, *v);
    if (!p) return false;
    product = *p;
  }
  return true;
}

// ceil(a / b) for a >= 0 and b >= 1 (geometry.h's ceil_div), also for a symbolic a.
inline int64_t ceil_div_size(int64_t a, int64_t b) { return ceil_div(a, b); }
inline c10::SymInt ceil_div_size(const c10::SymInt& a, int64_t b) {
  if (const auto v = a.maybe_as_int()) return c10::SymInt(ceil_div(*v, b));
  return (a + (b - 1)) / b;  // exact: symbolic arithmetic does not wrap
}

// ---- Generic checks -----------------------------------------------------------------------

inline void check_defined(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), "pyengine.", op, ": expected ", arg, " to be a tensor, but got None");
}

// float32, float64, bfloat16 and float16 (the last two computed in float32:
// common/low_precision.h); other dtypes are NotImplementedError (a RuntimeError), as in torch for
// the dtypes a kernel lacks.
inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  check_defined(t, op, arg);
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 ||
                                  s == at::kHalf,
                              "pyengine.", op, ": expected ", arg, " to be a float32, float64, "
                              "bfloat16 or float16 tensor, but got ", arg, " of dtype ", s);
}

// `t` must share dtype and device with `ref` (the op's first tensor argument).
inline void check_like(const at::Tensor& t, const char* arg, const at::Tensor& ref,
                       const char* ref_arg, const char* op) {
  check_defined(t, op, arg);
  TORCH_CHECK(t.device() == ref.device(), "pyengine.", op, ": expected ", arg,
              " to be on the same device as ", ref_arg, " (", ref.device(), "), but got ", arg,
              " on ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pyengine.", op, ": expected ", arg,
              " to have the same dtype as ", ref_arg, " (", ref.scalar_type(),
              "), but got ", arg, " of dtype ", t.scalar_type());
}

template <typename Int>
inline void check_same_shape(const at::Tensor& t, const char* arg, const at::Tensor& ref,
                             const char* ref_arg, const char* op) {
  auto a = sizes_of<Int>(t);
  auto b = sizes_of<Int>(ref);
  TORCH_CHECK(same_sizes(a, b), "pyengine.", op, ": expected ", arg,
              " to have the same shape as ", ref_arg, " ", b, ", but got ", arg, " of shape ", a);
}

// Wraps a possibly negative dim into [0, ndim), with torch's IndexError wording.
inline int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op) {
  int64_t n = ndim == 0 ? 1 : ndim;  // a 0-d tensor accepts dim 0 and -1, as in torch
  TORCH_CHECK_INDEX(dim >= -n && dim < n, "pyengine.", op,
                    ": dim out of range (expected to be in range of [", -n, ", ", n - 1,
                    "], but got ", dim, ")");
  return dim < 0 ? dim + n : dim;
}

inline int64_t reduction_from(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "pyengine.", op,
              ": expected reduction to be 0 ('none'), 1 ('mean') or 2 ('sum'), but got ",
              reduction);
  return reduction;
}

// A pair of window parameters, e.g. stride, given as exactly two values.
inline void check_pair(at::IntArrayRef v, const char* op, const char* arg, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, "pyengine.", op, ": expected ", arg,
              " to have 2 values (height, width), but got ", v);
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, "pyengine.", op, ": expected ", arg,
              min_value == 0 ? " to be non-negative" : " to be positive", ", but got ",
              arg, "=", v);
}

// ---- Sliding windows (conv2d, max_pool2d) --------------------------------------------------
// Per axis: the dilated kernel and the padded input are checked to stay below kMaxExtent
// (geometry.h), which keeps every window position a kernel computes inside int64.

inline const char* axis_name(int axis) { return axis == 0 ? "height" : "width"; }

// dilation * (kernel - 1) + 1 along `axis` (kernel >= 1, dilation >= 1). The error shows the
// kernel as the operator's arguments give it: "kernel_size=[3, 3]", "weight of shape [...]".
template <typename Shown>
int64_t checked_effective_kernel(int64_t kernel, at::IntArrayRef dilation, int axis,
                                 const char* op, const char* kernel_arg,
                                 const Shown& kernel_shown,
                                 const char* dilation_arg = "dilation") {
  std::optional<int64_t> eff = mul_checked(dilation[axis], kernel - 1);
  if (eff) eff = add_checked(*eff, 1);
  TORCH_CHECK(eff && *eff < kMaxExtent, "pyengine.", op, ": ", kernel_arg, kernel_shown,
              " with ", dilation_arg, "=", dilation, " overflows: the dilated kernel ",
              axis_name(axis),
              ", dilation * (kernel - 1) + 1, must be below 2^62 (", kMaxExtent, ")");
  return *eff;
}

// input + 2 * padding along `axis` (padding >= 0).
template <typename Int>
Int checked_padded_size(const Int& in, at::IntArrayRef padding, int axis, const char* op,
                        const char* padding_arg = "padding") {
  const std::optional<int64_t> twice = mul_checked(padding[axis], 2);
  bool ok = twice && *twice < kMaxExtent;
  if (ok) {
    if (const std::optional<int64_t> v = known(in)) {
      const std::optional<int64_t> padded = add_checked(*v, *twice);
      ok = padded && *padded < kMaxExtent;
    }
  }
  TORCH_CHECK(ok, "pyengine.", op, ": ", padding_arg, "=", padding, " with input ",
              axis_name(axis), " ", in, " overflows: the padded ", axis_name(axis), ", input ",
              axis_name(axis), " + 2 * ", padding_arg, ", must be below 2^62 (", kMaxExtent, ")");
  return in + *twice;
}

// The output, whose sizes the window arguments decide, must have sizes that multiply within
// int64 (sizes_multiply_within_int64).
template <typename Int>
void check_window_output(const std::vector<Int>& sizes, c10::ArrayRef<Int> input_sizes,
                         at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, const char* op,
                         const char* stride_arg = "stride", const char* padding_arg = "padding",
                         const char* dilation_arg = "dilation", const char* input = "input") {
  const c10::ArrayRef<Int> out(sizes);
  TORCH_CHECK(sizes_multiply_within_int64(out), "pyengine.", op, ": ", stride_arg, "=", stride,
              ", ", padding_arg, "=", padding, " and ", dilation_arg, "=", dilation, " give ",
              input, " of shape ", input_sizes, " an output of shape ", out,
              ", whose sizes multiply beyond int64");
}

// The window arguments, checked by check_pair, into a geometry (geometry.h).
template <class Geometry>
void set_window(Geometry& g, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation) {
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.padding_h = padding[0];
  g.padding_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
}

// ---- Convolution --------------------------------------------------------------------------

// Checks a conv2d call and returns its geometry (geometry.h).
template <typename Int>
Conv2dGeometry<Int> check_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const char* op = "conv2d";
  check_floating(input, op, "input");
  check_like(weight, "weight", input, "input", op);
  check_pair(stride, op, "stride", 1);
  check_pair(padding, op, "padding", 0);
  check_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(groups >= 1, "pyengine.conv2d: expected groups to be positive, but got groups=",
              groups);
  auto in = sizes_of<Int>(input);
  auto w = sizes_of<Int>(weight);
  TORCH_CHECK(in.size() == 3 || in.size() == 4,
              "pyengine.conv2d: expected input to be 3-D (C, H, W) or 4-D (N, C, H, W), but "
              "got input of shape ", in);
  TORCH_CHECK(w.size() == 4,
              "pyengine.conv2d: expected weight to be 4-D (out_channels, in_channels / "
              "groups, kH, kW), but got weight of shape ", w);
  Conv2dGeometry<Int> s;
  set_window(s, stride, padding, dilation);
  s.batched = in.size() == 4;
  const size_t o = s.batched ? 1 : 0;
  s.batch = s.batched ? in[0] : Int(1);
  s.in_channels = in[o];
  s.in_h = in[o + 1];
  s.in_w = in[o + 2];
  s.out_channels = w[0];
  s.kernel_h = concrete(w[2]);
  s.kernel_w = concrete(w[3]);
  s.groups = groups;
  TORCH_CHECK(truth(s.out_channels % groups == 0), "pyengine.conv2d: expected weight's ",
              "out_channels (", s.out_channels, ") to be divisible by groups=", groups);
  // weight's in_channels / groups, times groups: the input's channel count.
  const std::optional<int64_t> w_in = known(w[1]);
  const bool channels_fit = !w_in || mul_checked(*w_in, groups).has_value();
  TORCH_CHECK(channels_fit, "pyengine.conv2d: groups=", groups, " with weight of shape ", w,
              " overflows: the input channels it implies, weight.size(1) * groups, do not fit "
              "in int64");
  const Int expected_channels = w[1] * groups;
  TORCH_CHECK(truth(s.in_channels == expected_channels), "pyengine.conv2d: expected input "
              "of shape ", in, " to have ", expected_channels, " channels (weight of shape ",
              w, " with groups=", groups, "), but got ", s.in_channels, " channels");
  TORCH_CHECK(s.kernel_h >= 1 && s.kernel_w >= 1,
              "pyengine.conv2d: expected a kernel of at least 1x1, but got weight of shape ",
              w);
  const char* kernel_arg = "weight of shape ";
  const int64_t eff_h = checked_effective_kernel(s.kernel_h, dilation, 0, op, kernel_arg, w);
  const int64_t eff_w = checked_effective_kernel(s.kernel_w, dilation, 1, op, kernel_arg, w);
  const Int padded_h = checked_padded_size<Int>(s.in_h, padding, 0, op);
  const Int padded_w = checked_padded_size<Int>(s.in_w, padding, 1, op);
  TORCH_CHECK(truth(padded_h >= eff_h) && truth(padded_w >= eff_w),
              "pyengine.conv2d: expected the (dilated) kernel to fit in the padded input, but "
              "got kernel ", eff_h, "x", eff_w, " and padded input ", padded_h, "x",
              padded_w, " (weight of shape ", w, " with dilation=", dilation,
              ", input of shape ", in, " with padding=", padding, ")");
  if (bias.has_value() && bias->defined()) {
    check_like(*bias, "bias", input, "input", op);
    auto b = sizes_of<Int>(*bias);
    TORCH_CHECK(b.size() == 1 && truth(b[0] == s.out_channels),
                "pyengine.conv2d: expected bias of shape [", s.out_channels,
                "] (weight's out_channels), but got bias of shape ", b);
  }
  // Every window of a convolution lies inside the padded input: no partial windows.
  s.out_h = (padded_h - eff_h) / stride[0] + 1;
  s.out_w = (padded_w - eff_w) / stride[1] + 1;
  check_window_output<Int>(s.output_sizes(), in, stride, padding, dilation, op);
  return s;
}

// ---- Max pooling --------------------------------------------------------------------------

// Output length of a pooling window along one axis, as torch computes it: with ceil_mode a last,
// partial window counts only if it starts inside the input or the left padding. `padded` and
// `effective` come from the checks above (padded >= effective).
template <typename Int>
Int pool_out_size(const Int& in, const Int& padded, int64_t effective, int64_t stride,
                  int64_t padding, bool ceil_mode) {
  const Int span = padded - effective;
  if (!ceil_mode) return span / stride + 1;
  Int out = ceil_div_size(span, stride) + 1;
  // No overflow: (out - 1) * stride is the stride itself or below span + stride < 2 * span.
  if (truth((out - 1) * stride >= in + padding)) out = out - 1;
  return out;
}

// The names a pooling check shows: max_pool2d's own, or those of a fused operator that pools
// its convolution's output (conv2d_relu_max_pool2d: pool_kernel_size, ...).
struct PoolArgNames {
  const char* op;
  const char* kernel_size;
  const char* stride;
  const char* padding;
  const char* dilation;
  const char* input;   // what is pooled
  const char* padded;  // it, padded
};
inline constexpr PoolArgNames kMaxPool2dNames{"max_pool2d", "kernel_size", "stride", "padding",
                                              "dilation", "input", "the padded input"};

// Checks pooling arguments for an input of sizes `in` and returns the geometry (geometry.h).
template <typename Int>
Pool2dGeometry<Int> check_pool2d_window(c10::ArrayRef<Int> in, at::IntArrayRef kernel_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, bool ceil_mode,
                                        const PoolArgNames& n) {
  const char* op = n.op;
  check_pair(kernel_size, op, n.kernel_size, 1);
  check_pair(stride, op, n.stride, 1);
  check_pair(padding, op, n.padding, 0);
  check_pair(dilation, op, n.dilation, 1);
  int64_t eff[2];
  const std::string kernel_arg = std::string(n.kernel_size) + "=";
  for (int i = 0; i < 2; ++i) {
    eff[i] = checked_effective_kernel(kernel_size[i], dilation, i, op, kernel_arg.c_str(),
                                      kernel_size, n.dilation);
    TORCH_CHECK(padding[i] <= eff[i] / 2, "pyengine.", op, ": expected ", n.padding,
                " to be at most half of the effective kernel size, but got ", n.padding, "=",
                padding, ", ", n.kernel_size, "=", kernel_size, " and ", n.dilation, "=",
                dilation);
  }
  TORCH_CHECK(in.size() == 3 || in.size() == 4, "pyengine.", op, ": expected ", n.input,
              " to be 3-D (C, H, W) or 4-D (N, C, H, W), but got ", n.input, " of shape ", in);
  Pool2dGeometry<Int> s;
  s.kernel_h = kernel_size[0];
  s.kernel_w = kernel_size[1];
  set_window(s, stride, padding, dilation);
  s.batched = in.size() == 4;
  const size_t o = s.batched ? 1 : 0;
  s.batch = s.batched ? in[0] : Int(1);
  s.channels = in[o];
  s.in_h = in[o + 1];
  s.in_w = in[o + 2];
  TORCH_CHECK(truth(s.in_h > 0) && truth(s.in_w > 0) && truth(s.channels > 0),
              "pyengine.", op, ": expected ", n.input, " with non-zero channels, height and "
              "width, but got ", n.input, " of shape ", in);
  const Int padded_h = checked_padded_size<Int>(s.in_h, padding, 0, op, n.padding);
  const Int padded_w = checked_padded_size<Int>(s.in_w, padding, 1, op, n.padding);
  TORCH_CHECK(truth(padded_h >= eff[0]) && truth(padded_w >= eff[1]),
              "pyengine.", op, ": expected the (dilated) kernel ", eff[0], "x", eff[1],
              " to fit in ", n.padded, " ", padded_h, "x", padded_w, ", but got ",
              n.kernel_size, "=", kernel_size, " with ", n.dilation, "=", dilation, " and ",
              n.input, " of shape ", in, " with ", n.padding, "=", padding);
  s.out_h = pool_out_size<Int>(s.in_h, padded_h, eff[0], stride[0], padding[0], ceil_mode);
  s.out_w = pool_out_size<Int>(s.in_w, padded_w, eff[1], stride[1], padding[1], ceil_mode);
  TORCH_CHECK(truth(s.out_h > 0) && truth(s.out_w > 0),
              "pyengine.", op, ": expected a non-empty output, but ", n.input, " of shape ", in,
              " gives output ", s.out_h, "x", s.out_w);
  check_window_output<Int>(s.output_sizes(), in, stride, padding, dilation, op, n.stride,
                           n.padding, n.dilation, n.input);
  return s;
}

// Checks a max_pool2d call and returns its geometry (geometry.h).
template <typename Int>
Pool2dGeometry<Int> check_max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool ceil_mode) {
  check_floating(input, "max_pool2d", "input");
  return check_pool2d_window<Int>(sizes_of<Int>(input), kernel_size, stride, padding, dilation,
                                  ceil_mode, kMaxPool2dNames);
}

// ---- Fused: conv2d -> relu -> max_pool2d ------------------------------------------------------

template <typename Int>
struct ConvPoolGeometry {
  Conv2dGeometry<Int> conv;  // input -> the convolution's output
  Pool2dGeometry<Int> pool;  // the convolution's output -> the operator's output
};

inline constexpr PoolArgNames kConvReluPoolNames{
    "conv2d_relu_max_pool2d", "pool_kernel_size", "pool_stride", "pool_padding",
    "pool_dilation", "the convolution's output", "the convolution's padded output"};

// conv2d's checks (with conv2d's messages), then the pooling window's on the convolution's
// output, with the fused operator's argument names.
template <typename Int>
ConvPoolGeometry<Int> check_conv2d_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride, at::IntArrayRef pool_padding,
    at::IntArrayRef pool_dilation, bool pool_ceil_mode) {
  ConvPoolGeometry<Int> s;
  s.conv = check_conv2d<Int>(input, weight, bias, stride, padding, dilation, groups);
  const std::vector<Int> conv_out = s.conv.output_sizes();
  s.pool = check_pool2d_window<Int>(c10::ArrayRef<Int>(conv_out), pool_kernel_size, pool_stride,
                                    pool_padding, pool_dilation, pool_ceil_mode,
                                    kConvReluPoolNames);
  return s;
}

// ---- Linear -------------------------------------------------------------------------------

template <typename Int>
struct LinearShape {
  Int rows;          // product of the input's leading dims
  Int in_features, out_features;
  std::vector<Int> output_sizes;  // input's leading dims + out_features
};

template <typename Int>
LinearShape<Int> check_linear(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  const char* op = "linear";
  check_floating(input, op, "input");
  check_like(weight, "weight", input, "input", op);
  auto in = sizes_of<Int>(input);
  auto w = sizes_of<Int>(weight);
  TORCH_CHECK(in.size() >= 1, "pyengine.linear: expected input to have at least 1 dim "
              "(*, in_features), but got a 0-d input");
  TORCH_CHECK(w.size() == 2, "pyengine.linear: expected weight to be 2-D (out_features, "
              "in_features), but got weight of shape ", w);
  LinearShape<Int> s;
  s.in_features = in[in.size() - 1];
  s.out_features = w[0];
  TORCH_CHECK(truth(s.in_features == w[1]), "pyengine.linear: expected input's last dim "
              "to equal weight's in_features (", w[1], "), but got input of shape ", in,
              " and weight of shape ", w);
  if (bias.has_value() && bias->defined()) {
    check_like(*bias, "bias", input, "input", op);
    auto b = sizes_of<Int>(*bias);
    TORCH_CHECK(b.size() == 1 && truth(b[0] == s.out_features),
                "pyengine.linear: expected bias of shape [", s.out_features,
                "] (weight's out_features), but got bias of shape ", b);
  }
  for (size_t i = 0; i + 1 < in.size(); ++i) s.output_sizes.push_back(in[i]);
  s.output_sizes.push_back(s.out_features);
  // rows * out_features elements out: the output's sizes (and so rows) must multiply in int64.
  TORCH_CHECK(sizes_multiply_within_int64(c10::ArrayRef<Int>(s.output_sizes)),
              "pyengine.linear: input of shape ", in, " and weight of shape ", w,
              " give an output of shape ", c10::ArrayRef<Int>(s.output_sizes),
              ", whose sizes multiply beyond int64");
  s.rows = Int(1);
  for (size_t i = 0; i + 1 < in.size(); ++i) s.rows = s.rows * in[i];
  return s;
}

// ---- Losses -------------------------------------------------------------------------------

// mse_loss and binary_cross_entropy: target (and weight) must match input's shape exactly;
// broadcasting is done, with torch's warning, by the Python layer.
template <typename Int>
void check_pointwise_loss(const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, int64_t reduction,
                          const char* op) {
  check_floating(input, op, "input");
  check_like(target, "target", input, "input", op);
  check_same_shape<Int>(target, "target", input, "input", op);
  if (weight.has_value() && weight->defined()) {
    check_like(*weight, "weight", input, "input", op);
    check_same_shape<Int>(*weight, "weight", input, "input", op);
  }
  reduction_from(reduction, op);
}

// The loss's shape: a scalar unless reduction is 'none'.
template <typename Int>
std::vector<Int> loss_output_sizes(const at::Tensor& input, int64_t reduction) {
  if (reduction != 0) return {};
  auto in = sizes_of<Int>(input);
  return std::vector<Int>(in.begin(), in.end());
}

template <typename Int>
struct CrossEntropyShape {
  bool batched;        // input (N, C) or (N, C, d1, ...) rather than (C)
  bool probabilities;  // target holds class probabilities (input's shape), not class indices
  Int batch, classes;  // N (1 unbatched) and C
  Int inner;           // d1 * d2 * ... (1 without them): the stride between classes
  std::vector<Int> loss_sizes;  // the 'none' loss's (and a class-index target's): (N, d1, ...)
  Int rows() const { return batch * inner; }  // the losses: one per (n, d1, ...)
};

// cross_entropy_with_log_sum_exp's second output: a (hi, lo) pair per row (csrc/ops.cpp).
template <typename Int>
std::vector<Int> log_sum_exp_sizes(const CrossEntropyShape<Int>& s) {
  std::vector<Int> sizes = s.loss_sizes;
  sizes.push_back(Int(2));
  return sizes;
}

// cross_entropy takes what torch's takes: input (C), (N, C) or (N, C, d1, ..., dk) with the
// classes in dim 1, and both kinds of target, told apart by the target's dtype (one operator, as
// torch's one function): int64 class indices of the 'none' loss's shape ((N, d1, ...), or 0-d for
// (C)), or class probabilities of input's shape and dtype. label_smoothing must lie in [0, 1]:
// torch refuses values above 1 and silently ignores negative ones and NaN, which pyengine refuses
// too (they can only be mistakes).
template <typename Int>
CrossEntropyShape<Int> check_cross_entropy(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           int64_t reduction, int64_t ignore_index,
                                           double label_smoothing) {
  const char* op = "cross_entropy";
  check_floating(input, op, "input");
  check_defined(target, op, "target");
  reduction_from(reduction, op);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "pyengine.cross_entropy: "
              "label_smoothing must be between 0.0 and 1.0, but got label_smoothing=",
              label_smoothing);
  auto in = sizes_of<Int>(input);
  auto t = sizes_of<Int>(target);
  TORCH_CHECK(in.size() >= 1, "pyengine.cross_entropy: expected input to be 1-D (C) or 2-D "
              "(N, C) or more (N, C, d1, ...), but got input of shape ", in);
  CrossEntropyShape<Int> s;
  s.batched = in.size() >= 2;
  s.batch = s.batched ? in[0] : Int(1);
  s.classes = s.batched ? in[1] : in[0];
  s.inner = Int(1);
  if (s.batched) s.loss_sizes.push_back(in[0]);
  for (size_t i = 2; i < in.size(); ++i) {
    s.inner = s.inner * in[i];
    s.loss_sizes.push_back(in[i]);
  }
  s.probabilities = target.is_floating_point();
  bool same_shape = t.size() == in.size();
  for (size_t i = 0; same_shape && i < t.size(); ++i) same_shape = truth(t[i] == in[i]);
  if (s.probabilities) {
    TORCH_CHECK(same_shape, "pyengine.cross_entropy: expected a floating target to hold class "
                "probabilities of input's shape ", in, ", but got target of shape ", t,
                " (class indices must be int64)");
    check_like(target, "target", input, "input", op);
    TORCH_CHECK(ignore_index < 0, "pyengine.cross_entropy: ignore_index is not supported for "
                "class-probability targets, but got ignore_index=", ignore_index);
  } else {
    TORCH_CHECK(!same_shape, "pyengine.cross_entropy: a target of input's "
                "shape ", in, " holds class probabilities: expected it to be floating (input's "
                "dtype, ", input.scalar_type(), "), but got target of dtype ",
                target.scalar_type());
    TORCH_CHECK(target.scalar_type() == at::kLong, "pyengine.cross_entropy: expected target "
                "to hold class indices as int64 (or class probabilities of input's shape and "
                "dtype), but got target of dtype ", target.scalar_type());
    TORCH_CHECK(target.device() == input.device(), "pyengine.cross_entropy: expected target to "
                "be on the same device as input (", input.device(), "), but got target on ",
                target.device());
    bool target_ok = t.size() == s.loss_sizes.size();
    for (size_t i = 0; target_ok && i < t.size(); ++i) target_ok = truth(t[i] == s.loss_sizes[i]);
    if (!target_ok) {
      const c10::ArrayRef<Int> want(s.loss_sizes);
      const std::string message =
          !s.batched ? c10::str("pyengine.cross_entropy: expected a 0-d target for input of "
                                "shape ", in, ", but got target of shape ", t)
          : in.size() == 2
              ? c10::str("pyengine.cross_entropy: expected target of shape ", want,
                         " for input of shape ", in, ", but got target of shape ", t)
              : c10::str("pyengine.cross_entropy: expected target of shape ", want,
                         " (int64 class indices) or ", in, " (floating class probabilities) "
                         "for input of shape ", in, ", but got target of shape ", t);
      // torch's classes for the same mistakes: ValueError for a target of the right rank
      // whose batch does not match (a 0-d / 1-d one for (C) / (N, C) input), RuntimeError
      // otherwise.
      const bool batch_mismatch =
          in.size() <= 2 ? t.size() <= 1
                         : t.size() + 1 == in.size() && !truth(t[0] == in[0]);
      TORCH_CHECK_VALUE(!batch_mismatch, message);
      TORCH_CHECK(false, message);
    }
  }
  if (weight.has_value() && weight->defined()) {
    check_like(*weight, "weight", input, "input", op);
    auto w = sizes_of<Int>(*weight);
    TORCH_CHECK(w.size() == 1 && truth(w[0] == s.classes), "pyengine.cross_entropy: "
                "expected weight of shape [", s.classes, "] (one per class), but got "
                "weight of shape ", w);
  }
  return s;
}

// ---- Activations --------------------------------------------------------------------------

// The backward of an elementwise op: grad_output and the saved tensor must agree.
template <typename Int>
void check_elementwise_backward(const at::Tensor& grad_output, const at::Tensor& saved,
                                const char* saved_arg, const char* op) {
  check_floating(grad_output, op, "grad_output");
  check_like(saved, saved_arg, grad_output, "grad_output", op);
  check_same_shape<Int>(saved, saved_arg, grad_output, "grad_output", op);
}


// ---- Backward ops -------------------------------------------------------------------------
// Each backward op re-checks its forward arguments (it is a public operator too) and that
// grad_output has the forward output's shape.

template <typename Int>
void check_grad_output(const at::Tensor& grad_output, const std::vector<Int>& expected,
                       const at::Tensor& input, const char* op) {
  check_like(grad_output, "grad_output", input, "input", op);
  auto g = sizes_of<Int>(grad_output);
  TORCH_CHECK(same_sizes(g, c10::ArrayRef<Int>(expected)), "pyengine.", op,
              ": expected grad_output of shape ",
              c10::ArrayRef<Int>(expected), " (the forward output's), but got grad_output "
              "of shape ", g);
}

template <typename Int>
Conv2dGeometry<Int> check_conv2d_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups) {
  auto s = check_conv2d<Int>(input, weight, std::nullopt, stride, padding, dilation, groups);
  check_grad_output<Int>(grad_output, s.output_sizes(), input, "conv2d_backward");
  return s;
}

template <typename Int>
Pool2dGeometry<Int> check_max_pool2d_backward(const at::Tensor& grad_output,
                                              const at::Tensor& input, const at::Tensor& indices,
                                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                              bool ceil_mode) {
  auto s = check_max_pool2d<Int>(input, kernel_size, stride, padding, dilation, ceil_mode);
  check_grad_output<Int>(grad_output, s.output_sizes(), input, "max_pool2d_backward");
  check_defined(indices, "max_pool2d_backward", "indices");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "pyengine.max_pool2d_backward: expected "
              "indices of dtype int64, but got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == input.device(), "pyengine.max_pool2d_backward: expected "
              "indices on ", input.device(), ", but got indices on ", indices.device());
  auto idx = sizes_of<Int>(indices);
  auto g = sizes_of<Int>(grad_output);
  TORCH_CHECK(same_sizes(idx, g), "pyengine.max_pool2d_backward: expected indices of shape ", g,
              " (grad_output's), but got indices of shape ", idx);
  return s;
}

// The fused backward: the forward's checks, then grad_output, result and indices of the
// forward output's shape (result and grad_output floating like input, indices int64).
template <typename Int>
ConvPoolGeometry<Int> check_conv2d_relu_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& result, const at::Tensor& indices,
    const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride, at::IntArrayRef pool_padding,
    at::IntArrayRef pool_dilation, bool pool_ceil_mode) {
  const char* op = "conv2d_relu_max_pool2d_backward";
  auto s = check_conv2d_relu_max_pool2d<Int>(input, weight, std::nullopt, stride, padding,
                                             dilation, groups, pool_kernel_size, pool_stride,
                                             pool_padding, pool_dilation, pool_ceil_mode);
  const std::vector<Int> expected = s.pool.output_sizes();
  check_grad_output<Int>(grad_output, expected, input, op);
  check_like(result, "result", input, "input", op);
  check_same_shape<Int>(result, "result", grad_output, "grad_output", op);
  check_defined(indices, op, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "pyengine.", op, ": expected indices of "
              "dtype int64, but got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == input.device(), "pyengine.", op, ": expected indices on ",
              input.device(), ", but got indices on ", indices.device());
  check_same_shape<Int>(indices, "indices", grad_output, "grad_output", op);
  return s;
}

template <typename Int>
LinearShape<Int> check_linear_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                       const at::Tensor& weight) {
  auto s = check_linear<Int>(input, weight, std::nullopt);
  check_grad_output<Int>(grad_output, s.output_sizes, input, "linear_backward");
  return s;
}

// grad_output of a loss: a scalar, or input's shape for reduction='none'.
template <typename Int>
void check_pointwise_loss_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                   const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, int64_t reduction,
                                   const char* op) {
  check_pointwise_loss<Int>(input, target, weight, reduction, op);
  check_grad_output<Int>(grad_output, loss_output_sizes<Int>(input, reduction), input, op);
}

template <typename Int>
CrossEntropyShape<Int> check_cross_entropy_backward(const at::Tensor& grad_output,
                                                    const at::Tensor& input,
                                                    const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight,
                                                    int64_t reduction, int64_t ignore_index,
                                                    double label_smoothing,
                                                    const std::optional<at::Tensor>& log_sum_exp) {
  const char* op = "cross_entropy_backward";
  auto s = check_cross_entropy<Int>(input, target, weight, reduction, ignore_index,
                                    label_smoothing);
  check_grad_output<Int>(grad_output, reduction == 0 ? s.loss_sizes : std::vector<Int>{}, input,
                         op);
  if (log_sum_exp.has_value() && log_sum_exp->defined()) {
    // A (hi, lo) pair per row: the 'none' loss's shape, whatever the reduction, then 2.
    check_like(*log_sum_exp, "log_sum_exp", input, "input", op);
    const std::vector<Int> want_sizes = log_sum_exp_sizes(s);
    const c10::ArrayRef<Int> want(want_sizes), got = sizes_of<Int>(*log_sum_exp);
    TORCH_CHECK(same_sizes(got, want), "pyengine.", op, ": expected log_sum_exp of shape ", want,
                " (a pair per row of input, as "
                "cross_entropy_with_log_sum_exp returns it), but got log_sum_exp of shape ", got);
  }
  return s;
}

}  // namespace pyengine
