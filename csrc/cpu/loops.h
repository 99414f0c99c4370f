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
#include "cpu/convert.h"
#include "cpu/isa.h"

namespace pyengine {

// Elements per parallel task: below this, threading costs more than it saves.
constexpr int64_t kElementwiseGrain = 32768;

// How a loop reads and writes its storage type S: bfloat16 is widened to float32 on load and
// rounded once on store (cpu/convert.h), so a bfloat16 call computes exactly what its float32
// copies would, in one pass instead of three (widen, compute, narrow); float and double as
// they are.
template <typename S>
struct Storage {
  static PE_INLINE S load(S v) { return v; }
  static PE_INLINE S store(S v) { return v; }
};
template <>
struct Storage<c10::BFloat16> {
  static PE_INLINE float load(c10::BFloat16 v) { return cpu::bf16_to_float(v); }
  static PE_INLINE c10::BFloat16 store(float v) { return cpu::float_to_bf16(v); }
};

// The loops themselves, compiled once per instruction-set level (cpu/isa.h) with the caller's
// per-element function inlined, over restrict pointers (outputs are fresh tensors: no aliasing)
// so that the compiler vectorizes them: the per-element math must be branch-free for that
// (cpu/activation.cpp). Called on each parallel task's range.
template <typename T, typename F>
PE_INLINE void unary_loop(const T* __restrict__ x, T* __restrict__ out, int64_t n, const F& f) {
  for (int64_t i = 0; i < n; ++i) out[i] = Storage<T>::store(f(Storage<T>::load(x[i])));
}
template <typename T, typename F>
PE_INLINE void binary_loop(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                           int64_t n, const F& f) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = Storage<T>::store(f(Storage<T>::load(a[i]), Storage<T>::load(b[i])));
}
template <typename T, typename F>
PE_TARGET_AVX512 void unary_loop_avx512(const T* x, T* out, int64_t n, const F& f) {
  unary_loop(x, out, n, f);
}
template <typename T, typename F>
PE_TARGET_AVX2 void unary_loop_avx2(const T* x, T* out, int64_t n, const F& f) {
  unary_loop(x, out, n, f);
}
template <typename T, typename F>
void unary_loop_default(const T* x, T* out, int64_t n, const F& f) {
  unary_loop(x, out, n, f);
}
template <typename T, typename F>
PE_TARGET_AVX512 void binary_loop_avx512(const T* a, const T* b, T* out, int64_t n, const F& f) {
  binary_loop(a, b, out, n, f);
}
template <typename T, typename F>
PE_TARGET_AVX2 void binary_loop_avx2(const T* a, const T* b, T* out, int64_t n, const F& f) {
  binary_loop(a, b, out, n, f);
}
template <typename T, typename F>
void binary_loop_default(const T* a, const T* b, T* out, int64_t n, const F& f) {
  binary_loop(a, b, out, n, f);
}

// f(scalar_t{}) for the storage types the elementwise loops take: float32, float64 and
// bfloat16 (registered with PE_KERNEL_NATIVE_BF16(..., low_precision::always): bfloat16 calls
// arrive as they are; float16 ones as float32 copies).
template <typename F>
void dispatch_elementwise(c10::ScalarType dtype, const char* op, F&& f) {
  if (dtype == c10::ScalarType::BFloat16)
    f(c10::BFloat16{});
  else
    dispatch_floating(dtype, op, f);
}

// out = f(input) elementwise, out laid out as torch lays out a unary op's output. f must be
// callable from every level's build: a lambda declared PE_INLINE-free is inlined into each (GCC
// inlines a function of the baseline target into a wider one).
template <typename F>
at::Tensor map_unary(const at::Tensor& input, const char* op, F f) {
  check_floating(input, op, "input");
  at::Tensor out = empty_elementwise<int64_t>({&input}, input.options());
  const at::Tensor x = in_order_of(input, out);
  const cpu::Isa level = cpu::isa_for(cpu::Family::Elementwise);
  dispatch_elementwise(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      switch (level) {
        case cpu::Isa::Avx512:
          return unary_loop_avx512(px + begin, po + begin, n, f);
        case cpu::Isa::Avx2:
          return unary_loop_avx2(px + begin, po + begin, n, f);
        default:
          return unary_loop_default(px + begin, po + begin, n, f);
      }
    });
  });
  return out;
}

// map_unary, but float32 and bfloat16 take `avx512_float(x, out, n)` (a loop over float
// arrays written with AVX-512 intrinsics) where the elementwise level is avx512: bfloat16 in
// blocks widened into a float tile, then rounded once, so that a bfloat16 call still computes
// exactly what the float32 kernel does. f serves float64 and the other levels.
template <typename F>
at::Tensor map_unary_avx512_float(const at::Tensor& input, const char* op, F f,
                                  void (*avx512_float)(const float*, float*, int64_t)) {
  const c10::ScalarType dtype = input.scalar_type();
  if (cpu::isa_for(cpu::Family::Elementwise) != cpu::Isa::Avx512 ||
      (dtype != c10::kFloat && dtype != c10::kBFloat16))
    return map_unary(input, op, f);
  check_floating(input, op, "input");
  at::Tensor out = empty_elementwise<int64_t>({&input}, input.options());
  const at::Tensor x = in_order_of(input, out);
  at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
    if (dtype == c10::kFloat) {
      avx512_float(x.const_data_ptr<float>() + begin, out.mutable_data_ptr<float>() + begin,
                   end - begin);
      return;
    }
    constexpr int64_t kTile = 512;
    alignas(64) float tile[kTile];
    const c10::BFloat16* px = x.const_data_ptr<c10::BFloat16>();
    c10::BFloat16* po = out.mutable_data_ptr<c10::BFloat16>();
    for (int64_t i = begin; i < end; i += kTile) {
      const int64_t n = std::min(kTile, end - i);
      cpu::widen_range(px + i, tile, n);
      avx512_float(tile, tile, n);
      cpu::narrow_range(tile, po + i, n);
    }
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
  const cpu::Isa level = cpu::isa_for(cpu::Family::Elementwise);
  dispatch_elementwise(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      switch (level) {
        case cpu::Isa::Avx512:
          return binary_loop_avx512(px + begin, py + begin, po + begin, n, f);
        case cpu::Isa::Avx2:
          return binary_loop_avx2(px + begin, py + begin, po + begin, n, f);
        default:
          return binary_loop_default(px + begin, py + begin, po + begin, n, f);
      }
    });
  });
  return out;
}

}  // namespace pyengine
