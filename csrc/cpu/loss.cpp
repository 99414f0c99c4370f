// CPU kernels of the losses (mse_loss, binary_cross_entropy, cross_entropy) and their backward
// passes. Per-element math shared with CUDA lives in common/elementwise.h; argument checks in
// common/checks.h (the Meta kernels run the same ones, so every backend says the same thing).
//
// Reductions accumulate in double, also for float32, and are deterministic: the items are cut
// into fixed-size chunks (the cut depends on the shape only), each chunk is summed in index order
// by one task, and the chunk partials are added in chunk order. The result is bitwise the same
// with any number of threads, run after run.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/elementwise.h"
#include "cpu/loops.h"

namespace pyengine {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Elements per partial sum. A multiple of 8, so lane_sum's lanes sit at the same offsets in every
// chunk; a 1M-element loss gives 256 partials, grouped kElementwiseGrain / kSumChunk per task.
constexpr int64_t kSumChunk = 4096;

// Sums into K accumulators over [0, n): f(begin, end, acc) adds the chunk [begin, end) into acc.
// Chunks of `chunk` items; `grain` chunks at least per parallel task.
template <int K, typename F>
std::array<double, K> deterministic_sum(int64_t n, int64_t chunk, int64_t grain, F f) {
  std::array<double, K> total{};
  if (n <= 0) return total;
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (chunks == 1) {
    f(int64_t(0), n, total);
    return total;
  }
  std::vector<std::array<double, K>> partial(chunks);
  at::parallel_for(0, chunks, std::max<int64_t>(1, grain), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      std::array<double, K> acc{};
      f(c * chunk, std::min(n, (c + 1) * chunk), acc);
      partial[c] = acc;
    }
  });
  for (const auto& p : partial)
    for (int k = 0; k < K; ++k) total[k] += p[k];
  return total;
}

// sum of term(i) over [begin, end) in double, in 8 interleaved lanes (fixed layout, so a fixed
// order of additions) that the compiler can keep in SIMD registers.
template <typename F>
inline double lane_sum(int64_t begin, int64_t end, F term) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += static_cast<double>(term(i + j));
  for (; i < end; ++i) lane[0] += static_cast<double>(term(i));
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

const Tensor* weight_or_null(const OptTensor& weight) {
  return weight.has_value() && weight->defined() ? &*weight : nullptr;
}

// A 0-d tensor holding `value`.
Tensor scalar_like(double value, const Tensor& like) {
  Tensor out = at::empty({}, like.options());
  dispatch_floating(like.scalar_type(), "loss", [&](auto tag) {
    using scalar_t = decltype(tag);
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  });
  return out;
}

// ---- mse_loss and binary_cross_entropy: one pattern, two per-element terms ------------------
//
// Forward: loss_i = w_i * term(x_i, t_i); 'none' writes them, 'sum' adds them, 'mean' divides the
// sum by numel, or (mse_loss with a weight, as torch.nn.functional) by sum(w).
// Backward: grad_i = g_i * w_i * dterm(x_i, t_i), g_i divided by the same denominator for 'mean'.

enum class MeanOver { Numel, WeightSum };

struct MseMath {
  template <typename T>
  static T term(T x, T t) { T d = x - t; return d * d; }
  template <typename T>
  static T dterm(T x, T t) { return T(2) * (x - t); }
};
struct BceMath {
  template <typename T>
  static T term(T p, T y) { return bce_term(p, y); }
  template <typename T>
  static T dterm(T p, T y) { return bce_grad(p, y); }
};

// mean's denominator: numel, or the weights' sum (a deterministic double sum of its own).
template <typename scalar_t>
double mean_denominator(const scalar_t* pw, int64_t n, MeanOver mean_over) {
  if (mean_over == MeanOver::Numel || pw == nullptr) return static_cast<double>(n);
  return deterministic_sum<1>(n, kSumChunk, kElementwiseGrain / kSumChunk,
                              [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
                                acc[0] += lane_sum(b, e, [&](int64_t i) { return pw[i]; });
                              })[0];
}

// Napkin math (forward): reads input and target (and weight), 4 or 8 bytes each per element,
// writes 4/8 per element for 'none' only. mse_loss is ~3 flops per element: memory-bound, a 1M
// float32 loss moves 8 MB, a ~0.4 ms floor at ~20 GB/s on the 2-core machine (the double lanes
// keep up with that). binary_cross_entropy pays two scalar logs per element (~10-20 ns each
// without a vector math library): compute-bound, several times the memory floor.
template <typename Math>
Tensor pointwise_loss(const Tensor& input, const Tensor& target, const OptTensor& weight,
                      int64_t reduction, MeanOver mean_over, const char* op) {
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const int64_t n = x.numel();
  Tensor out;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    if (reduction == 0) {
      out = at::empty(x.sizes(), x.options());
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        if (pw) {
          for (int64_t i = b; i < e; ++i) po[i] = pw[i] * Math::term(px[i], pt[i]);
        } else {
          for (int64_t i = b; i < e; ++i) po[i] = Math::term(px[i], pt[i]);
        }
      });
      return;
    }
    const double sum = deterministic_sum<1>(
        n, kSumChunk, kElementwiseGrain / kSumChunk,
        [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
          if (pw) {
            acc[0] += lane_sum(b, e, [&](int64_t i) { return pw[i] * Math::term(px[i], pt[i]); });
          } else {
            acc[0] += lane_sum(b, e, [&](int64_t i) { return Math::term(px[i], pt[i]); });
          }
        })[0];
    // 'mean' of an empty input is 0 / 0 = NaN, as torch's.
    const double value = reduction == 1 ? sum / mean_denominator(pw, n, mean_over) : sum;
    out = scalar_like(value, x);
  });
  return out;
}

// Napkin math (backward): reads grad_output (one scalar, or an input-sized array for 'none'),
// input, target (and weight), writes grad_input: 12-20 bytes per float32 element, memory-bound
// for mse (~0.6 ms per 1M floats), a division per element for binary_cross_entropy.
template <typename Math>
Tensor pointwise_loss_backward(const Tensor& grad_output, const Tensor& input,
                               const Tensor& target, const OptTensor& weight, int64_t reduction,
                               MeanOver mean_over, const char* op) {
  const Tensor x = input.contiguous();
  const Tensor t = target.contiguous();
  const Tensor* wp = weight_or_null(weight);
  const Tensor w = wp ? wp->contiguous() : Tensor();
  const Tensor go = grad_output.contiguous();
  const int64_t n = x.numel();
  Tensor grad_input = at::empty(x.sizes(), x.options());
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    const scalar_t* pw = wp ? w.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pg = go.const_data_ptr<scalar_t>();
    scalar_t* pgi = grad_input.mutable_data_ptr<scalar_t>();
    if (reduction == 0) {
      at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
        if (pw) {
          for (int64_t i = b; i < e; ++i) pgi[i] = pg[i] * pw[i] * Math::dterm(px[i], pt[i]);
        } else {
          for (int64_t i = b; i < e; ++i) pgi[i] = pg[i] * Math::dterm(px[i], pt[i]);
        }
      });
      return;
    }
    if (n == 0) return;
    double g = static_cast<double>(pg[0]);
    if (reduction == 1) g /= mean_denominator(pw, n, mean_over);
    const scalar_t gs = static_cast<scalar_t>(g);
    at::parallel_for(0, n, kElementwiseGrain, [&](int64_t b, int64_t e) {
      if (pw) {
        for (int64_t i = b; i < e; ++i) pgi[i] = gs * pw[i] * Math::dterm(px[i], pt[i]);
      } else {
        for (int64_t i = b; i < e; ++i) pgi[i] = gs * Math::dterm(px[i], pt[i]);
      }
    });
  });
  return grad_input;
}

Tensor mse_loss_cpu(const Tensor& input, const Tensor& target, const OptTensor& weight,
                    int64_t reduction) {
  check_pointwise_loss<int64_t>(input, target, weight, reduction, "mse_loss");
  return pointwise_loss<MseMath>(input, target, weight, reduction, MeanOver::WeightSum,
                                 "mse_loss");
}
Tensor mse_loss_backward_cpu(const Tensor& grad_output, const Tensor& input, const Tensor& target,
                             const OptTensor& weight, int64_t reduction) {
  check_pointwise_loss_backward<int64_t>(grad_output, input, target, weight, reduction,
                                         "mse_loss_backward");
  return pointwise_loss_backward<MseMath>(grad_output, input, target, weight, reduction,
                                          MeanOver::WeightSum, "mse_loss_backward");
}

// binary_cross_entropy's domain, checked as torch does on CPU: input and target in [0, 1] (NaN
// fails too). A separate pass (reads 8 B per float32 element) costs little beside two logs per
// element, and keeps the error out of the parallel loop. The message names the first bad element.
void check_bce_domain(const Tensor& x, const Tensor& t) {
  dispatch_floating(x.scalar_type(), "binary_cross_entropy", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    auto outside = [](scalar_t v) { return !(v >= scalar_t(0) && v <= scalar_t(1)); };
    const auto bad = deterministic_sum<2>(
        n, kSumChunk, kElementwiseGrain / kSumChunk,
        [&](int64_t b, int64_t e, std::array<double, 2>& acc) {
          int64_t bad_x = 0, bad_t = 0;
          for (int64_t i = b; i < e; ++i) {
            bad_x += outside(px[i]);
            bad_t += outside(pt[i]);
          }
          acc[0] += static_cast<double>(bad_x);
          acc[1] += static_cast<double>(bad_t);
        });
    const char* names[2] = {"input", "target"};
    const scalar_t* data[2] = {px, pt};
    for (int k = 0; k < 2; ++k) {
      if (bad[k] == 0) continue;
      int64_t i = 0;
      while (i < n && !outside(data[k][i])) ++i;
      TORCH_CHECK(false, "pyengine.binary_cross_entropy: all elements of ", names[k],
                  " should be between 0 and 1, but got ", names[k], " element ",
                  static_cast<double>(data[k][i]), " at flat index ", i, " (",
                  static_cast<int64_t>(bad[k]), " element(s) outside [0, 1])");
    }
  });
}

Tensor binary_cross_entropy_cpu(const Tensor& input, const Tensor& target,
                                const OptTensor& weight, int64_t reduction) {
  check_pointwise_loss<int64_t>(input, target, weight, reduction, "binary_cross_entropy");
  check_bce_domain(input.contiguous(), target.contiguous());
  return pointwise_loss<BceMath>(input, target, weight, reduction, MeanOver::Numel,
                                 "binary_cross_entropy");
}
// Like torch's, the backward pass does not re-check the domain: it is a formula of (p, y).
Tensor binary_cross_entropy_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                         const Tensor& target, const OptTensor& weight,
                                         int64_t reduction) {
  check_pointwise_loss_backward<int64_t>(grad_output, input, target, weight, reduction,
                                         "binary_cross_entropy_backward");
  return pointwise_loss_backward<BceMath>(grad_output, input, target, weight, reduction,
                                          MeanOver::Numel, "binary_cross_entropy_backward");
}

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

// log-softmax of row xr at class t, accumulated in double.
template <typename scalar_t>
inline double row_log_prob(const scalar_t* xr, int64_t classes, int64_t t) {
  scalar_t m = xr[0];
  for (int64_t j = 1; j < classes; ++j) m = xr[j] > m ? xr[j] : m;
  double s = 0;
  for (int64_t j = 0; j < classes; ++j) s += static_cast<double>(std::exp(xr[j] - m));
  return static_cast<double>(xr[t]) - static_cast<double>(m) - std::log(s);
}

// Rows per partial sum and per parallel task: about kSumChunk / kElementwiseGrain logits.
int64_t rows_per(int64_t elements, int64_t classes) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, classes));
}

// Napkin math (forward): reads the N x C logits once (a row stays in L1 between its max, exp-sum
// and gather passes) plus N targets; C exps and one log per row. Compute-bound on the exps: for
// N = 4096, C = 1000 float32 (16 MB) ~4M exps, a few ms on 2 cores against a ~0.8 ms memory floor.
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
      return -weight_i * row_log_prob(px + i * classes, classes, c);
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
// L1. Compute-bound on the exps, like the forward.
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
        scalar_t m = xr[0];
        for (int64_t j = 1; j < classes; ++j) m = xr[j] > m ? xr[j] : m;
        double sum = 0;
        for (int64_t j = 0; j < classes; ++j) {
          gr[j] = std::exp(xr[j] - m);
          sum += static_cast<double>(gr[j]);
        }
        const scalar_t as = static_cast<scalar_t>(a);
        const scalar_t scale = static_cast<scalar_t>(a / sum);
        for (int64_t j = 0; j < classes; ++j) gr[j] *= scale;
        gr[c] -= as;
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("mse_loss", mse_loss_cpu);
  m.impl("mse_loss_backward", mse_loss_backward_cpu);
  m.impl("binary_cross_entropy", binary_cross_entropy_cpu);
  m.impl("binary_cross_entropy_backward", binary_cross_entropy_backward_cpu);
  m.impl("cross_entropy", cross_entropy_cpu);
  m.impl("cross_entropy_backward", cross_entropy_backward_cpu);
}

}  // namespace pyengine
