// CPU kernels of linear (y = x W^T + b) and linear_backward, on pyengine's GEMM (cpu/gemm.h).
//
// Shapes: x (rows, in) after flattening the leading dims, W (out, in), y (rows, out).
//   forward      y  = x W^T       gemm(rows, out, in):  x and W both run along `in`: the dot
//                                 kernel for few rows, else the outer product on transposed panels
//   grad_input   dx = dy W        gemm(rows, in, out):  outer-product kernel, dy packed
//   grad_weight  dW = dy^T x      gemm(out, in, rows):  outer-product kernel, both read in place
//   grad_bias    db = sum_r dy    column sums, rows in order
// Narrow layers (in_features <= a vector, out_features <= 8, AVX-512) skip the GEMM: see below.
// The output is contiguous; dx and dW are contiguous or column-major, as torch's mm backward lays
// them out (common/layout.h): the GEMM writes either layout directly through C's strides.
//
// Napkin math, LeNet fc1 (400 -> 120) at batch 256, fp32: each GEMM is 2*256*400*120 = 24.6 MFLOP
// over 0.4 MB (x) + 0.19 MB (W) + 0.12 MB (y): ~35 FLOP/byte, compute-bound. At ~240 GFLOP/s per
// core (reference machine: csrc/cpu/README.md) the floor is ~0.05 ms per GEMM on 2 cores, ~0.15 ms
// for forward + backward; the bias and its gradient move 0.12 MB each (a few microseconds).
// Achieved figures: the benchmark suite (python -m benchmarks).
//
// Determinism: every output element is reduced by one task in a fixed order (gemm_parallel splits
// only over output tiles, from the shapes), and grad_bias sums each column over rows in order:
// results are bitwise identical across runs and thread counts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "common/low_precision.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"

namespace pyengine {
namespace {

using at::Tensor;

// out[j] = sum over r of g[r * ld + j] for j in [j0, j1), r in order (vectorised across j).
template <typename T>
PE_INLINE void column_sums_impl(const T* g, int64_t rows, int64_t ld, int64_t j0, int64_t j1,
                                T* out) {
  for (int64_t j = j0; j < j1; ++j) out[j] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = g + r * ld;
    for (int64_t j = j0; j < j1; ++j) out[j] += row[j];
  }
}
#define PE_DEFINE_COLUMN_SUMS(T)                                                            \
  PE_ISA_FUNCTION(Family::Linear, void, column_sums,                                        \
                  (const T* g, int64_t rows, int64_t ld, int64_t j0, int64_t j1, T* out),   \
                  (g, rows, ld, j0, j1, out), column_sums_impl<T>)
PE_DEFINE_COLUMN_SUMS(float)
PE_DEFINE_COLUMN_SUMS(double)
#undef PE_DEFINE_COLUMN_SUMS

// ---- Narrow layers: a few inputs and outputs (the 5-8-4-1 classifier) --------------------------
// With in_features and out_features below a vector, the GEMM's tiles are mostly padding and its
// packing and tile set-up cost more than the multiply-adds (4096 x 8 -> 4: 131 K multiply-adds,
// 46 us through gemm_parallel where torch took 32). Here a row is one vector over the outputs
// (forward, grad_input) or over the inputs (grad_weight): per row `in` (or `out`) broadcast
// FMAs and one masked store. AVX-512 only; other levels take the GEMM.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kW = 16;
  PE_TARGET_AVX512 static V zero() { return _mm512_setzero_ps(); }
  PE_TARGET_AVX512 static V set1(float a) { return _mm512_set1_ps(a); }
  PE_TARGET_AVX512 static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  PE_TARGET_AVX512 static void store(M m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  PE_TARGET_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  PE_TARGET_AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
};
template <>
struct Lanes<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int kW = 8;
  PE_TARGET_AVX512 static V zero() { return _mm512_setzero_pd(); }
  PE_TARGET_AVX512 static V set1(double a) { return _mm512_set1_pd(a); }
  PE_TARGET_AVX512 static V load(M m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  PE_TARGET_AVX512 static void store(M m, double* p, V v) { _mm512_mask_storeu_pd(p, m, v); }
  PE_TARGET_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  PE_TARGET_AVX512 static V add(V a, V b) { return _mm512_add_pd(a, b); }
};

constexpr int64_t kNarrowOut = 8;        // outputs: accumulators of grad_weight stay in registers
constexpr int64_t kNarrowChunk = 512;    // rows per grad_weight / grad_bias partial sum

template <typename T>
bool narrow(int64_t in, int64_t o) {
  static const bool avx512 = cpu::isa_for(cpu::Family::Linear) == cpu::Isa::Avx512;
  return avx512 && in <= Lanes<T>::kW && o <= kNarrowOut;
}
template <typename T>
typename Lanes<T>::M lane_mask(int64_t n) {
  return static_cast<typename Lanes<T>::M>((uint32_t(1) << n) - 1u);
}

// y[r, :] = sum_k x[r, k] W[:, k] (+ b), k in order, for r in [r0, r1).
template <typename T>
PE_TARGET_AVX512 void narrow_forward(const T* x, const T* w, const T* b, T* y, int64_t in,
                                     int64_t o, int64_t r0, int64_t r1) {
  using L = Lanes<T>;
  alignas(64) T cols[Lanes<T>::kW][Lanes<T>::kW] = {};  // cols[k][j] = W[j, k]
  for (int64_t j = 0; j < o; ++j)
    for (int64_t k = 0; k < in; ++k) cols[k][j] = w[j * in + k];
  const auto om = lane_mask<T>(o);
  const typename L::V bias = b ? L::load(om, b) : L::zero();
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * in;
    typename L::V acc = L::zero();
    for (int64_t k = 0; k < in; ++k) acc = L::fma(L::set1(xr[k]), L::load(om, cols[k]), acc);
    L::store(om, y + r * o, L::add(acc, bias));
  }
}

// Rows [r0, r1): dx[r, :] = sum_j dy[r, j] W[j, :] (when dx is not null; contiguous), and into
// part ([kNarrowOut + 1][kW]): part[j] += dy[r, j] x[r, :] and part[kNarrowOut] += dy[r, :].
template <typename T>
PE_TARGET_AVX512 void narrow_backward(const T* dy, const T* x, const T* w, T* dx, T* part,
                                      int64_t in, int64_t o, int64_t r0, int64_t r1) {
  using L = Lanes<T>;
  constexpr int W = Lanes<T>::kW;
  const auto im = lane_mask<T>(in), om = lane_mask<T>(o);
  typename L::V rows[kNarrowOut], acc[kNarrowOut];
  for (int64_t j = 0; j < kNarrowOut; ++j) {
    rows[j] = j < o ? L::load(im, w + j * in) : L::zero();
    acc[j] = L::load(static_cast<typename L::M>(~0u), part + j * W);
  }
  typename L::V bacc = L::load(static_cast<typename L::M>(~0u), part + kNarrowOut * W);
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = dy + r * o;
    const typename L::V xr = L::load(im, x + r * in);
    typename L::V d = L::zero();
    for (int64_t j = 0; j < o; ++j) {
      const typename L::V gj = L::set1(g[j]);
      d = L::fma(gj, rows[j], d);
      acc[j] = L::fma(gj, xr, acc[j]);
    }
    bacc = L::add(bacc, L::load(om, g));
    if (dx) L::store(im, dx + r * in, d);
  }
  for (int64_t j = 0; j < kNarrowOut; ++j)
    L::store(static_cast<typename L::M>(~0u), part + j * W, acc[j]);
  L::store(static_cast<typename L::M>(~0u), part + kNarrowOut * W, bacc);
}

// ---- bfloat16 on AVX512_BF16 --------------------------------------------------------------------
// Registered with PE_KERNEL_NATIVE_BF16: where cpu::gemm_bf16_available(), bfloat16 calls arrive
// as they are and each GEMM reads bfloat16 in place (cpu/gemm_bf16.cpp: twice float32's
// multiply-adds per instruction, half its bytes, no conversion of x or W), rounding each result
// once; elsewhere they run on float32 copies (common/low_precision.h). float16 always does.
const uint16_t* bits(const Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}
uint16_t* bits_out(Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<at::BFloat16>());
}

// A (rows, cols) operand as the GEMMs read it: in place where it is a 2-D row-major (rows
// possibly padded apart: x[:, :k]) or column-major (a transposed view: w.t()) matrix, as torch's
// mm reads them; anything else is copied contiguous. Copying a transposed 4096 x 4096 weight
// took longer than the product it fed (linear at batch 256: 2.5x torch's time).
struct Operand {
  Tensor t;
  int64_t rs, cs;
};
Operand gemm_operand(const Tensor& t, int64_t rows, int64_t cols) {
  if (t.dim() == 2 && rows > 1 && cols > 1) {
    if (t.stride(1) == 1 && t.stride(0) >= cols) return {t, t.stride(0), 1};
    if (t.stride(0) == 1 && t.stride(1) >= rows) return {t, 1, t.stride(1)};
  }
  return {t.contiguous(), cols, 1};
}

Tensor linear_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  const auto s = check_linear<int64_t>(input, weight, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t rows = s.rows, in = s.in_features, o = s.out_features;
  const Operand x = gemm_operand(input, rows, in), w = gemm_operand(weight, o, in);
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  Tensor out = empty_of(s.output_sizes, input.options());
  if (rows == 0 || o == 0) return out;
  // y = x W^T: B = W^T, its element (k, j) at W's (j, k)
  if (input.scalar_type() == at::kBFloat16) {  // the bias added before rounding
    const Tensor b32 = has_bias ? b.to(at::kFloat) : Tensor();
    cpu::gemm_bf16(rows, o, in, bits(x.t), x.rs, x.cs, bits(w.t), w.cs, w.rs, bits_out(out), o,
                   1, has_bias ? b32.const_data_ptr<float>() : nullptr);
    return out;
  }
  dispatch_floating(input.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    T* y = out.mutable_data_ptr<T>();
    if (narrow<T>(in, o)) {
      const Tensor xc = x.t.contiguous(), wc = w.t.contiguous();
      const T* px = xc.const_data_ptr<T>();
      const T* pw = wc.const_data_ptr<T>();
      const T* pb = has_bias ? b.const_data_ptr<T>() : nullptr;
      at::parallel_for(0, rows, std::max<int64_t>(256, 65536 / std::max<int64_t>(1, in * o)),
                       [&](int64_t r0, int64_t r1) { narrow_forward(px, pw, pb, y, in, o, r0, r1); });
      return;
    }
    cpu::gemm_parallel<T>(rows, o, in, x.t.const_data_ptr<T>(), x.rs, x.cs,
                          w.t.const_data_ptr<T>(), w.cs, w.rs, y, o, 1, /*accumulate=*/false,
                          has_bias ? b.const_data_ptr<T>() : nullptr);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_backward_cpu(const Tensor& grad_output,
                                                       const Tensor& input, const Tensor& weight,
                                                       std::array<bool, 3> mask) {
  const auto s = check_linear_backward<int64_t>(grad_output, input, weight);
  const Tensor g = grad_output.contiguous();
  const int64_t rows = s.rows, in = s.in_features, o = s.out_features;
  const Operand x = gemm_operand(input, rows, in), w = gemm_operand(weight, o, in);
  Tensor grad_input, grad_weight, grad_bias;
  if (mask[0])
    grad_input = empty_with_layout<int64_t>(
        input.sizes(), linear_grad_input_layout<int64_t>(input, rows, in, mask[1]),
        input.options());
  if (mask[1])
    grad_weight = empty_with_layout<int64_t>(
        weight.sizes(), linear_grad_weight_layout<int64_t>(weight), input.options());
  if (mask[2]) grad_bias = empty_of(at::IntArrayRef{o}, input.options());
  // Row and column strides of a (m, n) gradient, contiguous or else column-major.
  auto strides = [](const Tensor& t, int64_t m, int64_t n) {
    return t.is_contiguous() ? std::pair<int64_t, int64_t>(n, 1)
                             : std::pair<int64_t, int64_t>(1, m);
  };
  if (input.scalar_type() == at::kBFloat16) {
    // (an empty sum, o == 0 or rows == 0, writes zeros)
    if (mask[0]) {  // dx = dy W
      const auto [rs, cs] = strides(grad_input, rows, in);
      cpu::gemm_bf16(rows, in, o, bits(g), o, 1, bits(w.t), w.rs, w.cs, bits_out(grad_input), rs,
                     cs);
    }
    if (mask[1]) {  // dW = dy^T x
      const auto [rs, cs] = strides(grad_weight, o, in);
      cpu::gemm_bf16(o, in, rows, bits(g), 1, o, bits(x.t), x.rs, x.cs, bits_out(grad_weight), rs,
                     cs);
    }
    if (mask[2]) {  // column sums in float32 (dy is rows x o: small beside the GEMMs)
      const Tensor g32 = g.to(at::kFloat);
      Tensor b32 = at::empty({o}, g32.options());
      const float* pg = g32.const_data_ptr<float>();
      float* pb = b32.mutable_data_ptr<float>();
      const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(1, rows));
      at::parallel_for(0, o, grain, [&](int64_t j0, int64_t j1) {
        column_sums(pg, rows, o, j0, j1, pb);
      });
      grad_bias.copy_(b32);
    }
    return {grad_input, grad_weight, grad_bias};
  }
  dispatch_floating(input.scalar_type(), "linear_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* pg = g.const_data_ptr<T>();
    if (narrow<T>(in, o) && rows > 0 && (mask[1] || mask[2]) &&
        (!mask[0] || grad_input.is_contiguous())) {
      // Partial sums per chunk of kNarrowChunk rows (fixed by the shapes), added in chunk order:
      // the result does not depend on the thread count.
      constexpr int64_t W = Lanes<T>::kW, per = (kNarrowOut + 1) * W;
      const int64_t chunks = (rows + kNarrowChunk - 1) / kNarrowChunk;
      std::vector<T> part(static_cast<size_t>(chunks * per), T(0));
      const Tensor xc = x.t.contiguous(), wc = w.t.contiguous();
      const T* px = xc.const_data_ptr<T>();
      const T* pw = wc.const_data_ptr<T>();
      T* pdx = mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr;
      at::parallel_for(0, chunks, std::max<int64_t>(1, 64 / std::max<int64_t>(1, in * o)),
                       [&](int64_t c0, int64_t c1) {
                         for (int64_t c = c0; c < c1; ++c)
                           narrow_backward(pg, px, pw, pdx, part.data() + c * per, in, o,
                                           c * kNarrowChunk,
                                           std::min(rows, (c + 1) * kNarrowChunk));
                       });
      for (int64_t c = 1; c < chunks; ++c)
        for (int64_t i = 0; i < per; ++i) part[i] += part[c * per + i];
      if (mask[1]) {
        const auto [rs, cs] = strides(grad_weight, o, in);
        T* pdw = grad_weight.mutable_data_ptr<T>();
        for (int64_t j = 0; j < o; ++j)
          for (int64_t i = 0; i < in; ++i) pdw[j * rs + i * cs] = part[j * W + i];
      }
      if (mask[2]) {
        T* pb = grad_bias.mutable_data_ptr<T>();
        for (int64_t j = 0; j < o; ++j) pb[j] = part[kNarrowOut * W + j];
      }
      return;
    }
    if (mask[0]) {  // dx[r, i] = sum_o dy[r, o] W[o, i]
      const auto [rs, cs] = strides(grad_input, rows, in);
      cpu::gemm_parallel<T>(rows, in, o, pg, o, 1, w.t.const_data_ptr<T>(), w.rs, w.cs,
                            grad_input.mutable_data_ptr<T>(), rs, cs, false);
    }
    if (mask[1]) {  // dW[o, i] = sum_r dy[r, o] x[r, i]
      const auto [rs, cs] = strides(grad_weight, o, in);
      cpu::gemm_parallel<T>(o, in, rows, pg, 1, o, x.t.const_data_ptr<T>(), x.rs, x.cs,
                            grad_weight.mutable_data_ptr<T>(), rs, cs, false);
    }
    if (mask[2]) {
      T* pb = grad_bias.mutable_data_ptr<T>();
      // Each column is summed by one task over all rows in order: thread-count independent.
      const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(1, rows));
      at::parallel_for(0, o, grain, [&](int64_t j0, int64_t j1) {
        column_sums(pg, rows, o, j0, j1, pb);
      });
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("linear", PE_KERNEL_NATIVE_BF16(linear_cpu, cpu::gemm_bf16_available));
  m.impl("linear_backward", PE_KERNEL_NATIVE_BF16(linear_backward_cpu, cpu::gemm_bf16_available));
}

}  // namespace pyengine
