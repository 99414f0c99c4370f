#pragma once
// bfloat16 and float16 on every operator: PE_KERNEL(fn) registers a kernel `fn` (the CPU
// kernels; written for float32 and float64) so that a call whose floating tensors are all bfloat16, or
// all float16, runs `fn` on float32 copies of them and returns its floating results in that
// dtype. Accumulation is float32's, and every result is rounded once, as torch's own kernels do
// for these dtypes (they accumulate in float32 too); the operators' float32 arithmetic is the
// one reference for all four dtypes.
//
// A call that mixes dtypes (bfloat16 with float32, or bfloat16 with float16) reaches `fn`
// unconverted, whose checks name the mismatch (common/checks.h). Integer tensors (class indices,
// pooling indices) pass through either way. Other dtypes are refused by the checks, which list
// the four supported ones.
//
// Cost: one conversion pass over each low-precision input and each result (memory-bound, a few
// percent of a convolution or GEMM; as much as the op itself for elementwise ones). The copies'
// memory comes from the operators' output cache on the CPU (empty_of, common/layout.h): from
// torch's allocator, LeNet's bf16 step at batch 256 took ~550 page faults a step in them, and
// each copy of a 1.2 MB activation cost 120 us instead of ~20.
//
// Kernels with 16-bit code of their own skip the conversion: PE_KERNEL_NATIVE_BF16 (bfloat16
// where a predicate says so: the CPU's bfloat16 linear and conv2d on AMX tiles; everywhere for
// the activations, whose loops convert as they load and store, and the fused
// conv2d_relu_max_pool2d, which reads its 16-bit gradient where it masks it) and PE_KERNEL_NATIVE_16BIT (both
// 16-bit dtypes, always: the CUDA kernels, which read and write bfloat16 / float16 memory and
// compute in float32 inside, rounding each result once, the same arithmetic as above).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/ScalarType.h>

#include "common/layout.h"
#include "cpu/convert.h"

#include <optional>
#include <tuple>
#include <utility>

namespace pyengine {
namespace low_precision {

inline bool is_low(c10::ScalarType t) { return t == c10::kHalf || t == c10::kBFloat16; }

// The dtype every floating tensor argument shares, if it is bfloat16 or float16.
class Scan {
 public:
  void add(const at::Tensor& t) {
    if (!t.defined() || !c10::isFloatingType(t.scalar_type())) return;
    const c10::ScalarType s = t.scalar_type();
    if (!is_low(s) || (low_ && *low_ != s)) mixed_ = true;
    low_ = s;
  }
  void add(const std::optional<at::Tensor>& t) {
    if (t) add(*t);
  }
  template <typename A>
  void add(const A&) {}
  std::optional<c10::ScalarType> common_low() const {
    if (mixed_ || !low_ || !is_low(*low_)) return std::nullopt;
    return low_;
  }

 private:
  std::optional<c10::ScalarType> low_;
  bool mixed_ = false;
};

// t in dtype `to`, with t's strides (t dense: non-overlapping, no gaps, so its elements fill
// numel() consecutive slots from its data pointer in either dtype). bfloat16 <-> float32 and
// float16 <-> float32 on the CPU take pyengine's own loops (cpu/convert.h: torch's copy_ costs
// twice as much at LeNet's sizes); other pairs, and CUDA tensors, torch's copy_.
inline at::Tensor converted_dense(const at::Tensor& t, c10::ScalarType to) {
  at::Tensor out = empty_strided_of(t.sizes(), t.strides(), t.options().dtype(to));
  const c10::ScalarType from = t.scalar_type();
  if (t.is_cpu() && from == c10::kBFloat16 && to == c10::kFloat)
    cpu::widen_bf16(t.const_data_ptr<c10::BFloat16>(), out.mutable_data_ptr<float>(), t.numel());
  else if (t.is_cpu() && from == c10::kFloat && to == c10::kBFloat16)
    cpu::narrow_bf16(t.const_data_ptr<float>(), out.mutable_data_ptr<c10::BFloat16>(), t.numel());
  else if (t.is_cpu() && from == c10::kHalf && to == c10::kFloat)
    cpu::widen_f16(t.const_data_ptr<c10::Half>(), out.mutable_data_ptr<float>(), t.numel());
  else if (t.is_cpu() && from == c10::kFloat && to == c10::kHalf)
    cpu::narrow_f16(t.const_data_ptr<float>(), out.mutable_data_ptr<c10::Half>(), t.numel());
  else
    out.copy_(t);
  return out;
}

// A float32 copy with t's very strides (Tensor::to keeps them only for dense tensors): the
// kernels choose their results' layouts from their inputs' strides, as torch does, so a strided
// or expanded 16-bit input must look the same in float32. The storage range t covers is widened
// (gaps included) and viewed with t's sizes and strides. That range is t's elements for dense
// tensors, twice them for every-other-element views, but the whole source for a thin slice of a
// wide tensor (x[:, :1]): never more than the source storage, whose bytes the copy at most
// doubles. Exact strides are worth it: layouts are part of each operator's contract.
inline at::Tensor widen(const at::Tensor& t) {
  if (!t.defined() || !is_low(t.scalar_type())) return t;
  if (t.is_non_overlapping_and_dense()) return converted_dense(t, c10::kFloat);
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) == 0)
      return at::empty_strided(t.sizes(), t.strides(), t.options().dtype(c10::kFloat));
    span += (t.size(d) - 1) * t.stride(d);
  }
  const at::Tensor covered =
      converted_dense(t.as_strided({span}, {1}, t.storage_offset()), c10::kFloat);
  return covered.as_strided(t.sizes(), t.strides(), covered.storage_offset());
}
inline std::optional<at::Tensor> widen(const std::optional<at::Tensor>& t) {
  if (!t) return t;
  return widen(*t);
}
template <typename A>
const A& widen(const A& a) {
  return a;
}

// Results: float32 tensors back to `low` (strides kept: Tensor::to preserves the layout).
inline at::Tensor narrow(at::Tensor t, c10::ScalarType low) {
  if (!t.defined() || t.scalar_type() != c10::kFloat) return t;
  return t.is_non_overlapping_and_dense() ? converted_dense(t, low) : t.to(low);
}
template <typename... Ts>
std::tuple<Ts...> narrow(std::tuple<Ts...> t, c10::ScalarType low) {
  return std::apply([&](auto&... r) { return std::tuple<Ts...>(narrow(std::move(r), low)...); },
                    t);
}

// The predicate of kernels whose bfloat16 code runs on every CPU (PE_KERNEL_NATIVE_BF16(fn,
// low_precision::always)): portable loads that widen and stores that round (cpu/convert.h).
inline bool always() { return true; }

// native_bf16: when not null and it returns true, bfloat16 calls reach fn as they are (fn has
// bfloat16 code of its own for this machine: linear on AVX512_BF16).
template <typename Fn, Fn* fn, bool (*native_bf16)() = nullptr>
struct Float32Inside;
template <typename R, typename... Args, R (*fn)(Args...), bool (*native_bf16)()>
struct Float32Inside<R(Args...), fn, native_bf16> {
  static R call(Args... args) {
    Scan scan;
    (scan.add(args), ...);
    const std::optional<c10::ScalarType> low = scan.common_low();
    if (!low) return fn(args...);
    if constexpr (native_bf16 != nullptr) {
      if (*low == c10::kBFloat16 && native_bf16()) return fn(args...);
    }
    return narrow(fn(widen(args)...), *low);
  }
};

}  // namespace low_precision
}  // namespace pyengine

// For m.impl("name", PE_KERNEL(name_cpu)) in TORCH_LIBRARY_IMPL(pyengine, CPU / CUDA, m).
#define PE_KERNEL(fn)                                                                      \
  TORCH_FN((::pyengine::low_precision::Float32Inside<std::remove_pointer_t<decltype(&fn)>, \
                                                     &fn>::call))
// The same, for a kernel that computes bfloat16 itself wherever available() says so.
#define PE_KERNEL_NATIVE_BF16(fn, available)                                               \
  TORCH_FN((::pyengine::low_precision::Float32Inside<std::remove_pointer_t<decltype(&fn)>, \
                                                     &fn, &available>::call))
// For a kernel that computes bfloat16 and float16 itself (dispatch_floating_16bit, common/
// dispatch.h): every call reaches fn as it is. A call whose floating tensors are all one 16-bit
// dtype runs fn's 16-bit code; a call that mixes dtypes is refused by fn's checks, with the
// messages it gets under PE_KERNEL.
#define PE_KERNEL_NATIVE_16BIT(fn) TORCH_FN(fn)
