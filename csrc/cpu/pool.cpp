// CPU kernels of max_pool2d (inference, no indices), max_pool2d_with_indices and
// max_pool2d_backward.
//
// Semantics (torch's CPU kernel, bit for bit): each window is scanned row by row, left to right,
// over its in-bounds taps only (padding cells never win); a tap replaces the running maximum when
// `val > max || isnan(val)`, starting from max = -inf with the index of the window's first
// in-bounds tap. So ties keep the FIRST maximum and a NaN wins (the last NaN of the window).
// Indices are flat positions inside each H*W input plane.
//
// Layout: the input is made contiguous NCHW first (channels_last or strided inputs pay one copy);
// the kernels write contiguous NCHW results, copied into channels_last when the input is
// channels_last, as torch's are (common/layout.h; the copies: cpu/image_layout.h). Work is split
// over (plane, output row) for the forward and over planes for the backward, so every output
// element is computed by exactly one thread in a fixed order: results do not depend on the
// thread count.
//
// Napkin math, LeNet pool1 (fp32, batch 64: 64x6x28x28 -> 64x6x14x14, kernel 2, stride 2):
//   forward (values only):  reads 1.20 MB, writes 0.30 MB                          = 1.5 MB
//   forward with indices:   + 0.60 MB of int64 indices                             = 2.1 MB
//   backward:               reads 0.30 MB grad_output + 0.60 MB indices, writes
//                           1.20 MB grad_input                                     = 2.1 MB
//   75k windows x 3 compares is no work at all: the op is memory-bound. It all fits in L2 + L3;
//   at ~100 GB/s per core in L2 (reference machine: csrc/cpu/README.md) the floor is ~15 us for
//   the forward and ~20 us for either pass with indices, on one core. Achieved figures: the
//   benchmark suite (python -m benchmarks).
//
// Hot loops: the interior of each output row (windows with every column in bounds) runs an
// AVX-512 kernel for stride_w 1 or 2 (kernel 3 / stride 1 or 2 and the like) and a dedicated one
// for 2x2 / stride 2, chosen at run time (cpu/isa.h); the backward of 2x2 / stride 2 gathers
// instead of scattering. Everything else, and the AVX2 and baseline levels, use the scalar loops
// (2x2 / stride 2 a dedicated one).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "common/low_precision.h"
#include "cpu/image_layout.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace pyengine {
namespace {

using at::IntArrayRef;
using at::Tensor;

using Geometry = Pool2dGeometry<int64_t>;

// ---- Scalar forward: any geometry -----------------------------------------------------------

// Output columns [ow_begin, ow_end) of output row `oh` of one plane.
template <typename T, bool kIdx>
void pool_row_scalar(const T* plane, T* out, int64_t* idx, const Geometry& g, int64_t oh,
                     int64_t ow_begin, int64_t ow_end) {
  const int64_t hs = oh * g.stride_h - g.padding_h;
  const int64_t ih1 = std::min(hs + g.effective_kernel_h(), g.in_h);
  const int64_t ih0 = first_tap(hs, g.dilation_h);
  for (int64_t ow = ow_begin; ow < ow_end; ++ow) {
    const int64_t ws = ow * g.stride_w - g.padding_w;
    const int64_t iw1 = std::min(ws + g.effective_kernel_w(), g.in_w);
    const int64_t iw0 = first_tap(ws, g.dilation_w);
    T m = -std::numeric_limits<T>::infinity();
    int64_t mi = ih0 * g.in_w + iw0;  // torch's index, even for a window with no in-bounds tap
    for (int64_t ih = ih0; ih < ih1; ih += g.dilation_h) {
      const T* row = plane + ih * g.in_w;
      for (int64_t iw = iw0; iw < iw1; iw += g.dilation_w) {
        const T v = row[iw];
        const bool take = (v > m) | (v != v);  // branch-free: random data mispredicts
        m = take ? v : m;
        if (kIdx) mi = take ? ih * g.in_w + iw : mi;
      }
    }
    out[ow] = m;
    if (kIdx) idx[ow] = mi;
  }
}

// Output rows [r_begin, r_end) of the flattened (plane, output row) range, scalar.
template <typename T, bool kIdx>
void pool_rows_scalar(const T* in, T* out, int64_t* idx, const Geometry& g, int64_t r_begin,
                      int64_t r_end) {
  int64_t p = r_begin / g.out_h, oh = r_begin % g.out_h;
  for (int64_t r = r_begin; r < r_end; ++r) {
    pool_row_scalar<T, kIdx>(in + p * g.in_pixels(), out + r * g.out_w,
                             kIdx ? idx + r * g.out_w : nullptr, g, oh, 0, g.out_w);
    if (++oh == g.out_h) oh = 0, ++p;
  }
}

// ---- The tutorial case below AVX-512: 2x2 windows, stride 2, whole windows ---------------
// (Geometry::is_2x2_stride_2.) The four taps of each window folded with the rule above, in scan
// order: the first tap opens the window (for -inf the running maximum stays -inf with the first
// tap's index, as the general loop leaves it), then each later tap replaces it when
// `v > max || isnan(v)`. float32 runs kLanes windows per vector (AVX2 8, SSE2 4): each row's
// even and odd columns are split by two shuffles, the folds are lane-wise selects, and the
// indices are computed in int32 lanes (planes < 2^31 elements: pick_kernel) and widened as they
// are stored. A row whose width is not a multiple of kLanes ends with a vector that overlaps the
// one before (its shared windows come out the same from both: same taps, same folds); a row
// narrower than kLanes but at least half of it runs on half-width vectors (LeNet's conv2 block:
// 5 windows a row on AVX2), narrower ones window by window. The general loop compiled to
// branches on those compares: on an AVX2 machine, where it ran every pooling, it took 27% of
// LeNet's fused conv1 block at batch 256 (random data mispredicts); windows past the last whole
// vector, and the indices, taken lane by lane, left it at 33% (one thread).
template <typename T, bool kIdx>
PE_INLINE void pool2x2_window(const T* r0, const T* r1, int64_t base, int64_t W, int64_t ow,
                              T* out, int64_t* idx) {
  const int64_t c = 2 * ow;
  T m = r0[c];
  int64_t mi = base + c;
  const T taps[3] = {r0[c + 1], r1[c], r1[c + 1]};
  const int64_t at[3] = {base + c + 1, base + W + c, base + W + c + 1};
  for (int t = 0; t < 3; ++t) {
    const bool take = (taps[t] > m) | (taps[t] != taps[t]);
    m = take ? taps[t] : m;
    if (kIdx) mi = take ? at[t] : mi;
  }
  out[ow] = m;
  if (kIdx) idx[ow] = mi;
}

// Lanes 2l (+ 1) of the pair (a, b): a row's even (odd) columns.
template <class V, class I, size_t... L>
PE_INLINE V columns(V a, V b, int odd, std::index_sequence<L...>) {
  return odd ? __builtin_shuffle(a, b, I{(2 * int(L) + 1)...})
             : __builtin_shuffle(a, b, I{(2 * int(L))...});
}

// The int32 lanes of `v` as int64 at dst (unaligned), in two halves of one vector's width each.
// (The element types are spelled through I: GCC 12 takes a vector typedef whose only dependent
// part is its size for a scalar inside templates.)
template <int kLanes, class I, size_t... L>
PE_INLINE void store_widened(int64_t* dst, I v, std::index_sequence<L...>) {
  typedef decltype(v[0] + 0) i32;
  typedef decltype(int64_t{} + v[0]) i64;
  typedef i32 half __attribute__((vector_size(kLanes * 2)));
  typedef i64 wide __attribute__((vector_size(kLanes * 4)));
  typedef i64 uwide __attribute__((vector_size(kLanes * 4), aligned(8), may_alias));
  const half lo = __builtin_shufflevector(v, v, L...);
  const half hi = __builtin_shufflevector(v, v, (L + kLanes / 2)...);
  *reinterpret_cast<uwide*>(dst) = __builtin_convertvector(lo, wide);
  *reinterpret_cast<uwide*>(dst + kLanes / 2) = __builtin_convertvector(hi, wide);
}

// The kLanes float32 windows from column ow0 of one output row (rows r0, r1 of the input plane,
// whose first element has flat index `base`).
template <bool kIdx, int kLanes, typename F = float>  // (F: float, dependent, as above)
PE_INLINE void pool2x2_vector(const F* r0, const F* r1, int64_t base, int64_t W, int64_t ow0,
                              F* orow, int64_t* irow) {
  typedef F fv __attribute__((vector_size(kLanes * 4)));
  typedef F ufv __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));
  typedef decltype(fv{} < fv{}) iv;  // int32 lanes
  const auto lanes = std::make_index_sequence<kLanes>();
  const F* t0 = r0 + 2 * ow0;
  const F* t1 = r1 + 2 * ow0;
  const fv lo0 = *reinterpret_cast<const ufv*>(t0);
  const fv hi0 = *reinterpret_cast<const ufv*>(t0 + kLanes);
  const fv lo1 = *reinterpret_cast<const ufv*>(t1);
  const fv hi1 = *reinterpret_cast<const ufv*>(t1 + kLanes);
  fv m = columns<fv, iv>(lo0, hi0, 0, lanes);
  iv at = iv{};  // offset of the winning tap from the window's top-left one
  const int32_t offsets[3] = {1, static_cast<int32_t>(W), static_cast<int32_t>(W + 1)};
  const fv taps[3] = {columns<fv, iv>(lo0, hi0, 1, lanes), columns<fv, iv>(lo1, hi1, 0, lanes),
                      columns<fv, iv>(lo1, hi1, 1, lanes)};
  for (int t = 0; t < 3; ++t) {
    const iv take = (taps[t] > m) | (taps[t] != taps[t]);
    m = take ? taps[t] : m;
    if (kIdx) at = take ? iv{} + offsets[t] : at;
  }
  *reinterpret_cast<ufv*>(orow + ow0) = m;
  if (kIdx) {
    iv even{};  // 2 * lane: the windows' top-left columns, relative to ow0's
    for (int l = 0; l < kLanes; ++l) even[l] = 2 * l;
    const iv flat = at + even + static_cast<int32_t>(base + 2 * ow0);
    store_widened<kLanes>(irow + ow0, flat, std::make_index_sequence<kLanes / 2>());
  }
}

// Windows [0, OW) of one output row in vectors of kLanes (OW >= kLanes), the last one
// overlapping the one before where OW is not a multiple of kLanes.
template <bool kIdx, int kLanes>
PE_INLINE void pool2x2_row_vectors(const float* r0, const float* r1, int64_t base, int64_t W,
                                   int64_t OW, float* orow, int64_t* irow) {
  int64_t ow0 = 0;
  for (; ow0 + kLanes <= OW; ow0 += kLanes)
    pool2x2_vector<kIdx, kLanes>(r0, r1, base, W, ow0, orow, irow);
  if (ow0 < OW) pool2x2_vector<kIdx, kLanes>(r0, r1, base, W, OW - kLanes, orow, irow);
}

template <typename T, bool kIdx, int kLanes>
PE_INLINE void pool2x2_rows_impl(const T* in, T* out, int64_t* idx, const Geometry& g,
                                 int64_t r_begin, int64_t r_end) {
  const int64_t W = g.in_w, OW = g.out_w;
  int64_t p = r_begin / g.out_h, oh = r_begin % g.out_h;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* r0 = in + p * g.in_pixels() + 2 * oh * W;
    const T* r1 = r0 + W;
    const int64_t base = 2 * oh * W;  // flat index of the row pair's first element
    T* orow = out + r * OW;
    int64_t* irow = kIdx ? idx + r * OW : nullptr;
    if constexpr (std::is_same_v<T, float>) {
      if (OW >= kLanes) {
        pool2x2_row_vectors<kIdx, kLanes>(r0, r1, base, W, OW, orow, irow);
      } else if (kLanes >= 8 && OW >= kLanes / 2) {
        pool2x2_row_vectors<kIdx, (kLanes >= 8 ? kLanes / 2 : kLanes)>(r0, r1, base, W, OW,
                                                                       orow, irow);
      } else {
        for (int64_t ow = 0; ow < OW; ++ow)
          pool2x2_window<T, kIdx>(r0, r1, base, W, ow, orow, irow);
      }
    } else {
      for (int64_t ow = 0; ow < OW; ++ow)
        pool2x2_window<T, kIdx>(r0, r1, base, W, ow, orow, irow);
    }
    if (++oh == g.out_h) oh = 0, ++p;
  }
}

#define PE_DEFINE_POOL2X2(T, kIdx, name)                                                       \
  PE_ISA_FUNCTION_PER_LEVEL(Family::MaxPool2d, void, name,                                     \
                            (const T* in, T* out, int64_t* idx, const Geometry& g,             \
                             int64_t r_begin, int64_t r_end),                                  \
                            (in, out, idx, g, r_begin, r_end),                                 \
                            (pool2x2_rows_impl<T, kIdx, 16>), (pool2x2_rows_impl<T, kIdx, 8>), \
                            (pool2x2_rows_impl<T, kIdx, 4>))
PE_DEFINE_POOL2X2(float, true, pool2x2_rows_with_indices)
PE_DEFINE_POOL2X2(float, false, pool2x2_rows_values)
PE_DEFINE_POOL2X2(double, true, pool2x2_rows_with_indices)
PE_DEFINE_POOL2X2(double, false, pool2x2_rows_values)
#undef PE_DEFINE_POOL2X2

template <typename T, bool kIdx>
constexpr auto pool2x2_rows() {
  void (*fn)(const T*, T*, int64_t*, const Geometry&, int64_t, int64_t);
  if constexpr (kIdx) fn = pool2x2_rows_with_indices;
  else fn = pool2x2_rows_values;
  return fn;
}

// ---- AVX-512 forward: interior columns, stride_w 1 or 2 -------------------------------------
//
// 16 (fp32) or 8 (fp64) output columns per vector. For each in-bounds row of the window the lanes
// load their taps in order (stride 2: two loads, then the even or odd lanes via one permute; with
// dilation 1 one load pair serves two taps) and fold them with torch's rule; the row's winner is
// then folded into the window's. This tree gives torch's answer because the fold picks the
// maximum of a total order (NaNs above numbers, later NaN above earlier, larger number above
// smaller, earlier above later among equal numbers) as long as every fold sees the earlier taps
// on its left. Masked loads and stores cover a row's tail without touching memory outside it.
// Indices are int32 lanes for fp32 (planes < 2^31 elements, checked by the caller), widened when
// stored; int64 lanes for fp64.

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm*_undefined_* helpers
// (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define PE_AVX512_INLINE PE_TARGET_AVX512 PE_INLINE

// Whether this process runs the AVX-512 kernels (cpu/isa.h: max_pool2d has no AVX2 build).
bool use_avx512() {
  static const bool yes = cpu::isa_for(cpu::Family::MaxPool2d) == cpu::Isa::Avx512;
  return yes;
}

struct F32x16 {
  using T = float;
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t L = 16;
  static PE_AVX512_INLINE M lanes(int64_t n) {
    return n >= 16 ? M(0xFFFF) : M((1u << (n < 0 ? 0 : n)) - 1u);
  }
  static PE_AVX512_INLINE V load(M k, const T* p) { return _mm512_maskz_loadu_ps(k, p); }
  static PE_AVX512_INLINE V even(V lo, V hi) {
    const __m512i sel = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutex2var_ps(lo, sel, hi);
  }
  static PE_AVX512_INLINE V odd(V lo, V hi) {
    const __m512i sel = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_permutex2var_ps(lo, sel, hi);
  }
  // Lanes where `v` (later taps) beats `m` (earlier taps) by torch's rule.
  static PE_AVX512_INLINE M wins(V v, V m) {
    return _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  static PE_AVX512_INLINE V blend(M k, V a, V b) { return _mm512_mask_mov_ps(a, k, b); }
  static PE_AVX512_INLINE __m512i iblend(M k, __m512i a, __m512i b) {
    return _mm512_mask_mov_epi32(a, k, b);
  }
  // Lane i's flat index: base + i * step.
  static PE_AVX512_INLINE __m512i lane_steps(int64_t step) {
    return _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int32_t>(step)));
  }
  static PE_AVX512_INLINE __m512i index(__m512i steps, int64_t base) {
    return _mm512_add_epi32(steps, _mm512_set1_epi32(static_cast<int32_t>(base)));
  }
  static PE_AVX512_INLINE void store(T* p, M k, V v) { _mm512_mask_storeu_ps(p, k, v); }
  static PE_AVX512_INLINE void store_index(int64_t* p, M k, __m512i i) {
    _mm512_mask_storeu_epi64(p, static_cast<__mmask8>(k & 0xFF),
                             _mm512_cvtepi32_epi64(_mm512_castsi512_si256(i)));
    _mm512_mask_storeu_epi64(p + 8, static_cast<__mmask8>(k >> 8),
                             _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(i, 1)));
  }
  // Backward: 0 + v where k, else 0 (bit for bit what scattering into zeros gives, -0 included).
  static PE_AVX512_INLINE V add_to_zero(M k, V v) {
    return _mm512_maskz_add_ps(k, _mm512_setzero_ps(), v);
  }
  // The 2L values e0 o0 e1 o1 ... as two vectors.
  static PE_AVX512_INLINE V interleave_lo(V e, V o) {
    return _mm512_permutex2var_ps(
        e, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), o);
  }
  static PE_AVX512_INLINE V interleave_hi(V e, V o) {
    return _mm512_permutex2var_ps(
        e, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), o);
  }
  // Lanes (of k) whose index ip[lane] equals first + 2 * lane + delta, for the four deltas.
  // The offsets are narrowed to int32 (saturating, so a far-off index cannot alias a tap).
  static PE_AVX512_INLINE void match4(const int64_t* ip, M k, int64_t first, const int64_t* delta,
                                      M* out) {
    const __m512i e_lo = _mm512_add_epi64(_mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14),
                                          _mm512_set1_epi64(first));
    const __m512i e_hi = _mm512_add_epi64(e_lo, _mm512_set1_epi64(16));
    const __m512i d_lo = _mm512_sub_epi64(
        _mm512_maskz_loadu_epi64(static_cast<__mmask8>(k & 0xFF), ip), e_lo);
    const __m512i d_hi = _mm512_sub_epi64(
        _mm512_maskz_loadu_epi64(static_cast<__mmask8>(k >> 8), ip + 8), e_hi);
    const __m512i d = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi64_epi32(d_lo)),
                                         _mm512_cvtsepi64_epi32(d_hi), 1);
    for (int t = 0; t < 4; ++t)
      out[t] = _mm512_mask_cmpeq_epi32_mask(k, d, _mm512_set1_epi32(static_cast<int32_t>(delta[t])));
  }
};

struct F64x8 {
  using T = double;
  using V = __m512d;
  using M = __mmask8;
  static constexpr int64_t L = 8;
  static PE_AVX512_INLINE M lanes(int64_t n) {
    return n >= 8 ? M(0xFF) : M((1u << (n < 0 ? 0 : n)) - 1u);
  }
  static PE_AVX512_INLINE V load(M k, const T* p) { return _mm512_maskz_loadu_pd(k, p); }
  static PE_AVX512_INLINE V even(V lo, V hi) {
    return _mm512_permutex2var_pd(lo, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), hi);
  }
  static PE_AVX512_INLINE V odd(V lo, V hi) {
    return _mm512_permutex2var_pd(lo, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), hi);
  }
  static PE_AVX512_INLINE M wins(V v, V m) {
    return _mm512_cmp_pd_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q);
  }
  static PE_AVX512_INLINE V blend(M k, V a, V b) { return _mm512_mask_mov_pd(a, k, b); }
  static PE_AVX512_INLINE __m512i iblend(M k, __m512i a, __m512i b) {
    return _mm512_mask_mov_epi64(a, k, b);
  }
  static PE_AVX512_INLINE __m512i lane_steps(int64_t step) {
    return _mm512_setr_epi64(0, step, 2 * step, 3 * step, 4 * step, 5 * step, 6 * step,
                             7 * step);
  }
  static PE_AVX512_INLINE __m512i index(__m512i steps, int64_t base) {
    return _mm512_add_epi64(steps, _mm512_set1_epi64(base));
  }
  static PE_AVX512_INLINE void store(T* p, M k, V v) { _mm512_mask_storeu_pd(p, k, v); }
  static PE_AVX512_INLINE void store_index(int64_t* p, M k, __m512i i) {
    _mm512_mask_storeu_epi64(p, k, i);
  }
  static PE_AVX512_INLINE V add_to_zero(M k, V v) {
    return _mm512_maskz_add_pd(k, _mm512_setzero_pd(), v);
  }
  static PE_AVX512_INLINE V interleave_lo(V e, V o) {
    return _mm512_permutex2var_pd(e, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), o);
  }
  static PE_AVX512_INLINE V interleave_hi(V e, V o) {
    return _mm512_permutex2var_pd(e, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), o);
  }
  static PE_AVX512_INLINE void match4(const int64_t* ip, M k, int64_t first, const int64_t* delta,
                                      M* out) {
    const __m512i e = _mm512_add_epi64(_mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14),
                                       _mm512_set1_epi64(first));
    const __m512i d = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(k, ip), e);
    for (int t = 0; t < 4; ++t)
      out[t] = _mm512_mask_cmpeq_epi64_mask(k, d, _mm512_set1_epi64(delta[t]));
  }
};

// A running maximum: values and (kIdx) their flat indices.
template <class A>
struct Best {
  typename A::V v;
  __m512i i;
};

// acc <- fold(acc, later): `later` holds taps that come after all of acc's.
template <class A, bool kIdx>
PE_AVX512_INLINE void fold(Best<A>& acc, const Best<A>& later) {
  const typename A::M k = A::wins(later.v, acc.v);
  acc.v = A::blend(k, acc.v, later.v);
  if (kIdx) acc.i = A::iblend(k, acc.i, later.i);
}

template <class A, bool kIdx>
PE_AVX512_INLINE Best<A> tap(typename A::V v, __m512i steps, int64_t base) {
  Best<A> b;
  b.v = v;
  if (kIdx) b.i = A::index(steps, base);
  return b;
}

// Window-column modes of the vector kernel.
enum ColMode { kStride1 = 0, kStride2Pairs = 1, kStride2 = 2 };

// Output rows [r_begin, r_end) of the flattened (plane, output row) range.
template <class A, bool kIdx, int kMode>
PE_TARGET_AVX512 void pool_rows_avx512(const typename A::T* in,
                                                         typename A::T* out, int64_t* idx,
                                                         const Geometry& g, int64_t r_begin,
                                                         int64_t r_end) {
  using T = typename A::T;
  using M = typename A::M;
  constexpr int64_t L = A::L;
  const __m512i steps = A::lane_steps(g.stride_w);
  // Masks of a full chunk [0] and of the row's last chunk [1]: stored lanes, and the input
  // columns a load pair needs for a tap pair (2n columns) or a lone tap (2n - 1 columns).
  const IndexRange cols = g.inner_cols();
  const int64_t span = cols.end - cols.begin;
  const int64_t nchunks = (span + L - 1) / L;
  M out_mask[2], pair_lo[2], pair_hi[2], one_lo[2], one_hi[2];
  for (int c = 0; c < 2; ++c) {
    const int64_t n = c == 0 ? L : span - (nchunks - 1) * L;
    out_mask[c] = A::lanes(n);
    pair_lo[c] = A::lanes(2 * n);
    pair_hi[c] = A::lanes(2 * n - L);
    one_lo[c] = A::lanes(2 * n - 1);
    one_hi[c] = A::lanes(2 * n - 1 - L);
  }
  const int64_t W = g.in_w;
  // Software prefetch: the input rows that output row r + kAhead adds to its predecessor's (the
  // hardware prefetchers lose track of the row-interleaved pattern on tensors beyond L2).
  constexpr int64_t kAhead = 3;
  const uintptr_t in_end = reinterpret_cast<uintptr_t>(in + g.planes() * g.in_h * W);
  const int64_t eff_h = g.effective_kernel_h();
  const int64_t fetch_bytes = std::min(g.stride_h, eff_h) * W * int64_t(sizeof(T));
  int64_t p = r_begin / g.out_h, oh = r_begin % g.out_h;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* plane = in + p * g.in_h * W;
    {
      const int64_t oh_f = oh + kAhead;  // may run into the next plane: planes are contiguous
      // One past the window's last row.
      const int64_t last_row =
          (oh_f < g.out_h ? p * g.in_h : (p + 1) * g.in_h - g.out_h * g.stride_h) +
          oh_f * g.stride_h - g.padding_h + eff_h;
      const uintptr_t hi = reinterpret_cast<uintptr_t>(in) + uintptr_t(last_row * W) * sizeof(T);
      for (int64_t b = 0; b < fetch_bytes; b += 64) {
        const uintptr_t a = hi - fetch_bytes + b;
        if (a < in_end) _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
      }
    }
    T* orow = out + r * g.out_w;
    int64_t* irow = kIdx ? idx + r * g.out_w : nullptr;
    const int64_t hs = oh * g.stride_h - g.padding_h;
    const int64_t ih1 = std::min(hs + eff_h, g.in_h);
    const int64_t ih0 = first_tap(hs, g.dilation_h);
    if (ih0 >= ih1) {  // every window row in padding (dilation can do that): no taps at all
      pool_row_scalar<T, kIdx>(plane, orow, irow, g, oh, 0, g.out_w);
    } else {
      if (cols.begin > 0) pool_row_scalar<T, kIdx>(plane, orow, irow, g, oh, 0, cols.begin);
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const int last = ch == nchunks - 1 ? 1 : 0;
        const int64_t ow0 = cols.begin + ch * L;
        const int64_t c0 = ow0 * g.stride_w - g.padding_w;  // input column of lane 0's first tap
        Best<A> acc;
        for (int64_t ih = ih0; ih < ih1; ih += g.dilation_h) {
          const T* row = plane + ih * W;
          const int64_t base = ih * W + c0;
          Best<A> rb;
          if (kMode == kStride1) {
            rb = tap<A, kIdx>(A::load(out_mask[last], row + c0), steps, base);
            for (int64_t kw = 1; kw < g.kernel_w; ++kw) {
              const int64_t c = kw * g.dilation_w;
              fold<A, kIdx>(rb, tap<A, kIdx>(A::load(out_mask[last], row + c0 + c), steps,
                                             base + c));
            }
          } else if (kMode == kStride2Pairs) {
            for (int64_t kw = 0; kw < g.kernel_w; kw += 2) {
              const bool pair = kw + 1 < g.kernel_w;
              const T* src = row + c0 + kw;
              const typename A::V lo = A::load(pair ? pair_lo[last] : one_lo[last], src);
              const typename A::V hi = A::load(pair ? pair_hi[last] : one_hi[last], src + L);
              Best<A> t = tap<A, kIdx>(A::even(lo, hi), steps, base + kw);
              if (kw == 0) rb = t; else fold<A, kIdx>(rb, t);
              if (pair) fold<A, kIdx>(rb, tap<A, kIdx>(A::odd(lo, hi), steps, base + kw + 1));
            }
          } else {
            for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
              const int64_t c = kw * g.dilation_w;
              const typename A::V lo = A::load(one_lo[last], row + c0 + c);
              const typename A::V hi = A::load(one_hi[last], row + c0 + c + L);
              Best<A> t = tap<A, kIdx>(A::even(lo, hi), steps, base + c);
              if (kw == 0) rb = t; else fold<A, kIdx>(rb, t);
            }
          }
          if (ih == ih0) acc = rb; else fold<A, kIdx>(acc, rb);
        }
        A::store(orow + ow0, out_mask[last], acc.v);
        if (kIdx) A::store_index(irow + ow0, out_mask[last], acc.i);
      }
      if (cols.end < g.out_w) pool_row_scalar<T, kIdx>(plane, orow, irow, g, oh, cols.end, g.out_w);
    }
    if (++oh == g.out_h) oh = 0, ++p;
  }
}

// The tutorial case, 2x2 windows with stride 2 and no padding or dilation, whole windows only
// (2*OH <= H and 2*OW <= W): everything but the loads and folds is hoisted out of the row loop.
template <class A, bool kIdx>
PE_TARGET_AVX512 void pool2x2_rows_avx512(const typename A::T* in,
                                                            typename A::T* out, int64_t* idx,
                                                            const Geometry& g, int64_t r_begin,
                                                            int64_t r_end) {
  using T = typename A::T;
  using M = typename A::M;
  constexpr int64_t L = A::L;
  const __m512i steps = A::lane_steps(2);
  const int64_t W = g.in_w, OW = g.out_w, plane = g.in_pixels();
  const int64_t nchunks = (OW + L - 1) / L;
  const int64_t n_last = OW - (nchunks - 1) * L;
  const M out_last = A::lanes(n_last), lo_last = A::lanes(2 * n_last),
          hi_last = A::lanes(2 * n_last - L);
  const M all = A::lanes(L);
  const bool prefetch = g.planes() * plane * int64_t(sizeof(T)) > (int64_t(2) << 20);
  const uintptr_t in_end = reinterpret_cast<uintptr_t>(in + g.planes() * plane);
  int64_t p = r_begin / g.out_h, oh = r_begin % g.out_h;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const T* r0 = in + p * plane + 2 * oh * W;
    const T* r1 = r0 + W;
    if (prefetch) {  // the row pair three output rows ahead (maybe in the next plane)
      const int64_t ahead = 3;
      const T* next = oh + ahead < g.out_h ? r0 + 2 * ahead * W
                                        : in + (p + 1) * plane + 2 * (oh + ahead - g.out_h) * W;
      for (int64_t b = 0; b < 2 * W * int64_t(sizeof(T)); b += 64) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(next) + b;
        if (a < in_end) _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
      }
    }
    const int64_t base = 2 * oh * W;  // flat index of the row pair's first element
    T* orow = out + r * OW;
    int64_t* irow = kIdx ? idx + r * OW : nullptr;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const bool last = ch == nchunks - 1;
      const M om = last ? out_last : all, lm = last ? lo_last : all, hm = last ? hi_last : all;
      const int64_t c = 2 * ch * L;
      const typename A::V a_lo = A::load(lm, r0 + c), a_hi = A::load(hm, r0 + c + L);
      const typename A::V b_lo = A::load(lm, r1 + c), b_hi = A::load(hm, r1 + c + L);
      Best<A> top = tap<A, kIdx>(A::even(a_lo, a_hi), steps, base + c);
      fold<A, kIdx>(top, tap<A, kIdx>(A::odd(a_lo, a_hi), steps, base + c + 1));
      Best<A> bottom = tap<A, kIdx>(A::even(b_lo, b_hi), steps, base + W + c);
      fold<A, kIdx>(bottom, tap<A, kIdx>(A::odd(b_lo, b_hi), steps, base + W + c + 1));
      fold<A, kIdx>(top, bottom);
      A::store(orow + ch * L, om, top.v);
      if (kIdx) A::store_index(irow + ch * L, om, top.i);
    }
    if (++oh == g.out_h) oh = 0, ++p;
  }
}

// Backward of the 2x2 / stride-2 case as a gather: each window's gradient goes to whichever of its
// four taps its index names, every grad_input element is written once (no zero pass, no
// read-modify-write). Valid only if every index is one of its own window's taps; returns false
// at the first that is not (a hand-made indices tensor), and the caller scatters that plane.
// Windows are disjoint, so each element receives at most one gradient: the result is bit for bit
// the scatter's.
template <class A>
PE_TARGET_AVX512 bool unpool2x2_plane_avx512(const typename A::T* go,
                                                               const int64_t* idx,
                                                               typename A::T* gi,
                                                               const Geometry& g) {
  using T = typename A::T;
  using M = typename A::M;
  constexpr int64_t L = A::L;
  const int64_t W = g.in_w, OW = g.out_w;
  const int64_t delta[4] = {0, 1, W, W + 1};
  const int64_t nchunks = (OW + L - 1) / L;
  const int64_t n_last = OW - (nchunks - 1) * L;
  const M all = A::lanes(L), out_last = A::lanes(n_last), lo_last = A::lanes(2 * n_last),
          hi_last = A::lanes(2 * n_last - L);
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    T* top = gi + 2 * oh * W;
    T* bottom = top + W;
    const T* grow = go + oh * OW;
    const int64_t* irow = idx + oh * OW;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const bool last = ch == nchunks - 1;
      const M om = last ? out_last : all, lm = last ? lo_last : all, hm = last ? hi_last : all;
      const int64_t ow0 = ch * L;
      M hit[4];  // top-left, top-right, bottom-left, bottom-right
      A::match4(irow + ow0, om, 2 * oh * W + 2 * ow0, delta, hit);
      if (static_cast<M>(hit[0] | hit[1] | hit[2] | hit[3]) != om) return false;
      const typename A::V gv = A::load(om, grow + ow0);
      const typename A::V tl = A::add_to_zero(hit[0], gv), tr = A::add_to_zero(hit[1], gv);
      const typename A::V bl = A::add_to_zero(hit[2], gv), br = A::add_to_zero(hit[3], gv);
      A::store(top + 2 * ow0, lm, A::interleave_lo(tl, tr));
      A::store(top + 2 * ow0 + L, hm, A::interleave_hi(tl, tr));
      A::store(bottom + 2 * ow0, lm, A::interleave_lo(bl, br));
      A::store(bottom + 2 * ow0 + L, hm, A::interleave_hi(bl, br));
    }
    for (int64_t c = 2 * OW; c < W; ++c) top[c] = bottom[c] = T(0);  // no window covers these
  }
  std::memset(gi + 2 * g.out_h * W, 0, sizeof(T) * (g.in_h - 2 * g.out_h) * W);
  return true;
}

#undef PE_AVX512_INLINE
#pragma GCC diagnostic pop

// The kernel for this geometry and dtype: the vector one where it applies, else the scalar one.
template <typename T, bool kIdx>
using RowsFn = void (*)(const T*, T*, int64_t*, const Geometry&, int64_t, int64_t);

template <typename T, bool kIdx>
RowsFn<T, kIdx> pick_kernel(const Geometry& g) {
  using A = std::conditional_t<std::is_same_v<T, float>, F32x16, F64x8>;
  const IndexRange cols = g.inner_cols();
  // fp32's vector kernels keep indices in int32 lanes
  const bool int32_indices = sizeof(T) == 8 || g.in_pixels() < (int64_t(1) << 31);
  const bool fits = cols.end - cols.begin >= 2 && int32_indices;
  if (use_avx512() && fits) {
    if (g.is_2x2_stride_2()) return pool2x2_rows_avx512<A, kIdx>;
    if (g.stride_w == 1) return pool_rows_avx512<A, kIdx, kStride1>;
    if (g.stride_w == 2 && g.dilation_w == 1) return pool_rows_avx512<A, kIdx, kStride2Pairs>;
    if (g.stride_w == 2) return pool_rows_avx512<A, kIdx, kStride2>;
  }
  if (g.is_2x2_stride_2() && int32_indices) return pool2x2_rows<T, kIdx>();
  return pool_rows_scalar<T, kIdx>;
}

// Rows of work per parallel task: enough window taps to be worth a thread.
int64_t row_grain(const Geometry& g) {
  const int64_t per_row = std::max<int64_t>(1, g.out_w * g.kernel_h * g.kernel_w);
  return std::max<int64_t>(1, 32768 / per_row);
}

template <bool kIdx>
void max_pool2d_forward_impl(const Tensor& input_, const Geometry& g, Tensor& output,
                             Tensor* indices, const char* op) {
  const Tensor input = cpu::contiguous_image(input_);
  dispatch_floating(input.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* in = input.const_data_ptr<T>();
    T* out = output.mutable_data_ptr<T>();
    int64_t* idx = kIdx ? indices->mutable_data_ptr<int64_t>() : nullptr;
    const RowsFn<T, kIdx> rows = pick_kernel<T, kIdx>(g);
    at::parallel_for(0, g.planes() * g.out_h, row_grain(g), [&](int64_t begin, int64_t end) {
      rows(in, out, idx, g, begin, end);
    });
  });
}

Tensor max_pool2d_cpu(const Tensor& input, IntArrayRef kernel_size, IntArrayRef stride,
                      IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  const Geometry g =
      check_max_pool2d<int64_t>(input, kernel_size, stride, padding, dilation, ceil_mode);
  Tensor output = empty_of(g.output_sizes(), input.options());
  max_pool2d_forward_impl<false>(input, g, output, nullptr, "max_pool2d");
  return cpu::as_image_layout(output, pool2d_channels_last(input));
}

std::tuple<Tensor, Tensor> max_pool2d_with_indices_cpu(const Tensor& input,
                                                       IntArrayRef kernel_size,
                                                       IntArrayRef stride, IntArrayRef padding,
                                                       IntArrayRef dilation, bool ceil_mode) {
  const Geometry g =
      check_max_pool2d<int64_t>(input, kernel_size, stride, padding, dilation, ceil_mode);
  const auto sizes = g.output_sizes();
  Tensor output = empty_of(sizes, input.options());
  Tensor indices = empty_of(sizes, input.options().dtype(at::kLong));
  max_pool2d_forward_impl<true>(input, g, output, &indices, "max_pool2d_with_indices");
  const bool channels_last = pool2d_channels_last(input);
  return {cpu::as_image_layout(output, channels_last),
          cpu::as_image_layout(indices, channels_last)};
}

// ---- Backward -------------------------------------------------------------------------------
//
// grad_input = 0, then grad_input[indices[o]] += grad_output[o] for every output o of a plane in
// order (overlapping windows add up deterministically): torch's CPU scatter, for any index inside
// the H*W plane, a tap of o's window or not. Each plane is zeroed right before its scatter, while
// it sits in L1. For 2x2 / stride-2 windows an AVX-512 gather (above) computes the same bits in
// one write pass when every index is a tap of its own window, and leaves other planes to the
// scatter.
//
// indices is a public argument, so the scatter checks it: an index outside [0, H*W) names no input
// element and is an error, except for a window with no in-bounds tap at all (dilation with
// padding can make one). Such a window's output is -inf whatever the input, so it passes no
// gradient back, whatever its index says; torch emits an index computed from its first tap there,
// which may lie outside the plane (torch's CPU backward then writes outside it).

// Which windows have no in-bounds tap: those of an output row whose taps all miss the input's rows,
// or of an output column whose taps all miss its columns. Empty for most geometries (`any` false).
struct EmptyWindows {
  bool any = false;
  std::vector<uint8_t> row, col;  // row[oh], col[ow]: no tap of the window in bounds on that axis

  explicit EmptyWindows(const Geometry& g) {
    any = g.has_empty_window();
    if (!any) return;
    row.resize(g.out_h);
    col.resize(g.out_w);
    for (int64_t oh = 0; oh < g.out_h; ++oh) row[oh] = g.row_misses_input(oh);
    for (int64_t ow = 0; ow < g.out_w; ++ow) col[ow] = g.col_misses_input(ow);
  }
  bool empty(int64_t o, int64_t OW) const { return row[o / OW] || col[o % OW]; }
};

// grad_input of one plane by scattering. Returns -1, or the output position o (within the plane)
// of the first index outside the plane for a window with in-bounds taps; the plane's gradient is
// then incomplete and the caller raises.
template <typename T>
int64_t unpool_plane_scatter(const T* go, const int64_t* idx, T* gi, int64_t plane_in,
                             int64_t plane_out, const EmptyWindows& skip, int64_t OW) {
  std::memset(gi, 0, sizeof(T) * plane_in);
  for (int64_t o = 0; o < plane_out; ++o) {
    if (skip.any && skip.empty(o, OW)) continue;
    const int64_t i = idx[o];
    if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(plane_in)) return o;
    gi[i] += go[o];
  }
  return -1;
}

template <typename T>
using PlaneGatherFn = bool (*)(const T*, const int64_t*, T*, const Geometry&);

template <typename T>
PlaneGatherFn<T> pick_gather(const Geometry& g) {
  using A = std::conditional_t<std::is_same_v<T, float>, F32x16, F64x8>;
  // Rows of fewer than half a vector (LeNet's 5-wide pool2) scatter faster than they gather;
  // offsets must fit int32 lanes.
  if (use_avx512() && g.is_2x2_stride_2() && 2 * g.out_w >= A::L &&
      g.in_w < (int64_t(1) << 30))
    return unpool2x2_plane_avx512<A>;
  return nullptr;
}

// grad_input of contiguous grad_output and indices (see above); `op` names the operator in the
// error for an index outside its plane.
// grad_input of planes [0, planes) (contiguous, each from grad_output's and indices' plane):
// -1, or the flat position in indices of the first index outside its plane (that plane and the
// ones after it left unwritten).
template <typename T>
int64_t unpool_planes(const Geometry& g, const PlaneGatherFn<T> gather, const EmptyWindows& skip,
                      const T* go, const int64_t* idx, T* gi, int64_t planes) {
  const int64_t plane_in = g.in_pixels(), plane_out = g.out_pixels();
  for (int64_t p = 0; p < planes; ++p) {
    T* dst = gi + p * plane_in;
    const T* src = go + p * plane_out;
    const int64_t* at_ = idx + p * plane_out;
    if (gather && gather(src, at_, dst, g)) continue;
    const int64_t o = unpool_plane_scatter(src, at_, dst, plane_in, plane_out, skip, g.out_w);
    if (o >= 0) return p * plane_out + o;
  }
  return -1;
}

Tensor max_pool2d_backward_impl(const Geometry& g, const Tensor& go, const Tensor& ix,
                                at::IntArrayRef input_sizes, const char* op, const char* plane) {
  Tensor grad_input = empty_of(input_sizes, go.options());
  const int64_t plane_in = g.in_pixels(), plane_out = g.out_pixels();
  const int64_t* pi = ix.const_data_ptr<int64_t>();
  // The first bad index, as a flat position in indices (planes are scanned in order within a
  // task and each task stops at its first, so the minimum over tasks is the first overall).
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  dispatch_floating(go.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const T* pg = go.const_data_ptr<T>();
    T* gi = grad_input.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 32768 / (plane_in + plane_out));
    const PlaneGatherFn<T> gather = pick_gather<T>(g);
    const EmptyWindows skip(g);
    at::parallel_for(0, g.planes(), grain, [&](int64_t begin, int64_t end) {
      const int64_t o = unpool_planes<T>(g, gather, skip, pg + begin * plane_out,
                                         pi + begin * plane_out, gi + begin * plane_in,
                                         end - begin);
      if (o >= 0) {
        int64_t seen = first_bad.load();
        const int64_t bad = begin * plane_out + o;
        while (bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
        }
      }
    });
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) {
    const int64_t p = bad / plane_out, o = bad % plane_out;
    std::vector<int64_t> where;  // indices' own coordinates: [n,] c, oh, ow
    if (g.batched) where.push_back(p / g.channels);
    where.insert(where.end(), {p % g.channels, o / g.out_w, o % g.out_w});
    // RuntimeError, as torch's max_unpool2d (the same scatter) raises for such an index.
    TORCH_CHECK(false, "pyengine.", op, ": indices", at::IntArrayRef(where), " = ", pi[bad],
                " lies outside the ", g.in_h, "x", g.in_w, " ", plane, " plane (expected a flat "
                "position in [0, ", plane_in, ") for a window with input elements)");
  }
  return grad_input;
}

Tensor max_pool2d_backward_cpu(const Tensor& grad_output, const Tensor& input,
                               const Tensor& indices, IntArrayRef kernel_size, IntArrayRef stride,
                               IntArrayRef padding, IntArrayRef dilation, bool ceil_mode) {
  const Geometry g = check_max_pool2d_backward<int64_t>(grad_output, input, indices, kernel_size,
                                                        stride, padding, dilation, ceil_mode);
  const Tensor grad_input = max_pool2d_backward_impl(
      g, cpu::contiguous_image(grad_output), indices.contiguous(), input.sizes(),
      "max_pool2d_backward", "input");
  return cpu::as_image_layout(grad_input, pool2d_channels_last(input));
}

}  // namespace

namespace cpu {

void max_pool2d_forward_contiguous(const Pool2dGeometry<int64_t>& g, const Tensor& x,
                                   Tensor& output, Tensor& indices) {
  max_pool2d_forward_impl<true>(x, g, output, &indices, "max_pool2d_with_indices");
}

Tensor max_pool2d_backward_contiguous(const Pool2dGeometry<int64_t>& g, const Tensor& grad_output,
                                      const Tensor& indices, at::IntArrayRef input_sizes,
                                      const char* op, const char* plane) {
  return max_pool2d_backward_impl(g, grad_output, indices, input_sizes, op, plane);
}

template <typename T>
void max_pool2d_forward_planes(const Pool2dGeometry<int64_t>& g, const T* input, T* output,
                               int64_t* indices) {
  pick_kernel<T, true>(g)(input, output, indices, g, 0, g.planes() * g.out_h);
}
template void max_pool2d_forward_planes<float>(const Pool2dGeometry<int64_t>&, const float*,
                                               float*, int64_t*);
template void max_pool2d_forward_planes<double>(const Pool2dGeometry<int64_t>&, const double*,
                                                double*, int64_t*);

template <typename T>
bool max_pool2d_backward_planes(const Pool2dGeometry<int64_t>& g, const T* grad_output,
                                const int64_t* indices, T* grad_input, int64_t planes) {
  return unpool_planes<T>(g, pick_gather<T>(g), EmptyWindows(g), grad_output, indices,
                          grad_input, planes) < 0;
}
template bool max_pool2d_backward_planes<float>(const Pool2dGeometry<int64_t>&, const float*,
                                                const int64_t*, float*, int64_t);
template bool max_pool2d_backward_planes<double>(const Pool2dGeometry<int64_t>&, const double*,
                                                 const int64_t*, double*, int64_t);

}  // namespace cpu

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("max_pool2d", PE_KERNEL(max_pool2d_cpu));
  m.impl("max_pool2d_with_indices", PE_KERNEL(max_pool2d_with_indices_cpu));
  m.impl("max_pool2d_backward", PE_KERNEL(max_pool2d_backward_cpu));
}

}  // namespace pyengine
