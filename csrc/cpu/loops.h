#pragma once
// Elementwise loop helpers for CPU kernels: dtype dispatch, contiguity, and at::parallel_for
// over flat ranges, so each kernel file states only its per-element math.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/checks.h"
#include "common/dispatch.h"

namespace pyengine {

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kElementwiseGrain = 32768;

// out[i] = f(in[i]) over a contiguous copy of `input` (a no-op when already contiguous).
// The result is a fresh contiguous tensor of input's shape.
template <typename F>
at::Tensor map_unary(const at::Tensor& input, const char* op, F f) {
  check_floating(input, op, "input");
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
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

// out[i] = f(a[i], b[i]); callers have checked that a and b share shape, dtype and device.
template <typename F>
at::Tensor map_binary(const at::Tensor& a, const at::Tensor& b, const char* op, F f) {
  const at::Tensor x = a.contiguous();
  const at::Tensor y = b.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
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
