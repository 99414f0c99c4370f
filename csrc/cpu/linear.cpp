// CPU kernels of linear (y = x W^T + b) and linear_backward, on pyengine's GEMM (cpu/gemm.h).
//
// Shapes: x (rows, in) after flattening the leading dims, W (out, in), y (rows, out).
//   forward      y  = x W^T       gemm(rows, out, in):  x and W both run along `in`: dot kernel
//   grad_input   dx = dy W        gemm(rows, in, out):  outer-product kernel, dy packed
//   grad_weight  dW = dy^T x      gemm(out, in, rows):  outer-product kernel, both read in place
//   grad_bias    db = sum_r dy    column sums, rows in order
// The output is contiguous; dx and dW are contiguous or column-major, as torch's mm backward lays
// them out (common/layout.h): the GEMM writes either layout directly through C's strides.
//
// Napkin math, LeNet fc1 (400 -> 120) at batch 256, fp32: each GEMM is 2*256*400*120 = 24.6 MFLOP
// over 0.4 MB (x) + 0.19 MB (W) + 0.12 MB (y): ~35 FLOP/byte, compute-bound. At ~110 GFLOP/s per
// core (reference machine: csrc/cpu/README.md) the floor is ~0.11 ms per GEMM on 2 cores, ~0.34 ms
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

#include <cstring>
#include <utility>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
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

Tensor linear_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  const auto s = check_linear<int64_t>(input, weight, bias);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  Tensor out = empty_of(s.output_sizes, x.options());
  const int64_t rows = s.rows, in = s.in_features, o = s.out_features;
  if (rows == 0 || o == 0) return out;
  dispatch_floating(x.scalar_type(), "linear", [&](auto tag) {
    using T = decltype(tag);
    T* y = out.mutable_data_ptr<T>();
    if (has_bias) {
      const T* pb = b.const_data_ptr<T>();
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / o), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) std::memcpy(y + r * o, pb, sizeof(T) * o);
      });
    }
    cpu::gemm_parallel<T>(rows, o, in, x.const_data_ptr<T>(), in, 1, w.const_data_ptr<T>(), 1, in,
                          y, o, 1, /*accumulate=*/has_bias);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_backward_cpu(const Tensor& grad_output,
                                                       const Tensor& input, const Tensor& weight,
                                                       std::array<bool, 3> mask) {
  const auto s = check_linear_backward<int64_t>(grad_output, input, weight);
  const Tensor g = grad_output.contiguous();
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  const int64_t rows = s.rows, in = s.in_features, o = s.out_features;
  Tensor grad_input, grad_weight, grad_bias;
  if (mask[0])
    grad_input = empty_with_layout<int64_t>(
        input.sizes(), linear_grad_input_layout<int64_t>(input, rows, in, mask[1]), x.options());
  if (mask[1])
    grad_weight = empty_with_layout<int64_t>(
        weight.sizes(), linear_grad_weight_layout<int64_t>(weight), x.options());
  if (mask[2]) grad_bias = empty_of(at::IntArrayRef{o}, x.options());
  // Row and column strides of a (m, n) gradient, contiguous or else column-major.
  auto strides = [](const Tensor& t, int64_t m, int64_t n) {
    return t.is_contiguous() ? std::pair<int64_t, int64_t>(n, 1)
                             : std::pair<int64_t, int64_t>(1, m);
  };
  dispatch_floating(x.scalar_type(), "linear_backward", [&](auto tag) {
    using T = decltype(tag);
    const T* pg = g.const_data_ptr<T>();
    if (mask[0]) {  // dx[r, i] = sum_o dy[r, o] W[o, i]
      const auto [rs, cs] = strides(grad_input, rows, in);
      cpu::gemm_parallel<T>(rows, in, o, pg, o, 1, w.const_data_ptr<T>(), in, 1,
                            grad_input.mutable_data_ptr<T>(), rs, cs, false);
    }
    if (mask[1]) {  // dW[o, i] = sum_r dy[r, o] x[r, i]
      const auto [rs, cs] = strides(grad_weight, o, in);
      cpu::gemm_parallel<T>(o, in, rows, pg, 1, o, x.const_data_ptr<T>(), in, 1,
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
  m.impl("linear", linear_cpu);
  m.impl("linear_backward", linear_backward_cpu);
}

}  // namespace pyengine
