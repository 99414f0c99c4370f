#pragma once
// Elementwise loop helpers for CPU kernels: dtype dispatch, output layout, and at::parallel_for
// over flat ranges, so each kernel file states only its per-element math.
//
// Outputs have the strides torch gives (common/layout.h): a dense input keeps its layout
// (channels_last, transposed, ...) and the loop runs straight over its storage, in storage order,
// with no copy; only an operand laid out differently from the output is copied into its order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"

namespace pyengine {

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kElementwiseGrain = 32768;

// out = f(input) elementwise, out laid out as torch lays out a unary op's output.
template <typename F>
at::Tensor map_unary(const at::Tensor& input, const char* op, F f) {
  check_floating(input, op, "input");
  at::Tensor out = empty_elementwise<int64_t>({&input}, input.options());
  const at::Tensor x = in_order_of(input, out);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) po[i] = f(px[i]);
    });
  });
  return out;
}

// out = f(a, b) elementwise into `out`, a fresh dense tensor of their shape (its layout chosen by
// the caller); callers have checked that a and b share shape, dtype and device.
template <typename F>
at::Tensor map_binary(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const char* op,
                      F f) {
  const at::Tensor x = in_order_of(a, out);
  const at::Tensor y = in_order_of(b, out);
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) po[i] = f(px[i], py[i]);
    });
  });
  return out;
}

}  // namespace pyengine
