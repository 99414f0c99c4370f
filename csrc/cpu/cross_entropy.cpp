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
#include "common/layout.h"
#include "common/low_precision.h"
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
// Per row i of logits x (C classes):
//   logp_j = x_j - m - log(sum_k exp(x_k - m)),  m = max_k x_k  (no overflow; NaN/inf propagate
//   as in torch: an inf logit makes the row NaN, a -inf target logit an infinite loss).
// Class-index targets t_i, label smoothing eps:
//   loss_i = -w[t_i] * logp_{t_i}                                  (eps = 0)
//   loss_i = (1 - eps) * (-w[t_i] * logp_{t_i}) + eps / C * (-sum_j w_j logp_j)   (eps > 0),
//   0 for t_i == ignore_index. 'mean' divides the sum by sum(w[t_i]) over rows not ignored, for
//   both terms (NaN when all rows are ignored), as torch.
// Class-probability targets p_ij (input's shape):
//   loss_i = -sum_j w_j q_ij logp_j,  q_ij = p_ij (1 - eps) + eps / C  (torch's smoothed target);
//   'mean' divides the sum by the number of rows, whatever the weights (as torch).
// (w_j = 1 without weight.) The smoothed forms are -sum_j u_j logp_j for per-row coefficients
// u_j (w_j, or w_j q_ij), computed as -(D - U log s) with D = sum_j u_j (x_j - m) and
// U = sum_j u_j, in double; their gradient is a * (softmax_j * U - u_j).

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

// The lanes' sum, by a fixed tree.
template <int64_t L>
PE_INLINE double lane_total(double* acc) {
  for (int64_t w = L / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// sum_j exp(x_j - m) in double; the terms are also written to out[j] when kStore.
template <typename T, bool kStore>
PE_INLINE double row_exp_sum(const T* x, T m, int64_t classes, T* out) {
  constexpr int64_t L = kLanes<T>;
  double acc[L] = {};
  int64_t j = 0;
  for (; j + L <= classes; j += L)
    for (int64_t l = 0; l < L; ++l) {
      const T e = fast_exp_nonpositive(x[j + l] - m);
      if (kStore) out[j + l] = e;
      acc[l] += static_cast<double>(e);
    }
  if (j < classes) {
    T tail[L], e[L];
    padded_tail(x + j, classes - j, tail);
    for (int64_t l = 0; l < L; ++l) {
      e[l] = fast_exp_nonpositive(tail[l] - m);
      acc[l] += static_cast<double>(e[l]);
    }
    if (kStore)
      for (int64_t l = 0; j + l < classes; ++l) out[j + l] = e[l];
  }
  return lane_total<L>(acc);
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

// ---- The smoothed forms: label smoothing, probability targets --------------------------------

// What defines a row's coefficients u_j: the class weights w (null: all 1) times, for probability
// targets, the row's smoothed target q_j = p_j * keep + add (p null: class-index targets). keep
// and add are in the input's precision, as torch's target * (1 - eps) + eps / C.
template <typename T>
struct RowCoefficients {
  const T* w;
  const T* p;
  T keep, add;
};

// u_j for one combination of weight and target kind, branch-free in the loops below.
template <typename T, bool kWeighted, bool kProbabilities>
struct Coefficient {
  RowCoefficients<T> c;
  PE_INLINE T operator()(int64_t j) const {
    if (kProbabilities) {
      const T q = c.p[j] * c.keep + c.add;
      return kWeighted ? q * c.w[j] : q;
    }
    return kWeighted ? c.w[j] : T(1);
  }
};

// f(Coefficient<...>{c}) for the combination c holds: one loop build per combination.
template <typename T, class F>
PE_INLINE auto with_coefficients(const RowCoefficients<T>& c, const F& f) {
  if (c.p != nullptr)
    return c.w != nullptr ? f(Coefficient<T, true, true>{c}) : f(Coefficient<T, false, true>{c});
  return c.w != nullptr ? f(Coefficient<T, true, false>{c}) : f(Coefficient<T, false, false>{c});
}

// U = sum_j u_j and, when kDot, D = sum_j u_j (x_j - m), in double lanes (fixed order).
template <typename T, bool kDot, class U>
PE_INLINE void coefficient_sums(const T* x, T m, int64_t classes, const U& u, double* dot,
                                double* total) {
  constexpr int64_t L = kLanes<T>;
  double d[L] = {}, t[L] = {};
  int64_t j = 0;
  for (; j + L <= classes; j += L)
    for (int64_t l = 0; l < L; ++l) {
      const T c = u(j + l);
      if (kDot) d[l] += static_cast<double>(c) * static_cast<double>(x[j + l] - m);
      t[l] += static_cast<double>(c);
    }
  for (int64_t l = 0; j + l < classes; ++l) {
    const T c = u(j + l);
    if (kDot) d[l] += static_cast<double>(c) * static_cast<double>(x[j + l] - m);
    t[l] += static_cast<double>(c);
  }
  if (kDot) *dot = lane_total<L>(d);
  *total = lane_total<L>(t);
}

struct SmoothedSums {
  double shift;    // m, the row's max
  double log_sum;  // log(sum_j exp(x_j - m))
  double dot;      // D = sum_j u_j (x_j - m)
  double total;    // U = sum_j u_j
};

template <typename T>
struct SmoothedSumsOf {
  const T* x;
  int64_t classes;
  template <class U>
  PE_INLINE SmoothedSums operator()(const U& u) const {
    const T m = row_max(x, classes);
    SmoothedSums r;
    r.shift = static_cast<double>(m);
    r.log_sum = std::log(row_exp_sum<T, false>(x, m, classes, nullptr));
    coefficient_sums<T, true>(x, m, classes, u, &r.dot, &r.total);
    return r;
  }
};

template <typename T>
PE_INLINE SmoothedSums smoothed_sums_impl(const T* x, int64_t classes, RowCoefficients<T> c) {
  return with_coefficients(c, SmoothedSumsOf<T>{x, classes});
}

// grad_j = e_j * (alpha + beta * U) / s - beta * u_j, e_j = exp(x_j - m), s = sum_j e_j; then
// grad[target] -= gamma when target >= 0. The exps are written into grad first, then rescaled
// in place while the row is in L1.
template <typename T>
struct SmoothedGradOf {
  const T* x;
  int64_t classes;
  double alpha, beta, gamma;
  int64_t target;
  T* grad;
  template <class U>
  PE_INLINE void operator()(const U& u) const {
    const double sum = row_exp_sum<T, true>(x, row_max(x, classes), classes, grad);
    double total;
    coefficient_sums<T, false>(x, T(0), classes, u, nullptr, &total);
    const T scale = static_cast<T>((alpha + beta * total) / sum);
    const T b = static_cast<T>(beta);
    for (int64_t j = 0; j < classes; ++j) grad[j] = grad[j] * scale - b * u(j);
    if (target >= 0) grad[target] -= static_cast<T>(gamma);
  }
};

template <typename T>
PE_INLINE void smoothed_grad_impl(const T* x, int64_t classes, RowCoefficients<T> c,
                                  double alpha, double beta, int64_t target, double gamma,
                                  T* grad) {
  with_coefficients(c, SmoothedGradOf<T>{x, classes, alpha, beta, gamma, target, grad});
}

#define PE_DEFINE_ROW_KERNELS(T)                                                             \
  PE_ISA_FUNCTION(Family::CrossEntropy, double, log_prob,                                   \
                  (const T* x, int64_t classes, int64_t t), (x, classes, t),                \
                  log_prob_impl<T>)                                                          \
  PE_ISA_FUNCTION(Family::CrossEntropy, void, softmax_grad,                                 \
                  (const T* x, int64_t classes, int64_t t, double a, T* grad),              \
                  (x, classes, t, a, grad), softmax_grad_impl<T>)                           \
  PE_ISA_FUNCTION(Family::CrossEntropy, SmoothedSums, smoothed_sums,                        \
                  (const T* x, int64_t classes, RowCoefficients<T> c), (x, classes, c),     \
                  smoothed_sums_impl<T>)                                                     \
  PE_ISA_FUNCTION(Family::CrossEntropy, void, smoothed_grad,                                \
                  (const T* x, int64_t classes, RowCoefficients<T> c, double alpha,         \
                   double beta, int64_t target, double gamma, T* grad),                     \
                  (x, classes, c, alpha, beta, target, gamma, grad), smoothed_grad_impl<T>)
PE_DEFINE_ROW_KERNELS(float)
PE_DEFINE_ROW_KERNELS(double)
#undef PE_DEFINE_ROW_KERNELS

// Rows per partial sum and per parallel task: about kSumChunk / kElementwiseGrain logits.
int64_t rows_per(int64_t elements, int64_t classes) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, classes));
}

// The smoothed target's q = p * keep + add (probability targets) in the input's precision, as
// torch computes it: keep = 1 - eps, add = eps / C.
template <typename T>
RowCoefficients<T> coefficients(const T* w, const T* p, double label_smoothing, int64_t classes) {
  return {w, p, static_cast<T>(1.0 - label_smoothing),
          static_cast<T>(classes > 0 ? label_smoothing / static_cast<double>(classes) : 0.0)};
}

// Napkin math (forward; reference machine: csrc/cpu/README.md): reads the N x C logits once (a
// row stays in L1 between its max, exp-sum and gather passes) plus N targets; C exps and one log
// per row. For N = 4096, C = 1000 float32: 16 MB, ~0.5 ms from L3 at ~35 GB/s per core, and 4.1M
// exps at ~25 vector ops per 16 (~2 ops per cycle): ~0.9 ms on one core, so bound by the exps.
// The smoothed forms add a pass of ~3 flops per logit over the row in L1 (and read the N x C
// probabilities, for probability targets): still bound by the exps.
// Achieved figures: the benchmark suite (python -m benchmarks).
Tensor cross_entropy_cpu(const Tensor& input, const Tensor& target, const OptTensor& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing) {
  const auto s = check_cross_entropy<int64_t>(input, target, weight, reduction, ignore_index,
                                              label_smoothing);
  const int64_t n = s.batch, classes = s.classes;
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const int64_t* pt = s.probabilities ? nullptr : t.const_data_ptr<int64_t>();
  if (!s.probabilities) check_targets(pt, n, classes, ignore_index, "cross_entropy");
  const double eps = label_smoothing;
  Tensor out;
  dispatch_floating(x.scalar_type(), "cross_entropy", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = s.probabilities ? t.const_data_ptr<scalar_t>() : nullptr;
    // (loss_i, denominator share_i) of row i: w[t_i], 0 for an ignored row; 1 per row of
    // probabilities (0 without classes: torch's 'mean' over no element is NaN).
    auto row = [&](int64_t i, double& share_i) -> double {
      if (s.probabilities) {
        share_i = classes > 0 ? 1.0 : 0.0;
        if (classes == 0) return 0;  // an empty sum (D - U log s would be 0 * -inf)
        const SmoothedSums r = smoothed_sums(px + i * classes, classes,
                                             coefficients(pw, pp + i * classes, eps, classes));
        return -(r.dot - r.total * r.log_sum);
      }
      const int64_t c = pt[i];
      if (c == ignore_index) {
        share_i = 0;
        return 0;
      }
      share_i = pw ? static_cast<double>(pw[c]) : 1.0;
      const scalar_t* xr = px + i * classes;
      if (eps == 0) return -share_i * log_prob(xr, classes, c);
      const SmoothedSums r =
          smoothed_sums(xr, classes, coefficients<scalar_t>(pw, nullptr, eps, classes));
      const double nll = -share_i * (static_cast<double>(xr[c]) - r.shift - r.log_sum);
      return (1 - eps) * nll + eps / static_cast<double>(classes) * -(r.dot - r.total * r.log_sum);
    };
    if (reduction == 0) {
      // (N) for batched input, 0-d for unbatched: input's leading dims.
      out = empty_of(s.batched ? at::IntArrayRef(x.sizes().data(), 1) : at::IntArrayRef{},
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
            double share_i;
            acc[0] += row(i, share_i);
            acc[1] += share_i;
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
                                  int64_t reduction, int64_t ignore_index,
                                  double label_smoothing) {
  const auto s = check_cross_entropy_backward<int64_t>(grad_output, input, target, weight,
                                                       reduction, ignore_index, label_smoothing);
  const int64_t n = s.batch, classes = s.classes;
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const Tensor go = grad_output.contiguous();
  const int64_t* pt = s.probabilities ? nullptr : t.const_data_ptr<int64_t>();
  if (!s.probabilities) check_targets(pt, n, classes, ignore_index, "cross_entropy_backward");
  const double eps = label_smoothing;
  Tensor grad_input = empty_of(x.sizes(), x.options());
  dispatch_floating(x.scalar_type(), "cross_entropy_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = s.probabilities ? t.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pg = go.const_data_ptr<scalar_t>();
    scalar_t* pgi = grad_input.mutable_data_ptr<scalar_t>();
    // 'mean': the forward's denominator, the number of rows (probabilities) or sum(w[t_i]) over
    // rows not ignored.
    double total = 1;
    if (reduction == 1 && s.probabilities) total = static_cast<double>(n);
    if (reduction == 1 && !s.probabilities) {
      total = deterministic_sum<1>(n, kSumChunk, kElementwiseGrain / kSumChunk,
                                   [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
                                     for (int64_t i = b; i < e; ++i) {
                                       const int64_t c = pt[i];
                                       if (c != ignore_index)
                                         acc[0] += pw ? static_cast<double>(pw[c]) : 1.0;
                                     }
                                   })[0];
    }
    const double smooth_share = classes > 0 ? eps / static_cast<double>(classes) : 0.0;
    at::parallel_for(0, n, rows_per(kElementwiseGrain, classes), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xr = px + i * classes;
        scalar_t* gr = pgi + i * classes;
        // a = g_i (/ total for 'mean'): g / total first, then * w, as torch: a zero weight over
        // a zero total gives NaN there.
        double a = static_cast<double>(reduction == 0 ? pg[i] : pg[0]);
        if (reduction == 1) a /= total;
        if (s.probabilities) {  // d/dx_j = a * (softmax_j * U - u_j)
          smoothed_grad(xr, classes, coefficients(pw, pp + i * classes, eps, classes), 0.0, a,
                        -1, 0.0, gr);
          continue;
        }
        const int64_t c = pt[i];
        if (c == ignore_index) {
          std::fill(gr, gr + classes, scalar_t(0));
          continue;
        }
        const double wc = pw ? static_cast<double>(pw[c]) : 1.0;
        if (eps == 0) {  // d/dx_j = a * w[c] * (softmax_j - [j == c])
          softmax_grad(xr, classes, c, a * wc, gr);
          continue;
        }
        // (1 - eps) times the above, plus eps / C * a * (softmax_j * U - w_j)
        const double nll = a * (1 - eps) * wc;
        smoothed_grad(xr, classes, coefficients<scalar_t>(pw, nullptr, eps, classes), nll,
                      a * smooth_share, c, nll, gr);
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("cross_entropy", PE_KERNEL(cross_entropy_cpu));
  m.impl("cross_entropy_backward", PE_KERNEL(cross_entropy_backward_cpu));
}

}  // namespace pyengine
