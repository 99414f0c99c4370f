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

#include <emmintrin.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/loops.h"
#include "cpu/reductions.h"

namespace pyengine {
namespace {

using at::Tensor;
using cpu::deterministic_sum;
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

// ---- Row kernels: max, then sum_j exp(x_j - max) (optionally stored), summed in double ------
//
// float32 rows are where cross_entropy spends its time: glibc's scalar expf costs ~3 ns, so a
// 4096 x 1000 batch took ~14 ms on one core against torch's ~2 ms (AVX2 exp). exp4_nonpos is a
// 4-wide SSE2 exp (SSE2 is x86-64's baseline: no -march flag needed) for the arguments that
// occur here, x - max <= 0: range reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor
// polynomial of e^r and 2^n from the exponent bits; at most 1.3 ulp from exp on [-87, 0]
// (checked over every float there). Below -87 it returns 0 where exp would give a denormal
// under 1.7e-38 (beside the row's max term of 1, nothing); NaN propagates. exp_nonpos is the
// same arithmetic for one float (the scalar fallback, and row tails): bitwise the same results.
// float64 rows use std::exp: that is the accuracy path.

inline float exp_nonpos(float x) {
  const float xc = x >= -87.0f ? x : -87.0f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  if (x != x) return x;
  return x >= -87.0f ? p * scale : 0.0f;
}

#if defined(__SSE2__)
inline __m128 exp4_nonpos(__m128 x) {
  const __m128 lo = _mm_set1_ps(-87.0f);
  const __m128 magic = _mm_set1_ps(12582912.0f);
  const __m128 in_range = _mm_cmpge_ps(x, lo);  // false for NaN and below -87
  const __m128 is_nan = _mm_cmpunord_ps(x, x);
  const __m128 xc = _mm_max_ps(x, lo);  // lo for NaN too (maxps returns its 2nd operand)
  const __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(xc, _mm_set1_ps(1.44269504088896341f)),
                                         magic), magic);
  const __m128 r = _mm_sub_ps(_mm_sub_ps(xc, _mm_mul_ps(n, _mm_set1_ps(0.693145751953125f))),
                              _mm_mul_ps(n, _mm_set1_ps(1.428606765330187045e-06f)));
  __m128 p = _mm_set1_ps(1.0f / 5040);
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 720));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 120));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 24));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f / 6));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(0.5f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.0f));
  const __m128i bits =
      _mm_slli_epi32(_mm_add_epi32(_mm_cvttps_epi32(n), _mm_set1_epi32(127)), 23);
  const __m128 res = _mm_and_ps(_mm_mul_ps(p, _mm_castsi128_ps(bits)), in_range);
  return _mm_or_ps(res, _mm_and_ps(x, is_nan));
}
#endif

// max_j x_j, NaN skipped (a NaN makes the row NaN through its exp anyway); -inf for an empty row.
template <typename T>
inline T row_max(const T* x, int64_t classes) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < classes; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// sum_j exp(x_j - m) in double; the terms are also written to out[j] when out is not null.
inline double row_exp_sum(const double* x, double m, int64_t classes, double* out) {
  double s = 0;
  for (int64_t j = 0; j < classes; ++j) {
    const double e = std::exp(x[j] - m);
    if (out) out[j] = e;
    s += e;
  }
  return s;
}

inline float row_max(const float* x, int64_t classes) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
#if defined(__SSE2__)
  // two independent accumulators hide maxps' latency; NaN is skipped (maxps's 2nd operand)
  __m128 m0 = _mm_set1_ps(m), m1 = m0;
  for (; j + 8 <= classes; j += 8) {
    m0 = _mm_max_ps(_mm_loadu_ps(x + j), m0);
    m1 = _mm_max_ps(_mm_loadu_ps(x + j + 4), m1);
  }
  if (j + 4 <= classes) {
    m0 = _mm_max_ps(_mm_loadu_ps(x + j), m0);
    j += 4;
  }
  alignas(16) float lanes[8];
  _mm_store_ps(lanes, m0);
  _mm_store_ps(lanes + 4, m1);
  for (float v : lanes) m = v > m ? v : m;
#endif
  for (; j < classes; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

inline double row_exp_sum(const float* x, float m, int64_t classes, float* out) {
  int64_t j = 0;
  double s = 0;
#if defined(__SSE2__)
  // eight double lanes in a fixed layout (the order of the additions depends on C only); two
  // exps per iteration keep both dependency chains busy
  __m128d acc[4] = {_mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd()};
  const __m128 mv = _mm_set1_ps(m);
  for (; j + 8 <= classes; j += 8) {
    const __m128 e0 = exp4_nonpos(_mm_sub_ps(_mm_loadu_ps(x + j), mv));
    const __m128 e1 = exp4_nonpos(_mm_sub_ps(_mm_loadu_ps(x + j + 4), mv));
    if (out) {
      _mm_storeu_ps(out + j, e0);
      _mm_storeu_ps(out + j + 4, e1);
    }
    acc[0] = _mm_add_pd(acc[0], _mm_cvtps_pd(e0));
    acc[1] = _mm_add_pd(acc[1], _mm_cvtps_pd(_mm_movehl_ps(e0, e0)));
    acc[2] = _mm_add_pd(acc[2], _mm_cvtps_pd(e1));
    acc[3] = _mm_add_pd(acc[3], _mm_cvtps_pd(_mm_movehl_ps(e1, e1)));
  }
  if (j + 4 <= classes) {
    const __m128 e0 = exp4_nonpos(_mm_sub_ps(_mm_loadu_ps(x + j), mv));
    if (out) _mm_storeu_ps(out + j, e0);
    acc[0] = _mm_add_pd(acc[0], _mm_cvtps_pd(e0));
    acc[1] = _mm_add_pd(acc[1], _mm_cvtps_pd(_mm_movehl_ps(e0, e0)));
    j += 4;
  }
  alignas(16) double lanes[8];
  for (int k = 0; k < 4; ++k) _mm_store_pd(lanes + 2 * k, acc[k]);
  s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
      ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#endif
  for (; j < classes; ++j) {
    const float e = exp_nonpos(x[j] - m);
    if (out) out[j] = e;
    s += static_cast<double>(e);
  }
  return s;
}

// log-softmax of row xr at class t.
template <typename scalar_t>
inline double row_log_prob(const scalar_t* xr, int64_t classes, int64_t t) {
  const scalar_t m = row_max(xr, classes);
  const double s = row_exp_sum(xr, m, classes, static_cast<scalar_t*>(nullptr));
  return static_cast<double>(xr[t]) - static_cast<double>(m) - std::log(s);
}

// Rows per partial sum and per parallel task: about kSumChunk / kElementwiseGrain logits.
int64_t rows_per(int64_t elements, int64_t classes) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, classes));
}

// Napkin math (forward): reads the N x C logits once (a row stays in L1 between its max, exp-sum
// and gather passes) plus N targets; C exps and one log per row. Compute-bound on the exps: for
// N = 4096, C = 1000 float32 (16 MB, a ~0.8 ms floor at ~20 GB/s) ~4M exps. Measured on one
// core: 5.6 ms (torch 2.13: 2.0 ms with AVX2 exps; 8-wide AVX2 via run-time dispatch is the
// next step); the tutorial case N = 8192, C = 10 takes 0.26 ms (torch 0.86 ms), N = 64 4 us.
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
// L1. Compute-bound on the exps, like the forward: measured on one core, 5.8 ms for the
// 4096 x 1000 float32 batch, 0.24 ms for 8192 x 10.
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
        const double sum = row_exp_sum(xr, row_max(xr, classes), classes, gr);
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
  m.impl("cross_entropy", cross_entropy_cpu);
  m.impl("cross_entropy_backward", cross_entropy_backward_cpu);
}

}  // namespace pyengine
