// CPU kernels of softmax and log_softmax along any dim, and their backward passes from the result.
//
//   softmax:      y = exp(x - max) / sum(exp(x - max))
//   log_softmax:  y = (x - max) - log(sum(exp(x - max)))
//   softmax_backward:      gx = y * (g - sum(g * y))
//   log_softmax_backward:  gx = g - exp(y) * sum(g)
//
// Subtracting the row's max keeps exp() in (0, 1]. NaN and inf follow torch: a NaN in a row, or a
// +inf (inf - inf), or a row of only -inf (-inf - -inf) makes every output of that row NaN.
//
// Layout: the tensor is made contiguous and seen as (outer, D, inner), D the softmax dim.
//   inner == 1 (dim is the last non-trivial dim): one contiguous row of D per (outer) index.
//   inner  > 1: a block of up to kBlock consecutive inner positions is processed together, so every
//              loop runs over contiguous memory (vectorized over inner) and walks d with stride
//              `inner`: no strided gathers.
// Reductions keep a fixed number of partial sums (kLanes, or four vectors of them for softmax's
// backward sum; fixed in the source), and work is split over whole rows / blocks, so results
// are bitwise reproducible and independent of the thread count. (The AVX2 / AVX-512 builds let
// the compiler contract a*b+c into FMAs, so two levels of cpu/isa.h may differ in the last bit;
// one level never does.) Long rows stay accurate: a partial sum takes at most kCarryTerms terms,
// then is carried into a double ("Long rows" below).
//
// exp() is cpu/vec_math.h's fast_exp (fast_exp_nonpositive for x - max): branch-free, so the
// compiler vectorizes it. log() is needed once per row and comes from libm.
//
// Napkin math (reference machine: csrc/cpu/README.md). LeNet's classifier (64 x 10 fp32 logits):
// 2.5 KB in, 2.5 KB out: nothing; the call is its few microseconds of dispatch. At scale
// (256 x 1000 fp32: 1 MB in, 1 MB out) the forward reads x twice (max, then exp + sum; the second
// read hits L2), writes y and rescales it in cache: ~3 MB of traffic, ~30 us on one core at
// ~100 GB/s. exp is ~25 vector ops per 16 floats: 16k vectors x ~25 ops at ~2 per cycle (512-bit
// ops run as two 256-bit halves) is ~55 us per core, so the forward is bound by the exps. The
// backward reads g and y and writes gx once (3 MB, ~30 us). Achieved figures: the benchmark
// suite (python -m benchmarks).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "common/low_precision.h"
#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace pyengine {
namespace {

using at::Tensor;
using cpu::Family;

// Partial sums per reduction: one 64-byte vector's worth.
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);
// Inner positions processed together when dim is not the last one.
constexpr int64_t kBlock = 256;
// Terms a float partial sum takes, at most, before it is carried into a double (long rows only).
constexpr int64_t kCarryTerms = 256;
// Rows longer than this (a lane's kCarryTerms terms in every lane) take the carrying kernels.
template <typename T>
constexpr int64_t kLongRow = kCarryTerms * kLanes<T>;
// Elements per parallel task.
constexpr int64_t kGrain = 16384;


// ---- Reductions with a fixed number of partial sums -------------------------------------------

template <typename T>
PE_INLINE T tree_sum(T* acc) {
  for (int64_t w = kLanes<T> / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}
template <typename T>
PE_INLINE T tree_max(T* acc) {
  for (int64_t w = kLanes<T> / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] = acc[l + w] > acc[l] ? acc[l + w] : acc[l];
  return acc[0];
}

// Tails (the last D % L elements of a row) are reduced into a scalar kept in a register and added
// after the partial sums: updating the partial sums lane by lane (or staging the tail in a
// buffer) stores scalars that the next vector load must wait for.

// max(x[0:n]), NaNs skipped (a NaN row turns NaN through the sum anyway).
template <typename T>
PE_INLINE T row_max(const T* x, int64_t n) {
  constexpr int64_t L = kLanes<T>;
  T acc[L];
  for (int64_t l = 0; l < L; ++l) acc[l] = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  for (; i + L <= n; i += L)
    PE_LANES for (int64_t l = 0; l < L; ++l) acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
  T m = tree_max(acc);
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// ---- Forward, dim last: `rows` contiguous rows of length D --------------------------------------

// sum of exp(x[i] - m) over [0, n), kept in y (softmax) or not (kLog).
template <typename T, bool kLog>
PE_INLINE T exp_sum(const T* x, T* y, int64_t n, T m) {
  constexpr int64_t L = kLanes<T>;
  T acc[L] = {};
  T tail = 0;
  int64_t i = 0;
  if (!kLog) {
    // The terms are stored, then summed from L1 in a second loop: summed as they were stored,
    // GCC kept the partial sums in memory (a store-forwarding chain per vector; perf, 256 x 1000).
    for (int64_t j = 0; j + L <= n; j += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) y[j + l] = fast_exp_nonpositive(x[j + l] - m);
    for (; i + L <= n; i += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) acc[l] += y[i + l];
    for (; i < n; ++i) {
      const T e = fast_exp_nonpositive(x[i] - m);
      y[i] = e;
      tail += e;
    }
  } else {
    for (; i + L <= n; i += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) acc[l] += fast_exp_nonpositive(x[i + l] - m);
    for (; i < n; ++i) tail += fast_exp_nonpositive(x[i] - m);
  }
  return tree_sum(acc) + tail;
}

// y = exp(x - m) / sum  or  y = (x - m) - log(sum), given the row's sum.
template <typename T, bool kLog>
PE_INLINE void normalize_row(const T* x, T* y, int64_t D, T m, T sum) {
  if (!kLog) {
    const T inv = T(1) / sum;
    for (int64_t j = 0; j < D; ++j) y[j] *= inv;
  } else {
    const T lse = std::log(sum);
    for (int64_t j = 0; j < D; ++j) y[j] = (x[j] - m) - lse;
  }
}

template <typename T, bool kLog>
PE_INLINE void forward_rows(const T* x, T* y, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r, x += D, y += D) {
    const T m = row_max(x, D);
    normalize_row<T, kLog>(x, y, D, m, exp_sum<T, kLog>(x, y, D, m));
  }
}

// ---- Forward, dim not last: positions [0, cnt) of a block, rows `inner` apart ------------------

// s[i] += exp(x - m[i]) over the rows d in [d0, d1), kept in y (softmax) or not (kLog).
template <typename T, bool kLog>
PE_INLINE void add_exp_rows(const T* x, T* y, int64_t d0, int64_t d1, int64_t inner,
                                   int64_t cnt, const T* m, T* s) {
  for (int64_t d = d0; d < d1; ++d) {
    const T* xr = x + d * inner;
    T* yr = y + d * inner;
    if (!kLog) {
      for (int64_t i = 0; i < cnt; ++i) {
        const T e = fast_exp_nonpositive(xr[i] - m[i]);
        yr[i] = e;
        s[i] += e;
      }
    } else {
      for (int64_t i = 0; i < cnt; ++i) s[i] += fast_exp_nonpositive(xr[i] - m[i]);
    }
  }
}

template <typename T>
PE_INLINE void block_max(const T* x, int64_t D, int64_t inner, int64_t cnt, T* m) {
  for (int64_t i = 0; i < cnt; ++i) m[i] = -std::numeric_limits<T>::infinity();
  for (int64_t d = 0; d < D; ++d) {
    const T* xr = x + d * inner;
    for (int64_t i = 0; i < cnt; ++i) m[i] = xr[i] > m[i] ? xr[i] : m[i];
  }
}

// y = exp(x - m) / s  or  y = (x - m) - log(s), given the block's sums s.
template <typename T, bool kLog>
PE_INLINE void finish_block(const T* x, T* y, int64_t D, int64_t inner, int64_t cnt,
                                   const T* m, T* s) {
  if (!kLog) {
    for (int64_t i = 0; i < cnt; ++i) s[i] = T(1) / s[i];
    for (int64_t d = 0; d < D; ++d) {
      T* yr = y + d * inner;
      for (int64_t i = 0; i < cnt; ++i) yr[i] *= s[i];
    }
  } else {
    for (int64_t i = 0; i < cnt; ++i) s[i] = std::log(s[i]);
    for (int64_t d = 0; d < D; ++d) {
      const T* xr = x + d * inner;
      T* yr = y + d * inner;
      for (int64_t i = 0; i < cnt; ++i) yr[i] = (xr[i] - m[i]) - s[i];
    }
  }
}

template <typename T, bool kLog>
PE_INLINE void forward_block(const T* x, T* y, int64_t D, int64_t inner, int64_t cnt) {
  T m[kBlock], s[kBlock];
  block_max(x, D, inner, cnt, m);
  for (int64_t i = 0; i < cnt; ++i) s[i] = 0;
  add_exp_rows<T, kLog>(x, y, 0, D, inner, cnt, m, s);
  finish_block<T, kLog>(x, y, D, inner, cnt, m, s);
}

// ---- Backward, dim last -------------------------------------------------------------------------

// sum of g * y (softmax) or of g (kLog) over [0, n). softmax's products go into four vectors of
// partial sums, folded in a fixed order: with one, each vector's FMA waited for the last (4
// cycles of latency per 16 floats). 256 x 1000 float32, two threads, builds alternating in two
// sets of 5 processes (the op alternating with torch's in each): 0.99-1.02x -> 0.97-1.01x
// torch's time. log_softmax's plain adds measured 2% slower so (0.93-0.94x -> 0.95-0.97x, one
// set) and keep one vector.
template <typename T, bool kLog>
PE_INLINE T grad_sum(const T* g, const T* y, int64_t n) {
  constexpr int64_t L = kLanes<T>;
  T tail = 0;
  int64_t i = 0;
  if constexpr (kLog) {
    T acc[L] = {};
    for (; i + L <= n; i += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) acc[l] += g[i + l];
    for (; i < n; ++i) tail += g[i];
    return tree_sum(acc) + tail;
  } else {
    T acc[4][L] = {};
    for (; i + 4 * L <= n; i += 4 * L)
      for (int c = 0; c < 4; ++c)
        PE_LANES for (int64_t l = 0; l < L; ++l)
          acc[c][l] += g[i + c * L + l] * y[i + c * L + l];
    for (; i + L <= n; i += L)
      PE_LANES for (int64_t l = 0; l < L; ++l) acc[0][l] += g[i + l] * y[i + l];
    for (; i < n; ++i) tail += g[i] * y[i];
    PE_LANES for (int64_t l = 0; l < L; ++l)
      acc[0][l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    return tree_sum(acc[0]) + tail;
  }
}

// gx = y * (g - sum(g * y))  or  gx = g - exp(y) * sum(g), given the row's sum.
template <typename T, bool kLog>
PE_INLINE void finish_grad_row(const T* g, const T* y, T* gx, int64_t D, T sum) {
  if (!kLog) {
    for (int64_t j = 0; j < D; ++j) gx[j] = y[j] * (g[j] - sum);
  } else {
    // log_softmax's results are <= 0: exp without the overflow side (bitwise fast_exp's for
    // arguments <= hi) where the whole row is (any other row takes fast_exp; row_max skips
    // NaNs, which both exps pass through).
    if (!(row_max(y, D) > ExpConst<T>::hi)) {
      for (int64_t j = 0; j < D; ++j) gx[j] = g[j] - fast_exp_nonpositive(y[j]) * sum;
      return;
    }
    for (int64_t j = 0; j < D; ++j) gx[j] = g[j] - fast_exp(y[j]) * sum;
  }
}

template <typename T, bool kLog>
PE_INLINE void backward_rows(const T* g, const T* y, T* gx, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r, g += D, y += D, gx += D)
    finish_grad_row<T, kLog>(g, y, gx, D, grad_sum<T, kLog>(g, y, D));
}

// s[i] += g * y (softmax) or g (kLog) over the rows d in [d0, d1).
template <typename T, bool kLog>
PE_INLINE void add_grad_rows(const T* g, const T* y, int64_t d0, int64_t d1,
                                    int64_t inner, int64_t cnt, T* s) {
  for (int64_t d = d0; d < d1; ++d) {
    const T* gr = g + d * inner;
    const T* yr = y + d * inner;
    if (!kLog) {
      for (int64_t i = 0; i < cnt; ++i) s[i] += gr[i] * yr[i];
    } else {
      for (int64_t i = 0; i < cnt; ++i) s[i] += gr[i];
    }
  }
}

// gx from the block's sums s.
template <typename T, bool kLog>
PE_INLINE void finish_grad_block(const T* g, const T* y, T* gx, int64_t D, int64_t inner,
                                        int64_t cnt, const T* s) {
  for (int64_t d = 0; d < D; ++d) {
    const T* gr = g + d * inner;
    const T* yr = y + d * inner;
    T* gxr = gx + d * inner;
    if (!kLog) {
      for (int64_t i = 0; i < cnt; ++i) gxr[i] = yr[i] * (gr[i] - s[i]);
    } else {
      for (int64_t i = 0; i < cnt; ++i) gxr[i] = gr[i] - fast_exp(yr[i]) * s[i];
    }
  }
}

template <typename T, bool kLog>
PE_INLINE void backward_block(const T* g, const T* y, T* gx, int64_t D, int64_t inner,
                                     int64_t cnt) {
  T s[kBlock];
  for (int64_t i = 0; i < cnt; ++i) s[i] = 0;
  add_grad_rows<T, kLog>(g, y, 0, D, inner, cnt, s);
  finish_grad_block<T, kLog>(g, y, gx, D, inner, cnt, s);
}

// ---- Long rows: float partial sums carried into double ------------------------------------------
//
// A float partial sum that has grown far beyond its terms drops their low bits, then the terms
// themselves: exp() summed over a float32 row of 2^28 elements in 16 lanes (2^24 terms each) is
// off by percents (torch's too), and a row whose mass is a long tail of small terms behind a few
// large ones loses the tail already at 2^24 elements (tests/test_softmax.py). So the kernels below
// cut rows longer than kLongRow into pieces of kLongRow elements (kCarryTerms per lane), or dims
// longer than kCarryTerms into runs of kCarryTerms, sum each piece with the float kernels above
// and add the pieces in double. The error is then that of a 256-term sum, at most 256 * 2^-24 =
// 1.5e-5 relative (softmax's terms are positive), at any length, for a few adds per 4096 floats.
// Shorter rows and dims keep the kernels above unchanged, bit for bit and cycle for cycle: these
// are separate entry points, chosen by the driver.

template <typename T, bool kLog>
PE_INLINE void forward_long_rows(const T* x, T* y, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r, x += D, y += D) {
    const T m = row_max(x, D);
    double sum = 0;
    for (int64_t c = 0; c < D; c += kLongRow<T>)
      sum += static_cast<double>(
          exp_sum<T, kLog>(x + c, y + c, std::min(kLongRow<T>, D - c), m));
    normalize_row<T, kLog>(x, y, D, m, static_cast<T>(sum));
  }
}

template <typename T, bool kLog>
PE_INLINE void backward_long_rows(const T* g, const T* y, T* gx, int64_t rows,
                                         int64_t D) {
  for (int64_t r = 0; r < rows; ++r, g += D, y += D, gx += D) {
    double sum = 0;
    for (int64_t c = 0; c < D; c += kLongRow<T>)
      sum += static_cast<double>(grad_sum<T, kLog>(g + c, y + c, std::min(kLongRow<T>, D - c)));
    finish_grad_row<T, kLog>(g, y, gx, D, static_cast<T>(sum));
  }
}

// carried[i] += s[i], then s[i] = 0.
template <typename T>
PE_INLINE void carry(double* carried, T* s, int64_t cnt) {
  for (int64_t i = 0; i < cnt; ++i) {
    carried[i] += static_cast<double>(s[i]);
    s[i] = 0;
  }
}

template <typename T, bool kLog>
PE_INLINE void forward_long_block(const T* x, T* y, int64_t D, int64_t inner,
                                         int64_t cnt) {
  T m[kBlock], s[kBlock];
  double carried[kBlock];
  block_max(x, D, inner, cnt, m);
  for (int64_t i = 0; i < cnt; ++i) s[i] = 0, carried[i] = 0;
  for (int64_t d0 = 0; d0 < D; d0 += kCarryTerms) {
    add_exp_rows<T, kLog>(x, y, d0, std::min(D, d0 + kCarryTerms), inner, cnt, m, s);
    carry(carried, s, cnt);
  }
  for (int64_t i = 0; i < cnt; ++i) s[i] = static_cast<T>(carried[i]);
  finish_block<T, kLog>(x, y, D, inner, cnt, m, s);
}

template <typename T, bool kLog>
PE_INLINE void backward_long_block(const T* g, const T* y, T* gx, int64_t D,
                                          int64_t inner, int64_t cnt) {
  T s[kBlock];
  double carried[kBlock];
  for (int64_t i = 0; i < cnt; ++i) s[i] = 0, carried[i] = 0;
  for (int64_t d0 = 0; d0 < D; d0 += kCarryTerms) {
    add_grad_rows<T, kLog>(g, y, d0, std::min(D, d0 + kCarryTerms), inner, cnt, s);
    carry(carried, s, cnt);
  }
  for (int64_t i = 0; i < cnt; ++i) s[i] = static_cast<T>(carried[i]);
  finish_grad_block<T, kLog>(g, y, gx, D, inner, cnt, s);
}

// ---- Entry points, built for every level (cpu/isa.h) -----------------------------------------

#define PE_SOFTMAX_ENTRY(T, LOG, tag)                                                          \
  PE_ISA_FUNCTION(Family::Softmax, void, forward_rows_##tag,                                 \
                  (const T* x, T* y, int64_t rows, int64_t D), (x, y, rows, D),              \
                  forward_rows<T, LOG>)                                                      \
  PE_ISA_FUNCTION(Family::Softmax, void, forward_block_##tag,                                \
                  (const T* x, T* y, int64_t D, int64_t inner, int64_t cnt),                 \
                  (x, y, D, inner, cnt), forward_block<T, LOG>)                              \
  PE_ISA_FUNCTION(Family::Softmax, void, backward_rows_##tag,                                \
                  (const T* g, const T* y, T* gx, int64_t rows, int64_t D),                  \
                  (g, y, gx, rows, D), backward_rows<T, LOG>)                                \
  PE_ISA_FUNCTION(Family::Softmax, void, backward_block_##tag,                               \
                  (const T* g, const T* y, T* gx, int64_t D, int64_t inner, int64_t cnt),    \
                  (g, y, gx, D, inner, cnt), backward_block<T, LOG>)                         \
  PE_ISA_FUNCTION(Family::Softmax, void, forward_long_rows_##tag,                            \
                  (const T* x, T* y, int64_t rows, int64_t D), (x, y, rows, D),              \
                  forward_long_rows<T, LOG>)                                                 \
  PE_ISA_FUNCTION(Family::Softmax, void, forward_long_block_##tag,                           \
                  (const T* x, T* y, int64_t D, int64_t inner, int64_t cnt),                 \
                  (x, y, D, inner, cnt), forward_long_block<T, LOG>)                         \
  PE_ISA_FUNCTION(Family::Softmax, void, backward_long_rows_##tag,                           \
                  (const T* g, const T* y, T* gx, int64_t rows, int64_t D),                  \
                  (g, y, gx, rows, D), backward_long_rows<T, LOG>)                           \
  PE_ISA_FUNCTION(Family::Softmax, void, backward_long_block_##tag,                          \
                  (const T* g, const T* y, T* gx, int64_t D, int64_t inner, int64_t cnt),    \
                  (g, y, gx, D, inner, cnt), backward_long_block<T, LOG>)

PE_SOFTMAX_ENTRY(float, false, f32)
PE_SOFTMAX_ENTRY(double, false, f64)
PE_SOFTMAX_ENTRY(float, true, f32_log)
PE_SOFTMAX_ENTRY(double, true, f64_log)
#undef PE_SOFTMAX_ENTRY

template <typename T, bool kLog>
struct Kernels;
#define PE_KERNELS(T, LOG, tag)                                                                \
  template <>                                                                                \
  struct Kernels<T, LOG> {                                                                   \
    static void fwd_rows(const T* x, T* y, int64_t rows, int64_t D) {                        \
      if (D > kLongRow<T>) return forward_long_rows_##tag(x, y, rows, D);                    \
      forward_rows_##tag(x, y, rows, D);                                                     \
    }                                                                                        \
    static void fwd_block(const T* x, T* y, int64_t D, int64_t inner, int64_t cnt) {         \
      if (D > kCarryTerms) return forward_long_block_##tag(x, y, D, inner, cnt);             \
      forward_block_##tag(x, y, D, inner, cnt);                                              \
    }                                                                                        \
    static void bwd_rows(const T* g, const T* y, T* gx, int64_t rows, int64_t D) {           \
      if (D > kLongRow<T>) return backward_long_rows_##tag(g, y, gx, rows, D);               \
      backward_rows_##tag(g, y, gx, rows, D);                                                \
    }                                                                                        \
    static void bwd_block(const T* g, const T* y, T* gx, int64_t D, int64_t inner,           \
                          int64_t cnt) {                                                     \
      if (D > kCarryTerms) return backward_long_block_##tag(g, y, gx, D, inner, cnt);        \
      backward_block_##tag(g, y, gx, D, inner, cnt);                                         \
    }                                                                                        \
  };
PE_KERNELS(float, false, f32)
PE_KERNELS(double, false, f64)
PE_KERNELS(float, true, f32_log)
PE_KERNELS(double, true, f64_log)
#undef PE_KERNELS

// ---- Drivers ----------------------------------------------------------------------------------

struct Shape3 {
  int64_t outer = 1, D = 1, inner = 1;
};

Shape3 split_at(const Tensor& t, int64_t dim) {
  Shape3 s;
  if (t.dim() == 0) return s;  // a scalar is one row of one element
  for (int64_t i = 0; i < dim; ++i) s.outer *= t.size(i);
  s.D = t.size(dim);
  for (int64_t i = dim + 1; i < t.dim(); ++i) s.inner *= t.size(i);
  return s;
}

// Calls body(o, i0, cnt) for every block of inner positions, split over threads.
template <typename F>
void for_blocks(const Shape3& s, F body) {
  const int64_t nb = (s.inner + kBlock - 1) / kBlock;
  const int64_t per_task = std::max<int64_t>(1, s.D * std::min(s.inner, kBlock));
  at::parallel_for(0, s.outer * nb, std::max<int64_t>(1, kGrain / per_task),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin; t < end; ++t) {
                       const int64_t o = t / nb, i0 = (t % nb) * kBlock;
                       body(o, i0, std::min(kBlock, s.inner - i0));
                     }
                   });
}

template <bool kLog>
Tensor softmax_forward(const Tensor& input, int64_t dim, const char* op) {
  dim = wrap_dim(dim, input.dim(), op);
  check_floating(input, op, "input");
  const Tensor x = input.contiguous();
  Tensor y = empty_of(x.sizes(), x.options());
  const Shape3 s = split_at(x, dim);
  if (x.numel() == 0) return y;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using K = Kernels<T, kLog>;
    const T* px = x.const_data_ptr<T>();
    T* py = y.mutable_data_ptr<T>();
    if (s.inner == 1) {
      at::parallel_for(0, s.outer, std::max<int64_t>(1, kGrain / s.D),
                       [&](int64_t begin, int64_t end) {
                         K::fwd_rows(px + begin * s.D, py + begin * s.D, end - begin, s.D);
                       });
    } else {
      for_blocks(s, [&](int64_t o, int64_t i0, int64_t cnt) {
        const int64_t off = o * s.D * s.inner + i0;
        K::fwd_block(px + off, py + off, s.D, s.inner, cnt);
      });
    }
  });
  return y;
}

template <bool kLog>
Tensor softmax_backward(const Tensor& grad_output, const Tensor& result, int64_t dim,
                        const char* op) {
  dim = wrap_dim(dim, result.dim(), op);
  check_elementwise_backward<int64_t>(grad_output, result, "result", op);
  const Tensor g = grad_output.contiguous();
  const Tensor y = result.contiguous();
  Tensor gx = empty_of(g.sizes(), g.options());
  const Shape3 s = split_at(g, dim);
  if (g.numel() == 0) return gx;
  dispatch_floating(g.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using K = Kernels<T, kLog>;
    const T* pg = g.const_data_ptr<T>();
    const T* py = y.const_data_ptr<T>();
    T* pgx = gx.mutable_data_ptr<T>();
    if (s.inner == 1) {
      at::parallel_for(0, s.outer, std::max<int64_t>(1, kGrain / s.D),
                       [&](int64_t begin, int64_t end) {
                         const int64_t off = begin * s.D;
                         K::bwd_rows(pg + off, py + off, pgx + off, end - begin, s.D);
                       });
    } else {
      for_blocks(s, [&](int64_t o, int64_t i0, int64_t cnt) {
        const int64_t off = o * s.D * s.inner + i0;
        K::bwd_block(pg + off, py + off, pgx + off, s.D, s.inner, cnt);
      });
    }
  });
  return gx;
}

Tensor softmax_cpu(const Tensor& input, int64_t dim) {
  return softmax_forward<false>(input, dim, "softmax");
}
Tensor log_softmax_cpu(const Tensor& input, int64_t dim) {
  return softmax_forward<true>(input, dim, "log_softmax");
}
Tensor softmax_backward_cpu(const Tensor& grad_output, const Tensor& result, int64_t dim) {
  return softmax_backward<false>(grad_output, result, dim, "softmax_backward");
}
Tensor log_softmax_backward_cpu(const Tensor& grad_output, const Tensor& result, int64_t dim) {
  return softmax_backward<true>(grad_output, result, dim, "log_softmax_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("softmax", PE_KERNEL(softmax_cpu));
  m.impl("softmax_backward", PE_KERNEL(softmax_backward_cpu));
  m.impl("log_softmax", PE_KERNEL(log_softmax_cpu));
  m.impl("log_softmax_backward", PE_KERNEL(log_softmax_backward_cpu));
}

}  // namespace pyengine
