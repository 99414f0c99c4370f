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
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

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

// Targets must be class indices or ignore_index. One pass over N int64s, branch-free so that it
// vectorizes (built per level below; cheap next to the N * C exps), and the error is raised
// outside the parallel loops, naming the first bad target.
PE_INLINE bool targets_in_range_impl(const int64_t* pt, int64_t n, int64_t classes,
                                     int64_t ignore_index) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i)
    bad |= pt[i] != ignore_index && static_cast<uint64_t>(pt[i]) >= static_cast<uint64_t>(classes);
  return !bad;
}
PE_ISA_FUNCTION(Family::CrossEntropy, bool, targets_in_range,
                (const int64_t* pt, int64_t n, int64_t classes, int64_t ignore_index),
                (pt, n, classes, ignore_index), targets_in_range_impl)

// The targets that are not ignore_index: 'mean''s denominator without class weights (the sum of
// their weights 1.0, exact as an integer count). Branch-free so that it vectorizes: summed in
// double, one target after another, it was a chain of dependent adds on one thread while the
// other waited (~8% of an 8 x 21 x 64 x 64 backward's samples with the check above, perf).
PE_INLINE int64_t kept_targets_impl(const int64_t* pt, int64_t n, int64_t ignore_index) {
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) kept += pt[i] != ignore_index;
  return kept;
}
PE_ISA_FUNCTION(Family::CrossEntropy, int64_t, kept_targets,
                (const int64_t* pt, int64_t n, int64_t ignore_index), (pt, n, ignore_index),
                kept_targets_impl)

// Long target lists are checked and counted in parallel chunks: one thread's pass over 8 x 64 x
// 64 targets left the other waiting, ~7% of that cross_entropy backward's samples once its kernel
// read the forward's log-sum-exps (perf). Integer results: the same for any split.
constexpr int64_t kTargetGrain = 16384;

bool all_targets_in_range(const int64_t* pt, int64_t n, int64_t classes, int64_t ignore_index) {
  return at::parallel_reduce(
      0, n, kTargetGrain, true,
      [&](int64_t b, int64_t e, bool ok) {
        return ok && targets_in_range(pt + b, e - b, classes, ignore_index);
      },
      [](bool a, bool b) { return a && b; });
}

int64_t count_kept_targets(const int64_t* pt, int64_t n, int64_t ignore_index) {
  return at::parallel_reduce(
      0, n, kTargetGrain, int64_t(0),
      [&](int64_t b, int64_t e, int64_t kept) {
        return kept + kept_targets(pt + b, e - b, ignore_index);
      },
      [](int64_t a, int64_t b) { return a + b; });
}

void check_targets(const int64_t* pt, int64_t n, int64_t classes, int64_t ignore_index,
                   const char* op) {
  if (all_targets_in_range(pt, n, classes, ignore_index)) return;
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
// the copy costs a store-forwarding stall per row, less than C % L scalar exps. (The forward runs
// rows of up to kNarrowClasses on the column kernels instead: uses_narrow_rows.)

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
    PE_LANES for (int64_t l = 0; l < L; ++l) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
  padded_tail(x + j, classes - j, tail);
  PE_LANES for (int64_t l = 0; l < L; ++l) acc[l] = tail[l] > acc[l] ? tail[l] : acc[l];
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
  if (kStore) {
    // Stored first, then summed from L1: summed as they were stored, GCC kept the double
    // partial sums in memory (a store-forwarding chain per vector; perf, 4096 x 1000 backward).
    for (int64_t k = 0; k + L <= classes; k += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) out[k + l] = fast_exp_nonpositive(x[k + l] - m);
    for (; j + L <= classes; j += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) acc[l] += static_cast<double>(out[j + l]);
  } else {
    for (; j + L <= classes; j += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) {
        acc[l] += static_cast<double>(fast_exp_nonpositive(x[j + l] - m));
      }
  }
  if (j < classes) {
    T tail[L], e[L];
    padded_tail(x + j, classes - j, tail);
    PE_LANES for (int64_t l = 0; l < L; ++l) {
      e[l] = fast_exp_nonpositive(tail[l] - m);
      acc[l] += static_cast<double>(e[l]);
    }
    if (kStore)
      for (int64_t l = 0; j + l < classes; ++l) out[j + l] = e[l];
  }
  return lane_total<L>(acc);
}

// log(sum_j exp(x_j)) of one row as its two terms m + log(sum_j exp(x_j - m)), in double: the
// loss is x[t] - m - log s, and the backward's one-pass form reads their sum
// (log_sum_exp_pair). m = -inf for no classes (an empty sum), as torch.logsumexp.
struct RowLogSumExp {
  double shift;    // m, the row's max
  double log_sum;  // log(sum_j exp(x_j - m))
};
template <typename T>
PE_INLINE RowLogSumExp log_sum_exp_impl(const T* x, int64_t classes) {
  if (classes == 0) return {-std::numeric_limits<double>::infinity(), 0.0};
  const T m = row_max(x, classes);
  return {static_cast<double>(m), std::log(row_exp_sum<T, false>(x, m, classes, nullptr))};
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

// The log-sum-exp m + log_sum as cross_entropy_with_log_sum_exp's pair (csrc/ops.cpp): hi = lse
// rounded to T, lo = the remainder rounded to T, 0 where hi is not finite (an empty row's -inf, a
// NaN row). The sum is taken exactly, as sum + err (TwoSum): rounded to double, m + log_sum at
// logits of 1e4 loses 2^-39, which float64's pair would have carried into the gradient (1e-12
// relative against torch's 1e-16). Branch-free, for the kernels' lane loops.
template <typename T>
PE_INLINE void log_sum_exp_pair(double m, double log_sum, T& hi, T& lo) {
  const double sum = m + log_sum;
  const double log_part = sum - m;
  const double err = (m - (sum - log_part)) + (log_sum - log_part);
  hi = static_cast<T>(sum);
  const double rest = (sum - static_cast<double>(hi)) + err;
  lo = static_cast<T>(rest == rest && hi - hi == T(0) ? rest : 0.0);
}

// The same from the row's log-sum-exp (the forward's pair hi + lo, csrc/ops.cpp): softmax_j =
// exp((x_j - hi) - lo), one pass over the row; x_j - hi is exact near the row's max (hi lies
// within a rounding of it: Sterbenz), so the result keeps T's precision there whatever the
// logits' magnitude. x_j - lse <= 0; a NaN or +inf logit made lse NaN, and so the whole row, as
// above.
template <typename T>
PE_INLINE void softmax_grad_from_lse_impl(const T* x, int64_t classes, int64_t t, double a, T hi,
                                          T lo, T* grad) {
  const T scale = static_cast<T>(a);
  PE_LANES for (int64_t j = 0; j < classes; ++j) {
    grad[j] = fast_exp_nonpositive((x[j] - hi) - lo) * scale;
  }
  grad[t] -= scale;
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
    PE_LANES for (int64_t l = 0; l < L; ++l) {
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
  PE_ISA_FUNCTION(Family::CrossEntropy, RowLogSumExp, log_sum_exp,                          \
                  (const T* x, int64_t classes), (x, classes), log_sum_exp_impl<T>)         \
  PE_ISA_FUNCTION(Family::CrossEntropy, void, softmax_grad,                                 \
                  (const T* x, int64_t classes, int64_t t, double a, T* grad),              \
                  (x, classes, t, a, grad), softmax_grad_impl<T>)                           \
  PE_ISA_FUNCTION(Family::CrossEntropy, void, softmax_grad_from_lse,                        \
                  (const T* x, int64_t classes, int64_t t, double a, T hi, T lo, T* grad),  \
                  (x, classes, t, a, hi, lo, grad), softmax_grad_from_lse_impl<T>)          \
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

// ---- Column kernels: (N, C, d1, ...) input ------------------------------------------------
//
// With d1 * ... = inner > 1 a pixel's C logits lie `inner` apart and neighbouring pixels' logits
// of one class are contiguous, so a block of up to L = kColumnLanes<T> pixels runs as L lanes, the
// class loop outermost: each pixel's max, exp-sum and smoothed sums run down its own lane, with no
// horizontal reduction, no padding of narrow rows and one vectorized log per lane
// (log_at_least_one), where moving the classes last would cost a copy of the logits (torch's
// permute took 0.39 ms at 8 x 21 x 64 x 64 float32, more than its whole loss). Same formulas and
// precision as the rows: the max, then exp terms summed in double, the smoothed forms' D and U in
// double. A block narrower than L (the end of a pixel row) runs the same code with the width known
// only at run time (scalar code: tasks and partial sums start at whole blocks, so only a sample's
// last pixels take it, when d1 * ... is not a multiple of L).
//
// Napkin math (forward, 8 x 21 x 64 x 64 float32, one core): 2.75 MB of logits read twice (max,
// then exp) and 688K exps at ~1.5 vector instructions per logit; the log, the pick of the target
// and the lanes' sums are per pixel. Backward adds a write of the gradient and a rescaling pass.
// The block's 21 x 128 bytes would stay in L1 between the passes but for rows 16 KB apart (64 x
// 64 planes), which share L1's sets: the backward copies its block (copy_block). From the
// forward's log-sum-exps (column_grads_from_lse) it makes one pass, which needs no copy.

// Pixels per block: two 64-byte vectors of T. One vector's worth left the fixed costs of a block
// (the call, the log of each lane, the lanes' sums) at half of a 2-class forward's time.
template <typename T>
constexpr int64_t kColumnLanes = 2 * kLanes<T>;

// One block's operands: pixel l's logit of class j at x[j * stride + l], its probability (when
// p is not null) at p[j * stride + l], its class index (when t is not null) at t[l].
template <typename T>
struct ColumnBlock {
  const T* x;
  const T* p;
  const int64_t* t;
  int64_t classes, stride, width;
};

// The coefficient u_j of lane l (see RowCoefficients): w_j (1 without weight), times the smoothed
// target p_jl * keep + add for probabilities.
template <typename T, bool kWeighted, bool kProbabilities>
struct ColumnCoefficient {
  const T* w;
  const T* p;
  int64_t stride;
  T keep, add;
  PE_INLINE T operator()(int64_t j, int64_t l) const {
    const T q = kProbabilities ? p[j * stride + l] * keep + add : T(1);
    return kWeighted ? q * w[j] : q;
  }
};

template <typename T, class F>
PE_INLINE auto with_column_coefficients(const ColumnBlock<T>& b, const T* w, T keep, T add,
                                        const F& f) {
  if (b.p != nullptr) {
    return w != nullptr ? f(ColumnCoefficient<T, true, true>{w, b.p, b.stride, keep, add})
                        : f(ColumnCoefficient<T, false, true>{w, b.p, b.stride, keep, add});
  }
  return w != nullptr ? f(ColumnCoefficient<T, true, false>{w, b.p, b.stride, keep, add})
                      : f(ColumnCoefficient<T, false, false>{w, b.p, b.stride, keep, add});
}

// Per lane, given m: s = sum_j exp(x_j - m) in double, the terms also written to
// out[j * stride + l] when kStore. W: the block's width (L when kFull). The loops run on local
// arrays, copied out at the end: through the pointers the compiler would have to assume that the
// stores may change x, and keep nothing in registers.
template <typename T, bool kFull, bool kStore>
PE_INLINE void column_exp_sum(const ColumnBlock<T>& b, const T* m_in, double* s_out, T* out) {
  constexpr int64_t L = kColumnLanes<T>;
  const int64_t W = kFull ? L : b.width;
  T m[L];
  double s[L];
  PE_LANES for (int64_t l = 0; l < L; ++l) m[l] = m_in[l];
  PE_LANES for (int64_t l = 0; l < L; ++l) s[l] = 0;
  if (kStore) {
    // The terms are stored first, then summed from L1 in a second pass: summed as they are
    // stored, GCC kept the double lanes in memory (a store-forwarding chain per class; perf).
    for (int64_t j = 0; j < b.classes; ++j) {
      const T* xj = b.x + j * b.stride;
      T* oj = out + j * b.stride;
      PE_LANES for (int64_t l = 0; l < W; ++l) oj[l] = fast_exp_nonpositive(xj[l] - m[l]);
    }
    for (int64_t j = 0; j < b.classes; ++j) {
      const T* oj = out + j * b.stride;
      PE_LANES for (int64_t l = 0; l < W; ++l) s[l] += static_cast<double>(oj[l]);
    }
  } else {
    for (int64_t j = 0; j < b.classes; ++j) {
      const T* xj = b.x + j * b.stride;
      PE_LANES for (int64_t l = 0; l < W; ++l) {
        s[l] += static_cast<double>(fast_exp_nonpositive(xj[l] - m[l]));
      }
    }
  }
  PE_LANES for (int64_t l = 0; l < L; ++l) s_out[l] = s[l];
}

// A lane's running max over the classes, NaN skipped (as row_max): from -inf, then
// max_step(m, x_j) per class.
template <typename T>
PE_INLINE T max_step(T m, T x) {
  return x > m ? x : m;
}

// Per lane: m = max_j x_j, then column_exp_sum.
template <typename T, bool kFull, bool kStore>
PE_INLINE void column_max_sum(const ColumnBlock<T>& b, T* m_out, double* s_out, T* out) {
  constexpr int64_t L = kColumnLanes<T>;
  const int64_t W = kFull ? L : b.width;
  T m[L];
  PE_LANES for (int64_t l = 0; l < L; ++l) m[l] = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < b.classes; ++j)
    PE_LANES for (int64_t l = 0; l < W; ++l) m[l] = max_step(m[l], b.x[j * b.stride + l]);
  PE_LANES for (int64_t l = 0; l < L; ++l) m_out[l] = m[l];
  column_exp_sum<T, kFull, kStore>(b, m, s_out, out);
}

// Classes up to which the backward's block runs on a contiguous copy (copy_block; 8 KB of L1
// at most).
constexpr int64_t kLocalClasses = 64;

// The block's logits into e (classes x L, contiguous), the rows two blocks on prefetched into
// L2. A class's row of the block lies `inner` elements from the next, so for inner a multiple
// of 1024 floats (a 64 x 64 image) every row falls in the same L1 sets: 21 classes' rows did not
// stay in L1 between column_max_sum's passes, and 8 x 21 x 64 x 64's backward took 0.65 ns a
// logit on one thread where 8 x 21 x 64 x 65's took 0.37. The copy, with the prefetches (the many
// rows at one stride are more streams than the hardware prefetchers follow), took that backward
// from 0.246-0.250 to 0.203-0.209 ms on two threads, 0.44 to 0.32-0.36 on one (torch 0.20-0.25
// and 0.38-0.45 in the same processes). Each lane's max (column_max_sum's) is taken as it
// copies, a pass over the block fewer.
template <typename T, bool kFull>
PE_INLINE void copy_block(const ColumnBlock<T>& b, T* e, T* m_out) {
  constexpr int64_t L = kColumnLanes<T>;
  const int64_t W = kFull ? L : b.width;
  T m[L];
  PE_LANES for (int64_t l = 0; l < L; ++l) m[l] = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < b.classes; ++j) {
    const T* xj = b.x + j * b.stride;
    T* ej = e + j * L;
    if (kFull)  // (past the tensor's end: a prefetch does not fault)
      for (int64_t c = 0; c < L * int64_t(sizeof(T)); c += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(xj) +
                                                         uintptr_t(2 * L * sizeof(T) + c)),
                           0, 2);
    PE_LANES for (int64_t l = 0; l < W; ++l) {
      ej[l] = xj[l];
      m[l] = max_step(m[l], xj[l]);
    }
  }
  PE_LANES for (int64_t l = 0; l < L; ++l) m_out[l] = m[l];
}

// Per lane: D = sum_j u_j (x_j - m) (when kDot) and U = sum_j u_j, in double.
template <typename T, bool kFull, bool kDot, class U>
PE_INLINE void column_coefficient_sums(const ColumnBlock<T>& b, const T* m_in, const U& u,
                                       double* dot_out, double* total_out) {
  constexpr int64_t L = kColumnLanes<T>;
  const int64_t W = kFull ? L : b.width;
  T m[L];
  double dot[L] = {}, total[L] = {};
  PE_LANES for (int64_t l = 0; l < L; ++l) m[l] = m_in[l];
  for (int64_t j = 0; j < b.classes; ++j) {
    const T* xj = b.x + j * b.stride;
    PE_LANES for (int64_t l = 0; l < W; ++l) {
      const T c = u(j, l);
      if (kDot) dot[l] += static_cast<double>(c) * static_cast<double>(xj[l] - m[l]);
      total[l] += static_cast<double>(c);
    }
  }
  PE_LANES for (int64_t l = 0; l < L; ++l) {
    if (kDot) dot_out[l] = dot[l];
    total_out[l] = total[l];
  }
}

// Lane l's target class (-1 when ignored or past the width) as an integer of T's width, so that
// comparing it with a class index is one vector compare whose mask selects T lanes: int32 for
// float (uses_columns keeps classes below 2^31), int64 for double.
template <typename T>
using LaneIndex = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
PE_INLINE void column_targets(const ColumnBlock<T>& b, int64_t ignore_index,
                              LaneIndex<T>* target) {
  PE_LANES for (int64_t l = 0; l < kColumnLanes<T>; ++l) {
    target[l] = l < b.width && b.t[l] != ignore_index ? static_cast<LaneIndex<T>>(b.t[l])
                                                       : LaneIndex<T>(-1);
  }
}

// Per lane with class-index targets: x_t, the target's logit, and w_t, its class weight (1
// without weight; both 0 for an ignored lane), picked by a select per class rather than a gather
// per lane. A full block uses GCC vector types: written as a loop over lanes, GCC compiled the
// selects into scalar branches here (perf: most of a 21-class forward's time). Vectors of the
// level's width (VB bytes): 64-byte ones compiled for AVX2 went back to a branch per lane (perf,
// Zen 3: ~55% of that forward).
template <typename T, bool kFull, int VB>
PE_INLINE void column_pick_target(const ColumnBlock<T>& b, const LaneIndex<T>* target,
                                  const T* w, T* xt_out, T* wt_out) {
  constexpr int64_t L = kColumnLanes<T>;
  if constexpr (kFull) {
    using Index = LaneIndex<T>;
    typedef T V __attribute__((vector_size(VB)));
    typedef Index I __attribute__((vector_size(VB)));
    constexpr int64_t kVectors = L * sizeof(T) / VB;
    static_assert(sizeof(I) == sizeof(V) && kVectors * VB == L * int64_t(sizeof(T)));
    V xt[kVectors] = {}, wt[kVectors] = {};
    I tl[kVectors];
    std::memcpy(tl, target, sizeof(tl));
    for (int64_t j = 0; j < b.classes; ++j) {
      const V wj = V{} + (w ? w[j] : T(1));
      for (int64_t v = 0; v < kVectors; ++v) {
        V xj;
        std::memcpy(&xj, b.x + j * b.stride + v * int64_t(VB / sizeof(T)), sizeof(V));
        const auto hit = tl[v] == static_cast<Index>(j);
        xt[v] = hit ? xj : xt[v];
        wt[v] = hit ? wj : wt[v];
      }
    }
    std::memcpy(xt_out, xt, sizeof(xt));
    std::memcpy(wt_out, wt, sizeof(wt));
  } else {
    for (int64_t l = 0; l < L; ++l) xt_out[l] = wt_out[l] = T(0);
    for (int64_t l = 0; l < b.width; ++l) {
      if (target[l] < 0) continue;
      xt_out[l] = b.x[target[l] * b.stride + l];
      wt_out[l] = w ? w[target[l]] : T(1);
    }
  }
}

// What the forward's block needs beyond the operands: as the row loop's lambda in
// cross_entropy_cpu.
template <typename T>
struct ColumnLossArgs {
  const T* w;
  T keep, add;
  double eps;
  int64_t ignore_index;
};

// Lane l's loss and its share of the 'mean' denominator (as the row loop: w[t], 0 when ignored,
// 1 per pixel of probabilities): into loss_out[l] for 'none', else their sums over the block's
// lanes (a fixed tree) into sums_out[0] and [1]; and, when lse_out is not null, the lane's
// log-sum-exp m + log s as its pair (log_sum_exp_pair) into lse_out[2l], lse_out[2l + 1].
template <typename T, bool kFull, int VB>
PE_INLINE void column_losses_body(const ColumnBlock<T>& b, const ColumnLossArgs<T>& a,
                                  double* loss_out, double* sums_out, T* lse_out) {
  constexpr int64_t L = kColumnLanes<T>;
  const int64_t W = kFull ? L : b.width;
  T m[L], xt[L], wt[L];
  double s[L], log_sum[L], dot[L], total[L], loss[L] = {}, share[L] = {};
  column_max_sum<T, kFull, false>(b, m, s, nullptr);
  PE_LANES for (int64_t l = 0; l < L; ++l) log_sum[l] = log_at_least_one(l < W ? s[l] : 1.0);
  if (lse_out != nullptr) {
    T hi[L], lo[L];
    PE_LANES for (int64_t l = 0; l < L; ++l) {
      log_sum_exp_pair(static_cast<double>(m[l]), log_sum[l], hi[l], lo[l]);
    }
    for (int64_t l = 0; l < W; ++l) {
      lse_out[2 * l] = hi[l];
      lse_out[2 * l + 1] = lo[l];
    }
  }
  const bool smoothed = b.t == nullptr || a.eps != 0;
  if (smoothed) {
    with_column_coefficients(b, a.w, a.keep, a.add, [&](const auto& u) {
      column_coefficient_sums<T, kFull, true>(b, m, u, dot, total);
      return 0;
    });
  }
  if (b.t == nullptr) {  // probabilities
    PE_LANES for (int64_t l = 0; l < W; ++l) {
      loss[l] = -(dot[l] - total[l] * log_sum[l]);
      share[l] = 1;
    }
  } else {
    LaneIndex<T> target[L];
    column_targets(b, a.ignore_index, target);
    column_pick_target<T, kFull, VB>(b, target, a.w, xt, wt);
    const double smooth_share = a.eps / static_cast<double>(b.classes);
    PE_LANES for (int64_t l = 0; l < W; ++l) {
      const bool kept = target[l] >= 0;
      const double w_t = static_cast<double>(wt[l]);
      const double nll = -w_t * (static_cast<double>(xt[l]) - static_cast<double>(m[l]) -
                                 log_sum[l]);
      const double smooth = smoothed ? (1 - a.eps) * nll +
                                           smooth_share * -(dot[l] - total[l] * log_sum[l])
                                     : nll;
      loss[l] = kept ? smooth : 0.0;
      share[l] = kept ? w_t : 0.0;
    }
  }
  if (loss_out != nullptr) {
    PE_LANES for (int64_t l = 0; l < L; ++l) loss_out[l] = loss[l];
    return;
  }
  sums_out[0] = lane_total<L>(loss);
  sums_out[1] = lane_total<L>(share);
}

// VB: the bytes of the level's vectors (64, 32 or 16), for column_pick_target.
template <typename T, int VB>
PE_INLINE void column_losses_impl(ColumnBlock<T> b, ColumnLossArgs<T> a, double* loss,
                                  double* sums, T* lse) {
  if (b.width == kColumnLanes<T>) {
    column_losses_body<T, true, VB>(b, a, loss, sums, lse);
  } else {
    column_losses_body<T, false, VB>(b, a, loss, sums, lse);
  }
}

// The backward's block, per lane: a = grad_output (g[l] for 'none', else the one `a_all`, the
// 'mean' division done), then the row loop's cases: probabilities g_j = a (p_j U - u_j); class
// indices g_j = alpha p_j' - [j == t] gamma with the smoothed term when eps > 0, as
// SmoothedGradOf (p_j' = e_j / s); an ignored pixel's gradient exact zeros (even for NaN logits,
// as the rows' fill).
template <typename T>
struct ColumnGradArgs {
  const T* w;
  T keep, add;
  double eps;
  int64_t ignore_index;
  const T* g;     // the block's grad_output for 'none', else null
  double a_all;   // grad_output (/ the 'mean' denominator) otherwise
  T* grad;        // lane l's class j at grad[j * stride + l]
  const T* lse;   // the block's log-sum-exp pairs (the forward's; lane l's at 2l), or null
};

// The block from the forward's log-sum-exps (class-index targets, no smoothing): g_j =
// a w[t] (exp(x_j - lse) - [j == t]), exact zeros for an ignored pixel; each logit read once,
// straight from its row, where the form below copies the block, takes its max, stores and sums
// its exps, then rescales them (8 x 21 x 64 x 64 float32, two threads: see the README).
template <typename T, bool kFull, int VB>
PE_INLINE void column_grads_from_lse(const ColumnBlock<T>& b, const ColumnGradArgs<T>& a) {
  constexpr int64_t L = kColumnLanes<T>;
  const int64_t W = kFull ? L : b.width;
  T hi[L], lo[L], xt[L], wt[L], scale[L], keep[L];
  LaneIndex<T> target[L];
  column_targets(b, a.ignore_index, target);
  if (a.w != nullptr)
    column_pick_target<T, kFull, VB>(b, target, a.w, xt, wt);
  else
    PE_LANES for (int64_t l = 0; l < L; ++l) wt[l] = T(1);
  PE_LANES for (int64_t l = 0; l < L; ++l) {
    const bool in = l < W;
    const double g = a.g && in ? static_cast<double>(a.g[l]) : a.a_all;
    scale[l] = in ? static_cast<T>(g * static_cast<double>(wt[l])) : T(0);
    hi[l] = in ? a.lse[2 * l] : T(0);
    lo[l] = in ? a.lse[2 * l + 1] : T(0);
    keep[l] = in && target[l] >= 0 ? T(1) : T(0);
  }
  for (int64_t j = 0; j < b.classes; ++j) {
    const T* xj = b.x + j * b.stride;
    T* gj = a.grad + j * b.stride;
    const auto j_lane = static_cast<LaneIndex<T>>(j);
    if (kFull)  // (as copy_block: the many rows at one stride outnumber the hardware's streams)
      for (int64_t c = 0; c < L * int64_t(sizeof(T)); c += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(xj) +
                                                         uintptr_t(2 * L * sizeof(T) + c)),
                           0, 2);
    PE_LANES for (int64_t l = 0; l < W; ++l) {
      const T g = fast_exp_nonpositive((xj[l] - hi[l]) - lo[l]) * scale[l] -
                  (target[l] == j_lane ? scale[l] : T(0));
      gj[l] = keep[l] != T(0) ? g : T(0);
    }
  }
}

template <typename T, bool kFull, int VB>
PE_INLINE void column_grads_body(const ColumnBlock<T>& b, const ColumnGradArgs<T>& a) {
  constexpr int64_t L = kColumnLanes<T>;
  const int64_t W = kFull ? L : b.width;
  if (a.lse != nullptr && b.t != nullptr && a.eps == 0) {
    column_grads_from_lse<T, kFull, VB>(b, a);
    return;
  }
  T m[L], xt[L], wt[L], scale[L], bias[L], gamma[L], keep[L];
  LaneIndex<T> target[L];
  double s[L], total[L];
  // The exp terms: in a contiguous copy in L1 (e, row j at j * L) for up to kLocalClasses
  // classes, else stored straight into the gradient (row j at j * stride).
  alignas(64) T local[kLocalClasses * L];
  const bool in_l1 = b.classes <= kLocalClasses;
  T* const e = in_l1 ? local : a.grad;
  const int64_t e_stride = in_l1 ? L : b.stride;
  if (in_l1) {  // (the exp terms stored over the copied logits)
    copy_block<T, kFull>(b, local, m);
    column_exp_sum<T, kFull, true>(ColumnBlock<T>{local, nullptr, b.t, b.classes, L, b.width}, m,
                                   s, local);
  } else {
    column_max_sum<T, kFull, true>(b, m, s, a.grad);
  }
  const bool smoothed = b.t == nullptr || a.eps != 0;
  if (smoothed) {
    with_column_coefficients(b, a.w, a.keep, a.add, [&](const auto& u) {
      column_coefficient_sums<T, kFull, false>(b, m, u, nullptr, total);
      return 0;
    });
  } else {
    PE_LANES for (int64_t l = 0; l < L; ++l) total[l] = 0;
  }
  if (b.t != nullptr) {
    column_targets(b, a.ignore_index, target);
    // The target's class weight (the gradient needs no target logit): without weights, 1 (an
    // ignored lane's gradient is zeroed by keep below), without a pass over the classes.
    if (a.w != nullptr)
      column_pick_target<T, kFull, VB>(b, target, a.w, xt, wt);
    else
      PE_LANES for (int64_t l = 0; l < L; ++l) wt[l] = T(1);
  } else {
    PE_LANES for (int64_t l = 0; l < L; ++l) target[l] = -1;
  }
  const double smooth_share = a.eps / static_cast<double>(b.classes);
  PE_LANES for (int64_t l = 0; l < L; ++l) {
    const bool in = l < W;
    const double g = a.g && in ? static_cast<double>(a.g[l]) : a.a_all;
    double alpha = 0, beta = g, gam = 0;
    bool kept = in;
    if (b.t != nullptr) {
      kept = target[l] >= 0;
      const double wc = static_cast<double>(wt[l]);
      alpha = gam = a.eps == 0 ? g * wc : g * (1 - a.eps) * wc;
      beta = a.eps == 0 ? 0.0 : g * smooth_share;
    }
    scale[l] = in ? static_cast<T>((alpha + beta * total[l]) / s[l]) : T(0);
    bias[l] = static_cast<T>(beta);
    gamma[l] = static_cast<T>(gam);
    keep[l] = kept ? T(1) : T(0);
  }
  if (!smoothed) {
    for (int64_t j = 0; j < b.classes; ++j) {
      const T* ej = e + j * e_stride;
      T* gj = a.grad + j * b.stride;
      const auto j_lane = static_cast<LaneIndex<T>>(j);
      PE_LANES for (int64_t l = 0; l < W; ++l) {
        const T g = ej[l] * scale[l] - (target[l] == j_lane ? gamma[l] : T(0));
        gj[l] = keep[l] != T(0) ? g : T(0);
      }
    }
    return;
  }
  with_column_coefficients(b, a.w, a.keep, a.add, [&](const auto& u) {
    for (int64_t j = 0; j < b.classes; ++j) {
      const T* ej = e + j * e_stride;
      T* gj = a.grad + j * b.stride;
      const auto j_lane = static_cast<LaneIndex<T>>(j);
      PE_LANES for (int64_t l = 0; l < W; ++l) {
        const T g =
            (ej[l] * scale[l] - bias[l] * u(j, l)) - (target[l] == j_lane ? gamma[l] : T(0));
        gj[l] = keep[l] != T(0) ? g : T(0);
      }
    }
    return 0;
  });
}

template <typename T, int VB>
PE_INLINE void column_grads_impl(ColumnBlock<T> b, ColumnGradArgs<T> a) {
  if (b.width == kColumnLanes<T>) {
    column_grads_body<T, true, VB>(b, a);
  } else {
    column_grads_body<T, false, VB>(b, a);
  }
}

#define PE_DEFINE_COLUMN_KERNELS(T)                                                          \
  PE_ISA_FUNCTION_PER_LEVEL(Family::CrossEntropy, void, column_losses,                      \
                            (ColumnBlock<T> b, ColumnLossArgs<T> a, double* loss,           \
                             double* sums, T* lse),                                         \
                            (b, a, loss, sums, lse), (column_losses_impl<T, 64>),           \
                            (column_losses_impl<T, 32>), (column_losses_impl<T, 16>))       \
  PE_ISA_FUNCTION_PER_LEVEL(Family::CrossEntropy, void, column_grads,                       \
                            (ColumnBlock<T> b, ColumnGradArgs<T> a), (b, a),                \
                            (column_grads_impl<T, 64>), (column_grads_impl<T, 32>),         \
                            (column_grads_impl<T, 16>))
PE_DEFINE_COLUMN_KERNELS(float)
PE_DEFINE_COLUMN_KERNELS(double)
#undef PE_DEFINE_COLUMN_KERNELS

// Whether the column kernels run: classes inner > 1 apart. Their int32 target lanes need fewer
// than 2^31 classes; more, with d1 * ... > 1, is input of at least 2^32 logits whose case is
// refused rather than served by an untested path.
bool uses_columns(const CrossEntropyShape<int64_t>& s, const char* op) {
  const bool columns = s.inner > 1 && s.classes > 0;
  TORCH_CHECK(!columns || s.classes < (int64_t(1) << 31), "pyengine.", op, ": (N, C, d1, ...) "
              "input with C >= 2^31 classes is not supported on CPU, but got C = ", s.classes,
              " with d1 * ... = ", s.inner);
  return columns;
}

// f(n, s, width) for consecutive blocks of pixels covering rows [begin, end) (row i is pixel
// s = i % inner of sample n = i / inner), each within one sample and at most L wide.
template <int64_t L, class F>
void for_pixel_blocks(int64_t begin, int64_t end, int64_t inner, const F& f) {
  int64_t n = begin / inner, s = begin - n * inner;  // one division, not one per block
  for (int64_t i = begin; i < end;) {
    const int64_t width = std::min({L, inner - s, end - i});
    f(n, s, width);
    i += width;
    s += width;
    if (s == inner) {
      s = 0;
      ++n;
    }
  }
}

// at::parallel_for over rows [0, n) in tasks that start at multiples of `align` (the column
// kernels' block width, or 1), so that no task boundary splits a block: a split block runs the
// kernels' narrow-width code, which is scalar (perf: half of 2 x 150 x 32 x 32's forward).
template <class F>
void parallel_rows(int64_t n, int64_t grain, int64_t align, const F& f) {
  const int64_t units = (n + align - 1) / align;
  at::parallel_for(0, units, std::max<int64_t>(1, grain / align),
                   [&](int64_t b, int64_t e) { f(b * align, std::min(n, e * align)); });
}

// Narrow rows (inner == 1, at most this many classes) run on the column kernels too, a block of
// kColumnLanes rows at a time, copied transposed into a (classes x lanes) block in L1: the row
// kernels' fixed costs (a -inf padded 64-byte block, its double lanes' tree, a libm log) were most
// of a 10-class row's time (perf: 256 x 10 forward, Zen 3), and the forward took 1.6-2.0x torch's.
constexpr int64_t kNarrowClasses = 16;

bool uses_narrow_rows(const CrossEntropyShape<int64_t>& s) {
  return s.inner == 1 && s.classes > 0 && s.classes <= kNarrowClasses;
}

// dst[j * L + l] = src[l * classes + j] for l < width, j < classes.
template <typename T, int64_t L>
void transpose_rows(const T* src, int64_t classes, int64_t width, T* dst) {
  for (int64_t l = 0; l < width; ++l)
    for (int64_t j = 0; j < classes; ++j) dst[j * L + l] = src[l * classes + j];
}

// A partial sum's rows, rounded up to whole column blocks (align rows).
int64_t aligned_chunk(int64_t chunk, int64_t align) { return (chunk + align - 1) / align * align; }

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

// float32 pairs (hi, lo) re-split for a 16-bit dtype L (PE_KERNEL's float32 copies of a 16-bit
// call): hi + lo (float32's pair holds lse to ~2^-48) rounded to L, and the remainder, as the
// values of L that float32 holds exactly.
template <typename L>
void resplit_pairs(float* pairs, int64_t rows) {
  at::parallel_for(0, rows, kElementwiseGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double lse = double(pairs[2 * i]) + double(pairs[2 * i + 1]);
      const float hi = static_cast<float>(L(static_cast<float>(lse)));
      const double rest = lse - double(hi);
      pairs[2 * i] = hi;
      pairs[2 * i + 1] =
          rest == rest && hi - hi == 0.0f ? static_cast<float>(L(static_cast<float>(rest))) : 0.0f;
    }
  });
}

// Napkin math (forward; reference machine: csrc/cpu/README.md): reads the N x C logits once (a
// row stays in L1 between its max, exp-sum and gather passes) plus N targets; C exps and one log
// per row. For N = 4096, C = 1000 float32: 16 MB, ~0.5 ms from L3 at ~35 GB/s per core, and 4.1M
// exps at ~25 vector ops per 16 (~2 ops per cycle): ~0.9 ms on one core, so bound by the exps.
// The smoothed forms add a pass of ~3 flops per logit over the row in L1 (and read the N x C
// probabilities, for probability targets): still bound by the exps.
// Achieved figures: the benchmark suite (python -m benchmarks).
//
// with_lse: also each row's log-sum-exp (cross_entropy_with_log_sum_exp), as (hi, lo) pairs of
// `pair_dtype` (the caller's input dtype: PE_KERNEL hands 16-bit calls over as float32 copies);
// undefined otherwise.
std::tuple<Tensor, Tensor> cross_entropy_forward_cpu(const Tensor& input, const Tensor& target,
                                                     const OptTensor& weight, int64_t reduction,
                                                     int64_t ignore_index,
                                                     double label_smoothing, bool with_lse,
                                                     c10::ScalarType pair_dtype) {
  const auto s = check_cross_entropy<int64_t>(input, target, weight, reduction, ignore_index,
                                              label_smoothing);
  // n rows: one per sample, or per pixel (row i = n * inner + s) of (N, C, d1, ...) input, whose
  // classes lie inner apart (the column kernels).
  const int64_t n = s.rows(), classes = s.classes, inner = s.inner;
  const bool columns = uses_columns(s, "cross_entropy");
  // Either runs blocks of kColumnLanes rows (tasks and partial sums start at whole blocks).
  const bool narrow = uses_narrow_rows(s), in_blocks = columns || narrow;
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const int64_t* pt = s.probabilities ? nullptr : t.const_data_ptr<int64_t>();
  if (!s.probabilities) check_targets(pt, n, classes, ignore_index, "cross_entropy");
  const double eps = label_smoothing;
  Tensor out;
  const Tensor lse = with_lse ? empty_of(log_sum_exp_sizes(s), x.options()) : Tensor();
  dispatch_floating(x.scalar_type(), "cross_entropy", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = s.probabilities ? t.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* plse = with_lse ? lse.mutable_data_ptr<scalar_t>() : nullptr;
    // (loss_i, denominator share_i) of row i: w[t_i], 0 for an ignored row; 1 per row of
    // probabilities (0 without classes: torch's 'mean' over no element is NaN). Writes the row's
    // log-sum-exp to plse[i] when asked (-inf without classes: an empty sum).
    auto row = [&](int64_t i, double& share_i) -> double {
      const scalar_t* xr = px + i * classes;
      auto put_lse = [&](double shift, double log_sum) {
        if (plse) log_sum_exp_pair(shift, log_sum, plse[2 * i], plse[2 * i + 1]);
      };
      if (s.probabilities) {
        share_i = classes > 0 ? 1.0 : 0.0;
        if (classes == 0) {  // an empty sum (D - U log s would be 0 * -inf)
          put_lse(-std::numeric_limits<double>::infinity(), 0.0);
          return 0;
        }
        const SmoothedSums r =
            smoothed_sums(xr, classes, coefficients(pw, pp + i * classes, eps, classes));
        put_lse(r.shift, r.log_sum);
        return -(r.dot - r.total * r.log_sum);
      }
      const int64_t c = pt[i];
      if (c == ignore_index) {
        share_i = 0;
        if (plse) {
          const RowLogSumExp r = log_sum_exp(xr, classes);
          put_lse(r.shift, r.log_sum);
        }
        return 0;
      }
      share_i = pw ? static_cast<double>(pw[c]) : 1.0;
      if (eps == 0) {
        const RowLogSumExp r = log_sum_exp(xr, classes);
        put_lse(r.shift, r.log_sum);
        return -share_i * (static_cast<double>(xr[c]) - r.shift - r.log_sum);
      }
      const SmoothedSums r =
          smoothed_sums(xr, classes, coefficients<scalar_t>(pw, nullptr, eps, classes));
      put_lse(r.shift, r.log_sum);
      const double nll = -share_i * (static_cast<double>(xr[c]) - r.shift - r.log_sum);
      return (1 - eps) * nll + eps / static_cast<double>(classes) * -(r.dot - r.total * r.log_sum);
    };
    // The column kernels' blocks covering the rows [b, e), in row order: on_block(i, width,
    // loss, sums) with block row i's losses at loss[0, width) ('none', want_losses), else the
    // block's (loss, share) sums.
    const RowCoefficients<scalar_t> q = coefficients<scalar_t>(pw, nullptr, eps, classes);
    const ColumnLossArgs<scalar_t> column_args{pw, q.keep, q.add, eps, ignore_index};
    constexpr int64_t L = kColumnLanes<scalar_t>;
    auto blocks = [&](int64_t b, int64_t e, bool want_losses, const auto& on_block) {
      if (narrow) {  // rows [i, i + width) transposed: lane l is row i + l
        alignas(64) scalar_t xb[kNarrowClasses * L], pb[kNarrowClasses * L];
        for (int64_t i = b; i < e; i += L) {
          const int64_t width = std::min(L, e - i);
          transpose_rows<scalar_t, L>(px + i * classes, classes, width, xb);
          if (pp) transpose_rows<scalar_t, L>(pp + i * classes, classes, width, pb);
          double loss[L], sums[2];
          column_losses(ColumnBlock<scalar_t>{xb, pp ? pb : nullptr, pt ? pt + i : nullptr,
                                              classes, L, width},
                        column_args, want_losses ? loss : nullptr, sums,
                        plse ? plse + 2 * i : nullptr);
          on_block(i, width, loss, sums);
        }
        return;
      }
      for_pixel_blocks<L>(b, e, inner, [&](int64_t sample, int64_t pixel, int64_t width) {
        const int64_t offset = sample * classes * inner + pixel, i = sample * inner + pixel;
        double loss[L], sums[2];
        column_losses(ColumnBlock<scalar_t>{px + offset, pp ? pp + offset : nullptr,
                                            pt ? pt + i : nullptr, classes, inner, width},
                      column_args, want_losses ? loss : nullptr, sums,
                      plse ? plse + 2 * i : nullptr);
        on_block(i, width, loss, sums);
      });
    };
    if (reduction == 0) {
      // (N, d1, ...) for batched input, 0-d for unbatched.
      out = empty_of(s.loss_sizes, x.options());
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      parallel_rows(n, rows_per(kElementwiseGrain, classes), in_blocks ? L : 1,
                    [&](int64_t b, int64_t e) {
        if (in_blocks) {
          blocks(b, e, true, [&](int64_t i, int64_t width, const double* loss, const double*) {
            for (int64_t l = 0; l < width; ++l) po[i + l] = static_cast<scalar_t>(loss[l]);
          });
          return;
        }
        double unused;
        for (int64_t i = b; i < e; ++i) po[i] = static_cast<scalar_t>(row(i, unused));
      });
      return;
    }
    const int64_t chunk = aligned_chunk(rows_per(kSumChunk, classes), in_blocks ? L : 1);
    const auto sums = deterministic_sum<2>(
        n, chunk, kElementwiseGrain / kSumChunk,
        [&](int64_t b, int64_t e, std::array<double, 2>& acc) {
          if (in_blocks) {  // a block's lanes by a fixed tree, then the blocks in order
            blocks(b, e, false, [&](int64_t, int64_t, const double*, const double* sums) {
              acc[0] += sums[0];
              acc[1] += sums[1];
            });
            return;
          }
          for (int64_t i = b; i < e; ++i) {
            double share_i;
            acc[0] += row(i, share_i);
            acc[1] += share_i;
          }
        });
    out = scalar_like(reduction == 1 ? sums[0] / sums[1] : sums[0], x);
  });
  if (with_lse && lse.scalar_type() == at::kFloat && pair_dtype == at::kBFloat16)
    resplit_pairs<c10::BFloat16>(lse.mutable_data_ptr<float>(), n);
  if (with_lse && lse.scalar_type() == at::kFloat && pair_dtype == at::kHalf)
    resplit_pairs<c10::Half>(lse.mutable_data_ptr<float>(), n);
  return {out, lse};
}

Tensor cross_entropy_cpu(const Tensor& input, const Tensor& target, const OptTensor& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing) {
  return std::get<0>(cross_entropy_forward_cpu(input, target, weight, reduction, ignore_index,
                                               label_smoothing, /*with_lse=*/false,
                                               input.scalar_type()));
}

std::tuple<Tensor, Tensor> cross_entropy_with_log_sum_exp_pairs(
    const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, c10::ScalarType pair_dtype) {
  return cross_entropy_forward_cpu(input, target, weight, reduction, ignore_index,
                                   label_smoothing, /*with_lse=*/true, pair_dtype);
}

// Registered: the pairs rounded to the caller's dtype, through PE_KERNEL's float32 copies.
std::tuple<Tensor, Tensor> cross_entropy_with_log_sum_exp_cpu(
    const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing) {
  using Kernel = low_precision::Float32Inside<decltype(cross_entropy_with_log_sum_exp_pairs),
                                              &cross_entropy_with_log_sum_exp_pairs>;
  return Kernel::call(input, target, weight, reduction, ignore_index, label_smoothing,
                      input.scalar_type());
}

// Napkin math (backward): reads the logits, writes grad_input (8 B per float32 logit) plus N
// targets; C exps per row, written once into grad_input and rescaled in place while the row is in
// L1. Bound by the exps, like the forward: ~0.9 ms on one core for 4096 x 1000 float32. Given
// the forward's log-sum-exps (class indices, no smoothing) the max and the sum go: one exp and
// two flops per logit, read and written once. Measured, 8 x 21 x 64 x 64 float32 on two threads
// (the Zen 5 of the README): 0.15-0.16 ms for its 5.5 MB, ~35 GB/s, against 0.21-0.24
// recomputing.
Tensor cross_entropy_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                  const Tensor& target, const OptTensor& weight,
                                  int64_t reduction, int64_t ignore_index,
                                  double label_smoothing, const OptTensor& log_sum_exp) {
  const auto s = check_cross_entropy_backward<int64_t>(grad_output, input, target, weight,
                                                       reduction, ignore_index, label_smoothing,
                                                       log_sum_exp);
  const int64_t n = s.rows(), classes = s.classes, inner = s.inner;  // as in the forward
  const bool columns = uses_columns(s, "cross_entropy_backward");
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const Tensor go = grad_output.contiguous();
  // The forward's log-sum-exps, where the one-pass forms take them (class indices, no smoothing).
  const bool from_lse = log_sum_exp.has_value() && log_sum_exp->defined() &&
                        !s.probabilities && label_smoothing == 0;
  const Tensor lse = from_lse ? log_sum_exp->contiguous() : Tensor();
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
    const scalar_t* plse = from_lse ? lse.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgi = grad_input.mutable_data_ptr<scalar_t>();
    // 'mean': the forward's denominator, the number of rows (probabilities) or sum(w[t_i]) over
    // rows not ignored.
    double total = 1;
    if (reduction == 1 && s.probabilities) total = static_cast<double>(n);
    if (reduction == 1 && !s.probabilities && !pw) {
      total = static_cast<double>(count_kept_targets(pt, n, ignore_index));
    } else if (reduction == 1 && !s.probabilities) {
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
    // The row's a = g_i (/ total for 'mean'): g / total first, then * w, as torch: a zero weight
    // over a zero total gives NaN there.
    auto row_scale = [&](int64_t i) {
      const double a = static_cast<double>(reduction == 0 ? pg[i] : pg[0]);
      return reduction == 1 ? a / total : a;
    };
    if (columns) {
      const RowCoefficients<scalar_t> q = coefficients<scalar_t>(pw, nullptr, eps, classes);
      const double a_all = reduction == 0 ? 0.0 : row_scale(0);  // 'none': per pixel
      parallel_rows(n, rows_per(kElementwiseGrain, classes), kColumnLanes<scalar_t>,
                    [&](int64_t b, int64_t e) {
        for_pixel_blocks<kColumnLanes<scalar_t>>(b, e, inner, [&](int64_t sample, int64_t pixel,
                                                            int64_t width) {
          const int64_t offset = sample * classes * inner + pixel, i0 = sample * inner + pixel;
          const ColumnBlock<scalar_t> block{px + offset, pp ? pp + offset : nullptr,
                                            pt ? pt + i0 : nullptr, classes, inner, width};
          column_grads(block, ColumnGradArgs<scalar_t>{pw, q.keep, q.add, eps, ignore_index,
                                                      reduction == 0 ? pg + i0 : nullptr,
                                                      a_all, pgi + offset,
                                                      plse ? plse + 2 * i0 : nullptr});
        });
      });
      return;
    }
    at::parallel_for(0, n, rows_per(kElementwiseGrain, classes), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xr = px + i * classes;
        scalar_t* gr = pgi + i * classes;
        const double a = row_scale(i);
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
          if (plse)
            softmax_grad_from_lse(xr, classes, c, a * wc, plse[2 * i], plse[2 * i + 1], gr);
          else
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

// The registered backward: cross_entropy_backward_cpu under PE_KERNEL. A 16-bit input's backward
// checks log_sum_exp, then recomputes its sums in float32 without it (a 16-bit pair's hi can
// overflow float16 where the logits do not, and its lo carries only 16-bit's bits).
Tensor cross_entropy_backward_entry(const Tensor& grad_output, const Tensor& input,
                                    const Tensor& target, const OptTensor& weight,
                                    int64_t reduction, int64_t ignore_index,
                                    double label_smoothing, const OptTensor& log_sum_exp) {
  using Kernel = low_precision::Float32Inside<decltype(cross_entropy_backward_cpu),
                                              &cross_entropy_backward_cpu>;
  const bool low = low_precision::is_low(input.scalar_type());
  if (low && log_sum_exp.has_value())
    check_cross_entropy_backward<int64_t>(grad_output, input, target, weight, reduction,
                                          ignore_index, label_smoothing, log_sum_exp);
  return Kernel::call(grad_output, input, target, weight, reduction, ignore_index,
                      label_smoothing, low ? std::nullopt : log_sum_exp);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("cross_entropy", PE_KERNEL(cross_entropy_cpu));
  m.impl("cross_entropy_with_log_sum_exp", cross_entropy_with_log_sum_exp_cpu);
  m.impl("cross_entropy_backward", cross_entropy_backward_entry);
}

}  // namespace pyengine
