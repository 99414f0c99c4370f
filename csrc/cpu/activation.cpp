// CPU kernels of the elementwise activations (relu, leaky_relu, sigmoid, tanh) and their
// backward passes. The per-element math lives in common/elementwise.h, shared with CUDA.
//
// Napkin math: each op reads one (forward) or two (backward) arrays and writes one, with a few
// flops per element: memory-bound. A 1M-float relu moves 8 MB: from L3 at ~35 GB/s per core
// (reference machine: csrc/cpu/README.md) ~0.12 ms on 2 cores, ~0.4 ms from DRAM (~20 GB/s);
// small tensors are dominated by host overhead (docs/design.md). Achieved figures: the benchmark
// suite (python -m benchmarks).
#include <torch/library.h>

#include <immintrin.h>

#include "common/checks.h"
#include "common/elementwise.h"
#include "common/low_precision.h"
#include "cpu/loops.h"
#include "cpu/tanh_table.h"
#include "cpu/vec_math.h"

namespace pyengine {
namespace {

using at::Tensor;

// The CPU loops want branch-free per-element math so they vectorize: a data-dependent branch on
// the sign mispredicts half the time on random data (~15 cycles each, several ns per element,
// where the vector loop takes a fraction of a ns), and libm's exp / tanh do not vectorize.

template <typename T>
inline T leaky_relu_select(T x, T slope) {
  const T scaled = x * slope;  // computed either way, then selected: NaN * slope is NaN
  return x > T(0) ? x : scaled;
}
template <typename T>
inline T leaky_relu_grad_select(T grad, T x, T slope) {
  const T scaled = grad * slope;
  return x > T(0) ? grad : scaled;
}

// sigmoid with one exp and no branch: e = exp(-|x|) never overflows; x >= 0 gives 1 / (1 + e),
// x < 0 gives e / (1 + e). NaN propagates through e.
template <typename T>
inline T sigmoid_branch_free(T x) {
  const T e = fast_exp_nonpositive(-std::abs(x));
  const T r = T(1) / (T(1) + e);
  return x >= T(0) ? r : e * r;
}

// tanh in float: for |x| < 0.5 the odd Taylor series to x^15 (truncation below 2e-8 relative),
// which avoids the cancellation in 1 - e near 0; elsewhere 1 - 2 / (exp(2|x|) + 1) with x's
// sign. float64 keeps libm's tanh (scalar, exact to an ulp).
inline float tanh_branch_free(float x) {
  const float x2 = x * x;
  float p = -929569.0f / 638512875.0f;
  p = p * x2 + 21844.0f / 6081075.0f;
  p = p * x2 - 1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float small = x + x * x2 * p;
  const float a = std::abs(x);
  const float large = std::copysign(1.0f - 2.0f / (fast_exp(2.0f * a) + 1.0f), x);
  return a < 0.5f ? small : large;  // NaN: a < 0.5 is false, and `large` is NaN
}
inline double tanh_branch_free(double x) { return tanh_fwd(x); }

// tanh for 16 floats in AVX-512 intrinsics, without a division: tanh|x| on 32 intervals (quarters
// of the binades 2^-4 .. 2^4, the first from 0, |x| clamped to 9.1 where tanh rounds to 1), a
// degree-5 polynomial on each, its centre and coefficients looked up by vpermt2ps with |x|'s
// exponent and top two mantissa bits as the index (cpu/tanh_table.h, fitted and written by
// tools/fit_tanh_table.py). 19 vector instructions; the exp-and-reciprocal formula it replaces
// (expm1 by range reduction and a degree-8 polynomial, m / (m + 2) by rcp14 and a Newton step)
// took 27, and ran at 1.3x torch's time (MKL's table-driven vsTanh) on 301 K elements, one
// thread: 0.61-0.67x its time in a standalone loop, five runs. Error: at most 0.92 units of
// 2^-23 |tanh x| against float64 over every float (checked exhaustively; the old formula 1.68),
// x itself for tiny and denormal x, NaN for NaN.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
PE_TARGET_AVX512 PE_INLINE __m512 tanh_lookup(const float* table, __m512i lane) {
  return _mm512_permutex2var_ps(_mm512_load_ps(table), lane, _mm512_load_ps(table + 16));
}
PE_TARGET_AVX512 PE_INLINE __m512 tanh16(__m512 x) {
  namespace tt = tanh_table;
  // min's second operand is what a NaN passes through: NaN stays NaN all the way
  const __m512 a = _mm512_min_ps(_mm512_set1_ps(tt::kTop), _mm512_abs_ps(x));
  // below 2^-4 the first interval's lane (the first binade's first quarter)
  const __m512i lane = _mm512_srli_epi32(
      _mm512_castps_si512(_mm512_max_ps(a, _mm512_set1_ps(tt::kFirstBinade))), 21);
  const __m512 u = _mm512_sub_ps(a, tanh_lookup(tt::kCentre, lane));
  __m512 y = tanh_lookup(tt::kCoef[tt::kDegree], lane);
  for (int k = tt::kDegree - 1; k >= 0; --k)
    y = _mm512_fmadd_ps(y, u, tanh_lookup(tt::kCoef[k], lane));
  // x's sign on y (non-negative): a bit select, the sign bit from x (0xca)
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(sign, _mm512_castps_si512(x),
                                                       _mm512_castps_si512(y), 0xca));
}
PE_TARGET_AVX512 void tanh_avx512_float(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, tanh16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(out + i, m, tanh16(_mm512_maskz_loadu_ps(m, x + i)));
  }
}
#pragma GCC diagnostic pop

Tensor relu_cpu(const Tensor& input) {
  return map_unary(input, "relu", [](auto x) { return relu_fwd(x); });
}
Tensor relu_backward_cpu(const Tensor& grad_output, const Tensor& result) {
  check_elementwise_backward<int64_t>(grad_output, result, "result", "relu_backward");
  return map_binary(empty_activation_backward<int64_t>(grad_output, result, kReluBackwardLead),
                    grad_output, result, "relu_backward",
                    [](auto g, auto y) { return relu_bwd(g, y); });
}

Tensor leaky_relu_cpu(const Tensor& input, double negative_slope) {
  return map_unary(input, "leaky_relu", [negative_slope](auto x) {
    using T = decltype(x);
    return leaky_relu_select(x, static_cast<T>(negative_slope));
  });
}
Tensor leaky_relu_backward_cpu(const Tensor& grad_output, const Tensor& input,
                               double negative_slope) {
  check_elementwise_backward<int64_t>(grad_output, input, "input", "leaky_relu_backward");
  Tensor out = empty_activation_backward<int64_t>(grad_output, input, kLeakyReluBackwardLead);
  return map_binary(out, grad_output, input, "leaky_relu_backward",
                    [negative_slope](auto g, auto x) {
                      using T = decltype(x);
                      return leaky_relu_grad_select(g, x, static_cast<T>(negative_slope));
                    });
}

Tensor sigmoid_cpu(const Tensor& input) {
  return map_unary(input, "sigmoid", [](auto x) { return sigmoid_branch_free(x); });
}
Tensor sigmoid_backward_cpu(const Tensor& grad_output, const Tensor& result) {
  check_elementwise_backward<int64_t>(grad_output, result, "result", "sigmoid_backward");
  return map_binary(empty_activation_backward<int64_t>(grad_output, result, kSigmoidBackwardLead),
                    grad_output, result, "sigmoid_backward",
                    [](auto g, auto y) { return sigmoid_bwd(g, y); });
}

Tensor tanh_cpu(const Tensor& input) {
  return map_unary_avx512_float(input, "tanh", [](auto x) { return tanh_branch_free(x); },
                                tanh_avx512_float);
}
Tensor tanh_backward_cpu(const Tensor& grad_output, const Tensor& result) {
  check_elementwise_backward<int64_t>(grad_output, result, "result", "tanh_backward");
  return map_binary(empty_activation_backward<int64_t>(grad_output, result, kTanhBackwardLead),
                    grad_output, result, "tanh_backward",
                    [](auto g, auto y) { return tanh_bwd(g, y); });
}

}  // namespace

// bfloat16 natively (cpu/loops.h converts as it loads and stores: one pass, not three);
// float16 on float32 copies.
TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("relu", PE_KERNEL_NATIVE_BF16(relu_cpu, low_precision::always));
  m.impl("relu_backward", PE_KERNEL_NATIVE_BF16(relu_backward_cpu, low_precision::always));
  m.impl("leaky_relu", PE_KERNEL_NATIVE_BF16(leaky_relu_cpu, low_precision::always));
  m.impl("leaky_relu_backward",
         PE_KERNEL_NATIVE_BF16(leaky_relu_backward_cpu, low_precision::always));
  m.impl("sigmoid", PE_KERNEL_NATIVE_BF16(sigmoid_cpu, low_precision::always));
  m.impl("sigmoid_backward", PE_KERNEL_NATIVE_BF16(sigmoid_backward_cpu, low_precision::always));
  m.impl("tanh", PE_KERNEL_NATIVE_BF16(tanh_cpu, low_precision::always));
  m.impl("tanh_backward", PE_KERNEL_NATIVE_BF16(tanh_backward_cpu, low_precision::always));
}

}  // namespace pyengine
