// CPU kernels of cross_entropy and its backward pass (argument checks: common/checks.h, shared
// with the CUDA and Meta kernels). Reductions accumulate in double and are deterministic
// (cpu/reductions.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/isa.h"
#include "cpu/loops.h"
#include "cpu/reductions.h"
#include "cpu/vec_math.h"

namespace pyengine {
namespace {

using at::Tensor;
using cpu::deterministic_sum;
using cpu::Family;
using cpu::kSumChunk;
using cpu::scalar_like;
using cpu::weight_or_null;
using OptTensor = std::optional<Tensor>;

// ---- cross_entropy --------------------------------------------------------------------------
//
// Per row i of logits x (C classes) with target t_i:
//   logp = x[t] - m - log(sum_j exp(x_j - m)),  m = max_j x_j  (no overflow; NaN/inf propagate
//   as in torch: an inf logit makes the row NaN, a -inf target logit an infinite loss)
//   loss_i = -w[t_i] * logp, or 0 for t_i == ignore_index.
// 'mean' divides the sum by sum(w[t_i]) over rows not ignored (NaN when all are).

// Targets must be class indices or ignore_index. One sequential pass over N int64s: cheap next
// to the N * C exps, and the error is raised outside the parallel loops.
void check_targets(const int64_t* pt, int64_t n, int64_t classes, int64_t ignore_index,
                   const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = pt[i];
    if (c == ignore_index) continue;
    TORCH_CHECK_INDEX(c >= 0 && c < classes, "pyengine.", op, ": target ", c, " is out of bounds: "
                      "expected target values in [0, ", classes, ") or ignore_index=",
                      ignore_index, ", but got target[", i, "] = ", c);
  }
}

// ---- Row kernels, built for every level (cpu/isa.h) ----------------------------------------
//
// Per row: m = max_j x_j, then s = sum_j exp(x_j - m) with the shared exp (cpu/vec_math.h,
// branch-free so the loops vectorize), every term widened to double and summed in kLanes
// interleaved lanes: a fixed order of additions at every level, so the level changes the result
// only through FMA contraction inside exp. A row's last partial block is copied into a block
// padded with -inf (never the max; exp gives 0), so narrow rows (10 classes) run vectorized too:
// the copy costs a store-forwarding stall per row, less than C % L scalar exps.

// Terms per lane block: one 64-byte vector of T.
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

// The row's last classes % L values, padded to a whole block with -inf.
template <typename T>
PE_INLINE void padded_tail(const T* x, int64_t n, T* block) {
  for (int64_t l = 0; l < kLanes<T>; ++l)
    block[l] = l < n ? x[l] : -std::numeric_limits<T>::infinity();
}

// max_j x_j, NaN skipped (a NaN makes the row NaN through its exp anyway); -inf for no classes.
template <typename T>
PE_INLINE T row_max(const T* x, int64_t classes) {
  constexpr int64_t L = kLanes<T>;
  T acc[L], tail[L];
  for (int64_t l = 0; l < L; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + L <= classes; j += L)
    for (int64_t l = 0; l < L; ++l) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
  padded_tail(x + j, classes - j, tail);
  for (int64_t l = 0; l < L; ++l) acc[l] = tail[l] > acc[l] ? tail[l] : acc[l];
  T m = acc[0];
  for (int64_t l = 1; l < L; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// sum_j exp(x_j - m) in double; the terms are also written to out[j] when kStore.
template <typename T, bool kStore>
PE_INLINE double row_exp_sum(const T* x, T m, int64_t classes, T* out) {
  constexpr int64_t L = kLanes<T>;
  double acc[L] = {};
  int64_t j = 0;
  for (; j + L <= classes; j += L)
    for (int64_t l = 0; l < L; ++l) {
      const T e = fast_exp(x[j + l] - m);
      if (kStore) out[j + l] = e;
      acc[l] += static_cast<double>(e);
    }
  if (j < classes) {
    T tail[L], e[L];
    padded_tail(x + j, classes - j, tail);
    for (int64_t l = 0; l < L; ++l) {
      e[l] = fast_exp(tail[l] - m);
      acc[l] += static_cast<double>(e[l]);
    }
    if (kStore)
      for (int64_t l = 0; j + l < classes; ++l) out[j + l] = e[l];
  }
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// log softmax(x)[t] of one row, in double.
template <typename T>
PE_INLINE double log_prob_impl(const T* x, int64_t classes, int64_t t) {
  const T m = row_max(x, classes);
  const double s = row_exp_sum<T, false>(x, m, classes, nullptr);
  return static_cast<double>(x[t]) - static_cast<double>(m) - std::log(s);
}

// grad = a * (softmax(x) - onehot(t)) for one row: the softmax numerators are written into grad,
// then scaled in place while the row is in L1.
template <typename T>
PE_INLINE void softmax_grad_impl(const T* x, int64_t classes, int64_t t, double a, T* grad) {
  const double sum = row_exp_sum<T, true>(x, row_max(x, classes), classes, grad);
  const T scale = static_cast<T>(a / sum);
  for (int64_t j = 0; j < classes; ++j) grad[j] *= scale;
  grad[t] -= static_cast<T>(a);
}

#define PE_DEFINE_ROW_KERNELS(T)                                                             \
  PE_ISA_FUNCTION(Family::CrossEntropy, double, log_prob,                                   \
                  (const T* x, int64_t classes, int64_t t), (x, classes, t),                \
                  log_prob_impl<T>)                                                          \
  PE_ISA_FUNCTION(Family::CrossEntropy, void, softmax_grad,                                 \
                  (const T* x, int64_t classes, int64_t t, double a, T* grad),              \
                  (x, classes, t, a, grad), softmax_grad_impl<T>)
PE_DEFINE_ROW_KERNELS(float)
PE_DEFINE_ROW_KERNELS(double)
#undef PE_DEFINE_ROW_KERNELS

// Rows per partial sum and per parallel task: about kSumChunk / kElementwiseGrain logits.
int64_t rows_per(int64_t elements, int64_t classes) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, classes));
}

// Napkin math (forward; reference machine: csrc/cpu/README.md): reads the N x C logits once (a
// row stays in L1 between its max, exp-sum and gather passes) plus N targets; C exps and one log
// per row. For N = 4096, C = 1000 float32: 16 MB, ~0.5 ms from L3 at ~35 GB/s per core, and 4.1M
// exps at ~25 vector ops per 16 (~2 ops per cycle): ~0.9 ms on one core, so bound by the exps.
// Achieved figures: the benchmark suite (python -m benchmarks).
Tensor cross_entropy_cpu(const Tensor& input, const Tensor& target, const OptTensor& weight,
                         int64_t reduction, int64_t ignore_index) {
  const auto s = check_cross_entropy<int64_t>(input, target, weight, reduction);
  const int64_t n = s.batch, classes = s.classes;
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const int64_t* pt = t.const_data_ptr<int64_t>();
  check_targets(pt, n, classes, ignore_index, "cross_entropy");
  Tensor out;
  dispatch_floating(x.scalar_type(), "cross_entropy", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    // (loss_i, weight_i) of row i; weight_i is 0 for an ignored row.
    auto row = [&](int64_t i, double& weight_i) -> double {
      const int64_t c = pt[i];
      if (c == ignore_index) {
        weight_i = 0;
        return 0;
      }
      weight_i = pw ? static_cast<double>(pw[c]) : 1.0;
      return -weight_i * log_prob(px + i * classes, classes, c);
    };
    if (reduction == 0) {
      // (N) for batched input, 0-d for unbatched: input's leading dims.
      out = at::empty(s.batched ? at::IntArrayRef(x.sizes().data(), 1) : at::IntArrayRef{},
                      x.options());
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, rows_per(kElementwiseGrain, classes), [&](int64_t b, int64_t e) {
        double unused;
        for (int64_t i = b; i < e; ++i) po[i] = static_cast<scalar_t>(row(i, unused));
      });
      return;
    }
    const int64_t chunk = rows_per(kSumChunk, classes);
    const auto sums = deterministic_sum<2>(
        n, chunk, kElementwiseGrain / kSumChunk,
        [&](int64_t b, int64_t e, std::array<double, 2>& acc) {
          for (int64_t i = b; i < e; ++i) {
            double weight_i;
            acc[0] += row(i, weight_i);
            acc[1] += weight_i;
          }
        });
    out = scalar_like(reduction == 1 ? sums[0] / sums[1] : sums[0], x);
  });
  return out;
}

// Napkin math (backward): reads the logits, writes grad_input (8 B per float32 logit) plus N
// targets; C exps per row, written once into grad_input and rescaled in place while the row is in
// L1. Bound by the exps, like the forward: ~0.9 ms on one core for 4096 x 1000 float32.
Tensor cross_entropy_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                  const Tensor& target, const OptTensor& weight,
                                  int64_t reduction, int64_t ignore_index) {
  const auto s = check_cross_entropy_backward<int64_t>(grad_output, input, target, weight,
                                                       reduction);
  const int64_t n = s.batch, classes = s.classes;
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const Tensor go = grad_output.contiguous();
  const int64_t* pt = t.const_data_ptr<int64_t>();
  check_targets(pt, n, classes, ignore_index, "cross_entropy_backward");
  Tensor grad_input = at::empty(x.sizes(), x.options());
  dispatch_floating(x.scalar_type(), "cross_entropy_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pg = go.const_data_ptr<scalar_t>();
    scalar_t* pgi = grad_input.mutable_data_ptr<scalar_t>();
    // 'mean': the forward's denominator, sum(w[t_i]) over rows not ignored.
    double total = 1;
    if (reduction == 1) {
      total = deterministic_sum<1>(n, kSumChunk, kElementwiseGrain / kSumChunk,
                                   [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
                                     for (int64_t i = b; i < e; ++i) {
                                       const int64_t c = pt[i];
                                       if (c != ignore_index)
                                         acc[0] += pw ? static_cast<double>(pw[c]) : 1.0;
                                     }
                                   })[0];
    }
    at::parallel_for(0, n, rows_per(kElementwiseGrain, classes), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xr = px + i * classes;
        scalar_t* gr = pgi + i * classes;
        const int64_t c = pt[i];
        if (c == ignore_index) {
          std::fill(gr, gr + classes, scalar_t(0));
          continue;
        }
        // d loss / d x_j = a * (softmax_j - [j == c]), a = g_i * w[c] (/ total for 'mean').
        // g / total first, then * w, as torch: a zero weight over a zero total gives NaN there.
        double a = static_cast<double>(reduction == 0 ? pg[i] : pg[0]);
        if (reduction == 1) a /= total;
        if (pw) a *= static_cast<double>(pw[c]);
        softmax_grad(xr, classes, c, a, gr);
      }
    });
  });
  return grad_input;
}


}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("cross_entropy", cross_entropy_cpu);
  m.impl("cross_entropy_backward", cross_entropy_backward_cpu);
}

}  // namespace pyengine
