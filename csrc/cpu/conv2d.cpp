// CPU kernels of conv2d and conv2d_backward on pyengine's GEMM (cpu/gemm.h). Two paths, chosen
// from the shapes alone:
//
// 1. im2col (any geometry). Per group g, with K = (C_in / groups) * kH * kW taps and the output
//    pixels of a run of images as the columns j (image-major, so several small images make one
//    wide GEMM):
//      forward      Y[co, j]  = sum_k W[co, k] Xcol[k, j]          gemm(C_out/g, cols, K)
//      grad_weight  dW[co, k] = sum_j dY[co, j] Xcol[k, j]         gemm(C_out/g, K, cols): the dot
//                                                                  kernel, both operands along j
//      grad_input   dXcol[k, j] = sum_co W[co, k] dY[co, j]        gemm(K, cols, C_out/g), then
//                                                                  col2im adds dXcol into dX
//      grad_bias    db[co] = sum_j dY[co, j]
//    The batch is cut into chunks of `images_per_chunk` images (from the shapes only); a chunk's
//    columns go in strips of at most `strip` columns, so the im2col scratch (K x strip) stays in
//    L2 whatever the image size. at::parallel_for runs chunks (forward, and grad_input alone) or
//    "slots" of consecutive chunks (when grad_weight / grad_bias are wanted): a slot sums its
//    chunks' contributions in chunk order into its own partial, and the partials are added in
//    slot order at the end. col2im of a chunk touches only the chunk's own images, so grad_input
//    needs no reduction.
//
// 2. Batch innermost (stride 1, W_out <= 16, batch >= 16: LeNet's conv2): see "Batch-innermost
//    path" below. No im2col at all; every pass is a GEMM over contiguous batch vectors.
//
// Both are deterministic: each output element is summed in a fixed order that depends on the
// shapes only, so results are bitwise identical across runs and thread counts.
//
// Layout: the kernels compute in contiguous NCHW. When torch would compute in channels_last
// (input or weight channels_last: common/layout.h), the input pays one copy into NCHW and each
// result one copy into channels_last, so the strides match torch's.
//
// Napkin math, LeNet at batch 64, fp32 (per pass; the machine: 2 cores, ~200 GFLOP/s per core at
// 2 x 512-bit FMA per cycle, L2 1 MB per core):
//   conv1 1->6, 5x5, 32x32 -> 28x28 (im2col path): K = 25, 784 columns per image. Forward
//     2*64*6*25*784 = 15.1 MFLOP, grad_weight the same: a GEMM floor of ~0.04 ms per pass on 2
//     cores. But with 6 output channels each im2col element (25*784 per image, 5 MB over the
//     batch, written and read once in L2) feeds only 6 FMAs, so im2col, at a few cycles per
//     28-float row, costs about as much as the FMAs.
//   conv2 6->16, 5x5, 14x14 -> 10x10 (batch-innermost path): K = 150. Forward 30.7 MFLOP, and
//     grad_weight, grad_input the same: ~0.07 ms per pass at the floor on 2 cores. im2col would
//     copy 15000 elements per image in 10-float rows (0.96 M rows over the batch) for 16 FMAs
//     each, as slow as the GEMM; the batch-innermost layout instead moves each of x, y, dY, dX
//     once (0.35 M elements in all) and runs the GEMMs at near peak.
//   Measured (2026-11-24, 2 threads, forward + backward through autograd, medians): conv1 0.21 ms
//   without input grad (torch 0.40 ms); conv2 0.38 ms with input grad (torch 0.75 ms). One thread,
//   conv2, from perf samples: forward and grad_input GEMMs ~0.145 ms each, grad_weight ~0.16 ms,
//   building the tap tables ~0.05 ms, the four transposes under 0.01 ms together.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/layout.h"
#include "cpu/gemm.h"

namespace pyengine {
namespace {

using at::Tensor;

#define PE_INLINE inline __attribute__((always_inline))
#define PE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

using Geometry = Conv2dGeometry<int64_t>;

// How the batch is cut (from the shapes only: see the top of the file).
struct Split {
  int64_t strip;             // max columns per GEMM
  int64_t images_per_chunk;  // images whose columns are merged
  int64_t chunks;
};

Split make_split(const Geometry& g, size_t elem) {
  Split s;
  // K x strip scratch of ~256 KB (L2), at least 64 columns.
  const int64_t bytes_per_col = std::max<int64_t>(1, g.taps_per_group()) * static_cast<int64_t>(elem);
  s.strip = std::clamp<int64_t>(int64_t(256) * 1024 / bytes_per_col, 64, 8192);
  // Merge small images up to a strip, but keep >= 16 chunks when the batch allows.
  const int64_t by_size = std::max<int64_t>(1, s.strip / std::max<int64_t>(1, g.out_pixels()));
  const int64_t by_count = std::max<int64_t>(1, g.batch / 16);
  s.images_per_chunk = std::min(by_size, by_count);
  s.chunks = (g.batch + s.images_per_chunk - 1) / s.images_per_chunk;
  return s;
}

// ---- im2col / col2im over a strip of columns ------------------------------------------------
// Columns q in [q0, q0 + len) of a run of images: image q / P, pixel q % P. `x` points at the run's
// first image, channel 0 of the group; images are `img_stride` apart.
// Each output row segment (fixed image and output row) maps, for tap (ci, ki, kj), onto one input
// row read with stride sw; the valid part is copied, the padding part is zero.

// Valid t in [0, seg): 0 <= iw0 + t * sw < W.
PE_INLINE void valid_range(int64_t iw0, int64_t sw, int64_t W, int64_t seg, int64_t& lo,
                           int64_t& hi) {
  lo = iw0 >= 0 ? 0 : ceil_div(-iw0, sw);
  hi = iw0 > W - 1 ? 0 : (W - 1 - iw0) / sw + 1;
  lo = std::min(lo, seg);
  hi = std::clamp(hi, lo, seg);
}

// dst[0, n) = src[0, n) with a few overlapping fixed-size moves (vector loads / stores in each
// target_clones clone), instead of a scalar loop for short rows.
template <typename T>
PE_INLINE void copy_run(T* __restrict dst, const T* __restrict src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const int64_t b = n * static_cast<int64_t>(sizeof(T));
  if (b >= 64) {
    int64_t i = 0;
    for (; i + 64 <= b; i += 64) std::memcpy(d + i, s + i, 64);
    if (i < b) std::memcpy(d + b - 64, s + b - 64, 64);
  } else if (b >= 32) {
    std::memcpy(d, s, 32);
    std::memcpy(d + b - 32, s + b - 32, 32);
  } else if (b >= 16) {
    std::memcpy(d, s, 16);
    std::memcpy(d + b - 16, s + b - 16, 16);
  } else if (b >= 8) {
    std::memcpy(d, s, 8);
    std::memcpy(d + b - 8, s + b - 8, 8);
  } else if (b > 0) {
    std::memcpy(d, s, sizeof(T));
    if (b > static_cast<int64_t>(sizeof(T)))
      std::memcpy(d + b - sizeof(T), s + b - sizeof(T), sizeof(T));
  }
}

template <typename T>
PE_INLINE void zero_run(T* dst, int64_t n) {
  for (int64_t t = 0; t < n; ++t) dst[t] = T(0);
}

// ---- Row-block kernels: `rows` rows of n elements, d += ds and s += ss per row -------------
// copy: d = s; add: d += s. The AVX-512 copy does each row's tail with one masked load / store
// (the LeNet rows are 10 and 28 floats); the portable ones are compiled for AVX2 / baseline.
// (AVX-512 col2im does not add row by row: col2im_rows_avx512.)
template <typename T>
PE_INLINE void copy_block_impl(T* d, int64_t ds, const T* s, int64_t ss, int64_t rows,
                               int64_t n) {
  for (int64_t r = 0; r < rows; ++r, d += ds, s += ss) copy_run(d, s, n);
}
template <typename T>
PE_INLINE void add_block_impl(T* d, int64_t ds, const T* s, int64_t ss, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r, d += ds, s += ss)
    for (int64_t t = 0; t < n; ++t) d[t] += s[t];
}
__attribute__((target_clones("avx2", "default"))) void copy_block_portable(
    float* d, int64_t ds, const float* s, int64_t ss, int64_t rows, int64_t n) {
  copy_block_impl(d, ds, s, ss, rows, n);
}
__attribute__((target_clones("avx2", "default"))) void copy_block_portable(
    double* d, int64_t ds, const double* s, int64_t ss, int64_t rows, int64_t n) {
  copy_block_impl(d, ds, s, ss, rows, n);
}
__attribute__((target_clones("avx2", "default"))) void add_block_portable(
    float* d, int64_t ds, const float* s, int64_t ss, int64_t rows, int64_t n) {
  add_block_impl(d, ds, s, ss, rows, n);
}
__attribute__((target_clones("avx2", "default"))) void add_block_portable(
    double* d, int64_t ds, const double* s, int64_t ss, int64_t rows, int64_t n) {
  add_block_impl(d, ds, s, ss, rows, n);
}

#define PE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))
PE_TARGET_AVX512 void copy_block_avx512(float* d, int64_t ds, const float* s, int64_t ss,
                                        int64_t rows, int64_t n) {
  const int64_t full = n / 16 * 16;
  const __mmask16 m = static_cast<__mmask16>((1u << (n - full)) - 1u);
  for (int64_t r = 0; r < rows; ++r, d += ds, s += ss) {
    for (int64_t t = 0; t < full; t += 16) _mm512_storeu_ps(d + t, _mm512_loadu_ps(s + t));
    if (m) _mm512_mask_storeu_ps(d + full, m, _mm512_maskz_loadu_ps(m, s + full));
  }
}
PE_TARGET_AVX512 void copy_block_avx512(double* d, int64_t ds, const double* s, int64_t ss,
                                        int64_t rows, int64_t n) {
  const int64_t full = n / 8 * 8;
  const __mmask8 m = static_cast<__mmask8>((1u << (n - full)) - 1u);
  for (int64_t r = 0; r < rows; ++r, d += ds, s += ss) {
    for (int64_t t = 0; t < full; t += 8) _mm512_storeu_pd(d + t, _mm512_loadu_pd(s + t));
    if (m) _mm512_mask_storeu_pd(d + full, m, _mm512_maskz_loadu_pd(m, s + full));
  }
}
// Picked once, with the GEMM's choice (so PYENGINE_CPU_ISA steers both).
template <typename T>
struct BlockOps {
  void (*copy)(T*, int64_t, const T*, int64_t, int64_t, int64_t);
  void (*add)(T*, int64_t, const T*, int64_t, int64_t, int64_t);
};
template <typename T>
const BlockOps<T>& block_ops() {
  static const BlockOps<T> ops = [] {
    if (std::strcmp(cpu::gemm_isa(), "avx512") == 0)
      return BlockOps<T>{copy_block_avx512, add_block_portable};  // AVX-512 col2im: see below
    return BlockOps<T>{copy_block_portable, add_block_portable};
  }();
  return ops;
}

// One output-row segment (image n, output row oh, columns ow .. ow + seg) of tap (ci, ki, kj):
// the matching input row, strided by sw, zero where it falls in the padding.
template <typename T, bool kAdd>
PE_INLINE void segment(const Geometry& g, T* col, T* img, int64_t oh, int64_t ow, int64_t seg,
                       int64_t ihoff, int64_t iwoff) {
  const int64_t ih = oh * g.stride_h + ihoff;
  if (ih < 0 || ih >= g.in_h) {
    if (!kAdd) zero_run(col, seg);
    return;
  }
  T* row = img + ih * g.in_w;
  const int64_t iw0 = ow * g.stride_w + iwoff;
  int64_t lo, hi;
  valid_range(iw0, g.stride_w, g.in_w, seg, lo, hi);
  if (kAdd) {
    for (int64_t t = lo; t < hi; ++t) row[iw0 + t * g.stride_w] += col[t];
  } else {
    zero_run(col, lo);
    if (g.stride_w == 1)
      copy_run(col + lo, row + iw0 + lo, hi - lo);
    else
      for (int64_t t = lo; t < hi; ++t) col[t] = row[iw0 + t * g.stride_w];
    zero_run(col + hi, seg - hi);
  }
}

// im2col (kAdd = false): col[k, q - q0] = x(tap k, column q), zero in the padding; columns from len
// to ld are zeroed too (the dot kernel reads them). col2im (kAdd = true): x(tap k, column q) +=
// col[k, q - q0], taps in k order. Columns q in [q0, q0 + len) of a run of images: image q / P,
// pixel q % P; `x` points at the run's first image, channel 0 of the group, images `img_stride`
// apart. Whole output rows are handled in runs whose clipping is computed once: the inner loop is
// one short copy per row.
template <typename T, bool kAdd>
PE_INLINE void im2col_impl(const Geometry& geom, T* x, int64_t img_stride, int64_t q0, int64_t len,
                           T* col, int64_t ld) {
  // Local copies: the byte-wise copies below could otherwise alias the geometry, which the
  // compiler would then reload on every row.
  const Geometry g = geom;
  const int64_t H = g.in_h, W = g.in_w, OW = g.out_w, OH = g.out_h, P = g.out_pixels(), sh = g.stride_h, sw = g.stride_w;
  const int64_t khw = g.kernel_pixels(), qend = q0 + len;
  const BlockOps<T>& ops = block_ops<T>();
  for (int64_t k = 0; k < g.taps_per_group(); ++k) {
    const int64_t ci = k / khw, ki = (k % khw) / g.kernel_w, kj = k % g.kernel_w;
    const int64_t ihoff = ki * g.dilation_h - g.padding_h, iwoff = kj * g.dilation_w - g.padding_w;
    // Output rows whose input row is inside the image: ih = oh * sh + ihoff in [0, H).
    const int64_t oh_lo = ihoff >= 0 ? 0 : ceil_div(-ihoff, sh);
    const int64_t oh_hi = ihoff > H - 1 ? 0 : (H - 1 - ihoff) / sh + 1;
    // Columns of a whole output row that fall inside the image.
    int64_t lo, hi;
    valid_range(iwoff, sw, W, OW, lo, hi);
    const int64_t w = hi - lo;
    T* dst = col + k * ld;
    int64_t q = q0;
    while (q < qend) {
      const int64_t n = q / P, p = q % P, oh = p / OW, ow = p % OW;
      T* img = x + n * img_stride + ci * H * W;
      const int64_t rows = ow == 0 ? std::min(OH - oh, (qend - q) / OW) : 0;
      if (rows == 0) {  // a partial row at either end of the strip
        const int64_t seg = std::min(OW - ow, qend - q);
        segment<T, kAdd>(g, dst, img, oh, ow, seg, ihoff, iwoff);
        dst += seg;
        q += seg;
        continue;
      }
      // Whole output rows oh .. oh + rows: zero above / below the image, then the interior rows
      // with one short copy (or add) each.
      const int64_t r_lo = std::clamp(oh_lo - oh, int64_t(0), rows);
      const int64_t r_hi = std::clamp(oh_hi - oh, r_lo, rows);
      if (!kAdd) {
        zero_run(dst, r_lo * OW);
        zero_run(dst + r_hi * OW, (rows - r_hi) * OW);
      }
      T* d = dst + r_lo * OW;
      T* src = img + ((oh + r_lo) * sh + ihoff) * W + iwoff;
      const int64_t src_step = sh * W;
      if (kAdd) {
        if (sw == 1) {
          ops.add(src + lo, src_step, d + lo, OW, r_hi - r_lo, w);
        } else {
          for (int64_t r = r_lo; r < r_hi; ++r, d += OW, src += src_step)
            for (int64_t t = lo; t < hi; ++t) src[t * sw] += d[t];
        }
      } else if (sw == 1) {
        if (lo == 0 && hi == OW) {
          ops.copy(d, OW, src, src_step, r_hi - r_lo, OW);
        } else {
          for (int64_t r = r_lo; r < r_hi; ++r) {
            zero_run(d + (r - r_lo) * OW, lo);
            zero_run(d + (r - r_lo) * OW + hi, OW - hi);
          }
          ops.copy(d + lo, OW, src + lo, src_step, r_hi - r_lo, w);
        }
      } else {
        for (int64_t r = r_lo; r < r_hi; ++r, d += OW, src += src_step) {
          zero_run(d, lo);
          for (int64_t t = lo; t < hi; ++t) d[t] = src[t * sw];
          zero_run(d + hi, OW - hi);
        }
      }
      dst += rows * OW;
      q += rows * OW;
    }
    if (!kAdd) zero_run(col + k * ld + len, ld - len);  // zero padding for the dot kernel
  }
}

// col2im of whole output rows oh0 .. oh0 + rows of one image (stride_w 1, AVX-512): for each
// input row an output row touches, the chunk of the dX row is loaded once, the kW taps' shifted
// col rows are added in a register (masked loads place each tap at its offset), and it is stored
// once. (Adding tap by tap instead re-reads rows that masked stores just wrote, which stalls:
// masked stores do not forward.) `colq` is col at the first row's column, taps `ld` apart.
template <typename T>
PE_TARGET_AVX512 void col2im_rows_avx512(const Geometry& geom, const T* colq, int64_t ld, T* dximg,
                                         int64_t oh0, int64_t rows) {
  constexpr int V = 64 / sizeof(T);
  const Geometry g = geom;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t oh = oh0 + r;
    const T* colrow = colq + r * g.out_w;
    for (int64_t ci = 0; ci < g.in_channels_per_group(); ++ci)
      for (int64_t ki = 0; ki < g.kernel_h; ++ki) {
        const int64_t ih = oh * g.stride_h - g.padding_h + ki * g.dilation_h;
        if (ih < 0 || ih >= g.in_h) continue;
        T* xrow = dximg + (ci * g.in_h + ih) * g.in_w;
        const T* ck = colrow + (ci * g.kernel_h + ki) * g.kernel_w * ld;
        for (int64_t c0 = 0; c0 < g.in_w; c0 += V) {
          const int64_t nv = std::min<int64_t>(V, g.in_w - c0);
          const uint32_t chunk = nv == 32 ? ~0u : (1u << nv) - 1u;
          // lane i of tap kj holds col element c0 + i - shift (input column = output + shift);
          // only lanes [a, b) are read.
          auto tap_mask = [&](int64_t kj, const T*& src) -> uint32_t {
            const int64_t shift = kj * g.dilation_w - g.padding_w;
            const int64_t a = std::max<int64_t>(0, shift - c0);
            const int64_t b = std::min<int64_t>(nv, g.out_w + shift - c0);
            // The base may lie before the row (lanes below a are masked off): form it as an
            // address, not by pointer arithmetic outside the buffer.
            src = reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(ck + kj * ld) +
                                             (c0 - shift) * static_cast<intptr_t>(sizeof(T)));
            if (b <= a) return 0u;
            return (b == 32 ? ~0u : (1u << b) - 1u) & ~((1u << a) - 1u);
          };
          if constexpr (sizeof(T) == 4) {
            __m512 acc = _mm512_maskz_loadu_ps(static_cast<__mmask16>(chunk), xrow + c0);
            for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
              const T* src;
              const uint32_t m = tap_mask(kj, src);
              if (m)
                acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), src));
            }
            _mm512_mask_storeu_ps(xrow + c0, static_cast<__mmask16>(chunk), acc);
          } else {
            __m512d acc = _mm512_maskz_loadu_pd(static_cast<__mmask8>(chunk), xrow + c0);
            for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
              const T* src;
              const uint32_t m = tap_mask(kj, src);
              if (m)
                acc = _mm512_add_pd(acc, _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), src));
            }
            _mm512_mask_storeu_pd(xrow + c0, static_cast<__mmask8>(chunk), acc);
          }
        }
      }
  }
}

// dX += col2im(col) over a strip. Deterministic: a fixed order per element (it differs between the
// AVX-512 path, which sums an element's taps row by row, and the portable one, tap by tap).
template <typename T>
void col2im_strip(const Geometry& g, const T* col, int64_t ld, T* dx, int64_t img_stride, int64_t q0,
                  int64_t len);

// Between a [rows x ld] scratch of a strip and an NCHW tensor: `t` points at the run's first image,
// channel 0 of the group, images `img_stride` apart, channels P apart.
// to_scratch: buf[r, j] = t[..] for j < len, 0 for len <= j < ld.
template <typename T>
PE_INLINE void gather_impl(const Geometry& g, const T* t, int64_t img_stride, int64_t rows,
                           int64_t q0, int64_t len, T* buf, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = buf + r * ld;
    int64_t q = q0;
    while (q < q0 + len) {
      const int64_t n = q / g.out_pixels(), p = q % g.out_pixels();
      const int64_t seg = std::min(g.out_pixels() - p, q0 + len - q);
      const T* src = t + n * img_stride + r * g.out_pixels() + p;
      for (int64_t i = 0; i < seg; ++i) dst[i] = src[i];
      dst += seg;
      q += seg;
    }
    for (int64_t j = len; j < ld; ++j) buf[r * ld + j] = T(0);
  }
}
// from scratch: t[..] = buf[r, j] (+ bias[r] when bias is not null).
template <typename T>
PE_INLINE void scatter_impl(const Geometry& g, const T* buf, int64_t ld, const T* bias, T* t,
                            int64_t img_stride, int64_t rows, int64_t q0, int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = buf + r * ld;
    const T b = bias ? bias[r] : T(0);
    int64_t q = q0;
    while (q < q0 + len) {
      const int64_t n = q / g.out_pixels(), p = q % g.out_pixels();
      const int64_t seg = std::min(g.out_pixels() - p, q0 + len - q);
      T* dst = t + n * img_stride + r * g.out_pixels() + p;
      if (bias) {
        for (int64_t i = 0; i < seg; ++i) dst[i] = src[i] + b;
      } else {
        for (int64_t i = 0; i < seg; ++i) dst[i] = src[i];
      }
      src += seg;
      q += seg;
    }
  }
}

// out[r] += sum of buf[r, 0..len): 16 interleaved partial sums, then a fixed tree (deterministic,
// and vectorisable without reassociation).
template <typename T>
PE_INLINE void row_sums_impl(const T* buf, int64_t ld, int64_t rows, int64_t len, T* out) {
  constexpr int L = 16;
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = buf + r * ld;
    T acc[L] = {};
    int64_t j = 0;
    for (; j + L <= len; j += L)
      for (int l = 0; l < L; ++l) acc[l] += p[j + l];
    for (int l = 0; j + l < len; ++l) acc[l] += p[j + l];
    for (int w = L / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    out[r] += acc[0];
  }
}

// out[e] = sum over s of parts[s * n + e], s in order.
template <typename T>
PE_INLINE void sum_parts_impl(const T* parts, int64_t nparts, int64_t n, int64_t e0, int64_t e1,
                              T* out) {
  for (int64_t e = e0; e < e1; ++e) out[e] = parts[e];
  for (int64_t s = 1; s < nparts; ++s) {
    const T* p = parts + s * n;
    for (int64_t e = e0; e < e1; ++e) out[e] += p[e];
  }
}

// The memory-bound loops above, compiled for AVX-512 / AVX2 / baseline (picked at load time).
#define PE_FOR_BOTH_DTYPES(X) X(float) X(double)
#define PE_DEFINE_CLONES(T)                                                                     \
  PE_CLONES void im2col(const Geometry& g, const T* x, int64_t img_stride, int64_t q0, int64_t len, \
                        T* col, int64_t ld) {                                                   \
    im2col_impl<T, false>(g, const_cast<T*>(x), img_stride, q0, len, col, ld);                  \
  }                                                                                             \
  PE_CLONES void col2im_portable(const Geometry& g, const T* col, int64_t ld, T* dx,                \
                                 int64_t img_stride, int64_t q0, int64_t len) {                 \
    im2col_impl<T, true>(g, dx, img_stride, q0, len, const_cast<T*>(col), ld);                  \
  }                                                                                             \
  PE_CLONES void gather(const Geometry& g, const T* t, int64_t img_stride, int64_t rows,            \
                        int64_t q0, int64_t len, T* buf, int64_t ld) {                          \
    gather_impl(g, t, img_stride, rows, q0, len, buf, ld);                                      \
  }                                                                                             \
  PE_CLONES void scatter(const Geometry& g, const T* buf, int64_t ld, const T* bias, T* t,          \
                         int64_t img_stride, int64_t rows, int64_t q0, int64_t len) {           \
    scatter_impl(g, buf, ld, bias, t, img_stride, rows, q0, len);                               \
  }                                                                                             \
  PE_CLONES void row_sums(const T* buf, int64_t ld, int64_t rows, int64_t len, T* out) {        \
    row_sums_impl(buf, ld, rows, len, out);                                                     \
  }                                                                                             \
  PE_CLONES void sum_parts(const T* parts, int64_t nparts, int64_t n, int64_t e0, int64_t e1,   \
                           T* out) {                                                            \
    sum_parts_impl(parts, nparts, n, e0, e1, out);                                              \
  }
PE_FOR_BOTH_DTYPES(PE_DEFINE_CLONES)
#undef PE_DEFINE_CLONES

template <typename T>
void col2im_strip(const Geometry& g, const T* col, int64_t ld, T* dx, int64_t img_stride, int64_t q0,
                  int64_t len) {
  static const bool avx512 = std::strcmp(cpu::gemm_isa(), "avx512") == 0;
  if (!avx512 || g.stride_w != 1) {
    col2im_portable(g, col, ld, dx, img_stride, q0, len);
    return;
  }
  const int64_t khw = g.kernel_pixels(), qend = q0 + len;
  int64_t q = q0;
  while (q < qend) {
    const int64_t n = q / g.out_pixels(), p = q % g.out_pixels(), oh = p / g.out_w, ow = p % g.out_w;
    T* img = dx + n * img_stride;
    const int64_t rows = ow == 0 ? std::min(g.out_h - oh, (qend - q) / g.out_w) : 0;
    if (rows == 0) {  // a partial row at either end of the strip: tap by tap
      const int64_t seg = std::min(g.out_w - ow, qend - q);
      for (int64_t k = 0; k < g.taps_per_group(); ++k) {
        const int64_t ci = k / khw, ki = (k % khw) / g.kernel_w, kj = k % g.kernel_w;
        segment<T, true>(g, const_cast<T*>(col) + k * ld + (q - q0), img + ci * g.in_pixels(), oh,
                         ow, seg, ki * g.dilation_h - g.padding_h, kj * g.dilation_w - g.padding_w);
      }
      q += seg;
      continue;
    }
    col2im_rows_avx512<T>(g, col + (q - q0), ld, img, oh, rows);
    q += rows * g.out_w;
  }
}

template <typename T>
std::vector<T>& scratch(int slot) {
  thread_local std::vector<T> bufs[3];
  return bufs[slot];
}
template <typename T>
T* scratch_ptr(int slot, int64_t n) {
  std::vector<T>& v = scratch<T>(slot);
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// at::parallel_for grain: enough items that a task does ~64K multiply-adds (or element moves);
// a parallel region costs a few microseconds, more than the work of a tiny layer.
int64_t grain_for(double work_per_item) {
  return std::max<int64_t>(1, static_cast<int64_t>(65536.0 / std::max(1.0, work_per_item)));
}

// ---- Batch-innermost path (stride 1, small images, a batch of at least 16) ------------------
// The im2col path copies K x H_out x W_out elements per image for K FMAs each; with LeNet conv2's
// 10-wide output rows that copy, a few cycles per 10 floats, cost as much as the GEMM. With the
// batch innermost ("CHWN": x^T[c, h, w][n]) every tap of every output pixel is a contiguous
// vector over the batch, so no im2col is needed at all:
//   forward      Y^T[co, p][:]  = sum_k W[co, k] X^T[tap k of p][:]       gemm_indirect per pixel
//   grad_input   dX^T[ci, q][:] = sum_(co,ki,kj) W[co, ci, ki, kj] dY^T[co, q - (ki, kj)][:]
//                (a gather over the taps that reach input pixel q: no col2im, no races)
//   grad_weight  dW[co, k] = sum_p dY^T[co, p][:] . X^T[tap k of p][:]   gemm_dot_segments
// Taps in the padding point at a vector of zeros (forward, grad_weight); grad_input gathers
// only the taps that reach a real input pixel. The
// price is transposing x, y, dY and dX (each element moved once) and padding the batch to whole
// vectors. Napkin math, LeNet conv2 at batch 64: 15.4 M multiply-adds per pass, 16 / 6 / 6x4 rows
// per tile run at near peak (~0.14 ms per pass on one core), transposes ~0.35 M elements.

bool use_batch_inner(const Geometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.batch >= 16 && g.out_w <= 16;
}

constexpr int64_t kInnerBatch = 256;  // images per batch chunk

// dst[f * ld + n] = src[n * F + f] for f in [f0, f1), n < nb; zero for nb <= n < nbc.
template <typename T>
PE_INLINE void to_inner_impl(const T* src, int64_t nb, int64_t F, int64_t f0, int64_t f1, T* dst,
                             int64_t ld, int64_t nbc) {
  constexpr int64_t B = 16;
  for (int64_t fb = f0; fb < f1; fb += B) {
    const int64_t fe = std::min(f1, fb + B);
    for (int64_t nbk = 0; nbk < nb; nbk += B) {
      const int64_t ne = std::min(nb, nbk + B);
      for (int64_t f = fb; f < fe; ++f)
        for (int64_t n = nbk; n < ne; ++n) dst[f * ld + n] = src[n * F + f];
    }
    for (int64_t f = fb; f < fe; ++f)
      for (int64_t n = nb; n < nbc; ++n) dst[f * ld + n] = T(0);
  }
}
// dst[n * F + f] = src[f * ld + n] (+ bias[f / P] when bias is not null), n < nb, f in [f0, f1).
template <typename T>
PE_INLINE void from_inner_impl(const T* src, int64_t ld, int64_t nb, int64_t F, int64_t f0,
                               int64_t f1, T* dst, const T* bias, int64_t P) {
  constexpr int64_t B = 16;
  for (int64_t fb = f0; fb < f1; fb += B) {
    const int64_t fe = std::min(f1, fb + B), nf = fe - fb;
    T add[B];
    for (int64_t f = 0; f < nf; ++f) add[f] = bias ? bias[(fb + f) / P] : T(0);
    for (int64_t nbk = 0; nbk < nb; nbk += B) {
      const int64_t ne = std::min(nb, nbk + B);
      for (int64_t n = nbk; n < ne; ++n) {
        T* d = dst + n * F + fb;
        const T* sp = src + fb * ld + n;
        if (bias) {
          for (int64_t f = 0; f < nf; ++f) d[f] = sp[f * ld] + add[f];
        } else {
          for (int64_t f = 0; f < nf; ++f) d[f] = sp[f * ld];
        }
      }
    }
  }
}
#define PE_DEFINE_TRANSPOSES(T)                                                                  \
  PE_CLONES void to_inner(const T* src, int64_t nb, int64_t F, int64_t f0, int64_t f1, T* dst,   \
                          int64_t ld, int64_t nbc) {                                             \
    to_inner_impl(src, nb, F, f0, f1, dst, ld, nbc);                                             \
  }                                                                                              \
  PE_CLONES void from_inner(const T* src, int64_t ld, int64_t nb, int64_t F, int64_t f0,         \
                            int64_t f1, T* dst, const T* bias, int64_t P) {                      \
    from_inner_impl(src, ld, nb, F, f0, f1, dst, bias, P);                                       \
  }
PE_FOR_BOTH_DTYPES(PE_DEFINE_TRANSPOSES)
#undef PE_DEFINE_TRANSPOSES

// AVX-512 versions: one 16-lane (8 for double) gather per output vector; the rows a block of
// gathers touches stay in L1 across consecutive f. Offsets are int32: callers check the range.
template <typename T>
PE_TARGET_AVX512 void to_inner_avx512(const T* src, int64_t nb, int64_t F, int64_t f0,
                                      int64_t f1, T* dst, int64_t ld, int64_t nbc) {
  constexpr int V = 64 / sizeof(T);
  for (int64_t f = f0; f < f1; ++f) {
    T* d = dst + f * ld;
    for (int64_t n0 = 0; n0 < nb; n0 += V) {
      const int64_t cnt = std::min<int64_t>(V, nb - n0);
      const uint32_t m = cnt == 32 ? ~0u : (1u << cnt) - 1u;
      const T* sp = src + n0 * F + f;
      if constexpr (sizeof(T) == 4) {
        const __m512i idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(static_cast<int>(F)));
        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), static_cast<__mmask16>(m),
                                                  idx, sp, 4);
        _mm512_mask_storeu_ps(d + n0, static_cast<__mmask16>(m), v);
      } else {
        const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32(static_cast<int>(F)));
        const __m512d v = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), static_cast<__mmask8>(m),
                                                   idx, sp, 8);
        _mm512_mask_storeu_pd(d + n0, static_cast<__mmask8>(m), v);
      }
    }
    for (int64_t n = nb; n < nbc; ++n) d[n] = T(0);
  }
}
// dst[n * F + f] = src[f * ld + n] + add[f] (add may be null), n < nb, f in [f0, f1).
template <typename T>
PE_TARGET_AVX512 void from_inner_avx512(const T* src, int64_t ld, int64_t nb, int64_t F,
                                        int64_t f0, int64_t f1, T* dst, const T* add) {
  constexpr int V = 64 / sizeof(T);
  for (int64_t n = 0; n < nb; ++n) {
    T* d = dst + n * F;
    for (int64_t fb = f0; fb < f1; fb += V) {
      const int64_t cnt = std::min<int64_t>(V, f1 - fb);
      const uint32_t m = cnt == 32 ? ~0u : (1u << cnt) - 1u;
      const T* sp = src + fb * ld + n;
      if constexpr (sizeof(T) == 4) {
        const __m512i idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(static_cast<int>(ld)));
        __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), static_cast<__mmask16>(m), idx,
                                            sp, 4);
        if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), add + fb));
        _mm512_mask_storeu_ps(d + fb, static_cast<__mmask16>(m), v);
      } else {
        const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               _mm256_set1_epi32(static_cast<int>(ld)));
        __m512d v = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), static_cast<__mmask8>(m), idx,
                                             sp, 8);
        if (add) v = _mm512_add_pd(v, _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), add + fb));
        _mm512_mask_storeu_pd(d + fb, static_cast<__mmask8>(m), v);
      }
    }
  }
}

// 16 x 16 float transpose in registers: d[c * ds + r] = s[r * ss + c] (+ add[r]) for r < nr,
// c < nc. Three stages: 32-bit interleave, 64-bit interleave, 128-bit lane shuffles (twice).
// (GCC 12 flags its own _mm512_undefined_ps inside the unpack intrinsics as uninitialized.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
PE_TARGET_AVX512 inline void transpose16(const float* s, int64_t ss, int64_t nr, int64_t nc,
                                         float* d, int64_t ds, const float* add) {
  const __mmask16 cm = static_cast<__mmask16>(nc == 16 ? 0xffffu : (1u << nc) - 1u);
  const __mmask16 rm = static_cast<__mmask16>(nr == 16 ? 0xffffu : (1u << nr) - 1u);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = i < nr ? _mm512_maskz_loadu_ps(cm, s + i * ss) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    const __m512d a = _mm512_castps_pd(t[k]), b = _mm512_castps_pd(t[k + 1]);
    const __m512d c = _mm512_castps_pd(t[k + 2]), e = _mm512_castps_pd(t[k + 3]);
    r[k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  // r[4k + m], 128-bit lane L: rows 4k..4k+3 of column 4L + m.
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);
    t[8 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
  }
  const __m512 av = add ? _mm512_maskz_loadu_ps(rm, add) : _mm512_setzero_ps();
  for (int m = 0; m < 4; ++m) {
    const __m512 col[4] = {_mm512_shuffle_f32x4(t[m], t[8 + m], 0x88),       // column m
                           _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0x88),  // column 4 + m
                           _mm512_shuffle_f32x4(t[m], t[8 + m], 0xdd),       // column 8 + m
                           _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0xdd)};  // column 12 + m
    for (int L = 0; L < 4; ++L) {
      const int c = 4 * L + m;
      if (c < nc) _mm512_mask_storeu_ps(d + c * ds, rm, add ? _mm512_add_ps(col[L], av) : col[L]);
    }
  }
}
#pragma GCC diagnostic pop

// float: 16 x 16 register transposes over the (f, n) plane.
PE_TARGET_AVX512 void to_inner_avx512_t(const float* src, int64_t nb, int64_t F, int64_t f0,
                                        int64_t f1, float* dst, int64_t ld, int64_t nbc) {
  for (int64_t fb = f0; fb < f1; fb += 16) {
    const int64_t nc = std::min<int64_t>(16, f1 - fb);
    for (int64_t n0 = 0; n0 < nb; n0 += 16)
      transpose16(src + n0 * F + fb, F, std::min<int64_t>(16, nb - n0), nc, dst + fb * ld + n0,
                  ld, nullptr);
    for (int64_t f = fb; f < fb + nc; ++f)
      for (int64_t n = nb; n < nbc; ++n) dst[f * ld + n] = 0.f;
  }
}
PE_TARGET_AVX512 void from_inner_avx512_t(const float* src, int64_t ld, int64_t nb, int64_t F,
                                          int64_t f0, int64_t f1, float* dst, const float* add) {
  for (int64_t fb = f0; fb < f1; fb += 16) {
    const int64_t nr = std::min<int64_t>(16, f1 - fb);
    for (int64_t n0 = 0; n0 < nb; n0 += 16)
      transpose16(src + fb * ld + n0, ld, nr, std::min<int64_t>(16, nb - n0), dst + n0 * F + fb,
                  F, add ? add + fb : nullptr);
  }
}

bool gathers_ok(int64_t stride) {
  static const bool avx512 = std::strcmp(cpu::gemm_isa(), "avx512") == 0;
  return avx512 && stride * 16 < (int64_t(1) << 31);
}

// Transposes move each element once (~10 us for LeNet conv2's 0.1 M at batch 64 on one core):
// below 128 K elements one thread does it, as waking the pool costs about as much.
int64_t transpose_grain(int64_t F, int64_t n) {
  if (F * n < (int64_t(1) << 17)) return F;
  return std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(1, n));
}

template <typename T>
void to_inner_parallel(const T* src, int64_t nb, int64_t F, T* dst, int64_t ld, int64_t nbc) {
  const bool fast = gathers_ok(F);
  at::parallel_for(0, F, transpose_grain(F, nbc), [&](int64_t f0, int64_t f1) {
    if (!fast)
      to_inner(src, nb, F, f0, f1, dst, ld, nbc);
    else if constexpr (std::is_same_v<T, float>)
      to_inner_avx512_t(src, nb, F, f0, f1, dst, ld, nbc);
    else
      to_inner_avx512(src, nb, F, f0, f1, dst, ld, nbc);
  });
}
// `bias` (per channel, P features each) may be null.
template <typename T>
void from_inner_parallel(const T* src, int64_t ld, int64_t nb, int64_t F, T* dst, const T* bias,
                         int64_t P) {
  if (!gathers_ok(ld)) {
    at::parallel_for(0, F, transpose_grain(F, nb), [&](int64_t f0, int64_t f1) {
                       from_inner(src, ld, nb, F, f0, f1, dst, bias, P);
                     });
    return;
  }
  std::vector<T> add(bias ? static_cast<size_t>(F) : 0);
  for (int64_t f = 0; bias && f < F; ++f) add[f] = bias[f / P];
  const T* pa = bias ? add.data() : nullptr;
  // Split by feature blocks of whole vectors, so every task writes whole rows' slices.
  const int64_t V = 64 / static_cast<int64_t>(sizeof(T)), blocks = (F + V - 1) / V;
  at::parallel_for(0, blocks, (transpose_grain(F, nb) + V - 1) / V, [&](int64_t b0, int64_t b1) {
    if constexpr (std::is_same_v<T, float>)
      from_inner_avx512_t(src, ld, nb, F, b0 * V, std::min(F, b1 * V), dst, pa);
    else
      from_inner_avx512(src, ld, nb, F, b0 * V, std::min(F, b1 * V), dst, pa);
  });
}

// Tap k = (ci, ki, kj) of output pixel (oh, ow) reads input pixel (oh + dh[k], ow + dw[k]) of
// channel ci: off[k] = ci * H * W + dh[k] * W + dw[k] from (channel 0, oh, ow).
struct Taps {
  std::vector<int64_t> dh, dw, off;
  IndexRange inner_rows, inner_cols;  // output pixels whose taps are all inside the image
  bool interior(int64_t oh, int64_t ow) const {
    return inner_rows.contains(oh) && inner_cols.contains(ow);
  }
};
Taps make_taps(const Geometry& g) {
  Taps t;
  const int64_t khw = g.kernel_pixels();
  for (int64_t k = 0; k < g.taps_per_group(); ++k) {
    const int64_t ci = k / khw, ki = (k % khw) / g.kernel_w, kj = k % g.kernel_w;
    t.dh.push_back(ki * g.dilation_h - g.padding_h);
    t.dw.push_back(kj * g.dilation_w - g.padding_w);
    t.off.push_back(ci * g.in_pixels() + t.dh.back() * g.in_w + t.dw.back());
  }
  t.inner_rows = g.inner_rows();
  t.inner_cols = g.inner_cols();
  return t;
}

template <typename T>
void conv2d_forward_inner(const Geometry& g, const T* x, const T* w, const T* bias, T* y) {
  const int64_t vw = cpu::simd_width<T>();
  const int64_t f_in = g.in_image(), f_out = g.out_image(), hw = g.in_pixels();
  const int64_t chunk = std::min(g.batch, kInnerBatch), ld = round_up(chunk, vw);
  std::vector<T> xt(static_cast<size_t>(f_in * ld)), yt(static_cast<size_t>(f_out * ld));
  // W^T per group: wt[grp][k][co], so a tap's weights are a contiguous column of M = C_out/g.
  std::vector<T> wt(static_cast<size_t>(g.out_channels * g.taps_per_group()));
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t co = 0; co < g.out_channels_per_group(); ++co)
      for (int64_t k = 0; k < g.taps_per_group(); ++k)
        wt[(grp * g.taps_per_group() + k) * g.out_channels_per_group() + co] = w[(grp * g.out_channels_per_group() + co) * g.taps_per_group() + k];
  const Taps taps = make_taps(g);
  std::vector<const T*> wrows(static_cast<size_t>(g.groups * g.taps_per_group()));  // every tap's weights
  for (int64_t k = 0; k < g.groups * g.taps_per_group(); ++k) wrows[k] = wt.data() + k * g.out_channels_per_group();
  // Taps in the padding read zeros rather than being left out: 0 * (an inf or NaN weight) must
  // give NaN, as in torch and the im2col path. Only border pixels have such taps.
  const std::vector<T> zeros(static_cast<size_t>(ld), T(0));
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - n0), nbc = round_up(nb, vw);
    to_inner_parallel(x + n0 * f_in, nb, f_in, xt.data(), ld, nbc);
    at::parallel_for(0, g.out_pixels(), grain_for(double(g.out_channels * g.taps_per_group() * nbc)), [&](int64_t p0, int64_t p1) {
      std::vector<const T*> brows(static_cast<size_t>(g.taps_per_group()));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t oh = p / g.out_w, ow = p % g.out_w;
        const bool inside = taps.interior(oh, ow);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const T* xg = xt.data() + (grp * g.in_channels_per_group() * hw + oh * g.in_w + ow) * ld;
          for (int64_t k = 0; k < g.taps_per_group(); ++k) {
            const int64_t ih = oh + taps.dh[k], iw = ow + taps.dw[k];
            const bool padding = !inside && (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w);
            brows[k] = padding ? zeros.data() : xg + taps.off[k] * ld;
          }
          cpu::gemm_indirect<T>(g.out_channels_per_group(), nbc, g.taps_per_group(), wrows.data() + grp * g.taps_per_group(), brows.data(),
                                yt.data() + (grp * g.out_channels_per_group() * g.out_pixels() + p) * ld, g.out_pixels() * ld, 1, false);
        }
      }
    });
    from_inner_parallel(yt.data(), ld, nb, f_out, y + n0 * f_out, bias, g.out_pixels());
  }
}

template <typename T>
void conv2d_backward_inner(const Geometry& g, const T* dy, const T* x, const T* w, T* dx, T* dw,
                           T* db) {
  const int64_t vw = cpu::simd_width<T>();
  const int64_t f_in = g.in_image(), f_out = g.out_image(), hw = g.in_pixels();
  const int64_t chunk = std::min(g.batch, kInnerBatch), ld = round_up(chunk, vw);
  const int64_t khw = g.kernel_pixels();
  std::vector<T> dyt(static_cast<size_t>(f_out * ld));
  std::vector<T> xt(dw ? static_cast<size_t>(f_in * ld) : 0);
  std::vector<T> dxt(dx ? static_cast<size_t>(f_in * ld) : 0);
  std::vector<T> zeros(dw ? static_cast<size_t>(ld) : 0, T(0));
  std::vector<const T*> taps(dw ? static_cast<size_t>(g.out_pixels() * g.taps_per_group()) : 0);
  const Taps tap = make_taps(g);
  // For grad_input: weights as [co][ki][kj][ci], so a tap's weights over C_in/g are contiguous.
  std::vector<T> wt(dx ? static_cast<size_t>(g.out_channels * g.taps_per_group()) : 0);
  if (dx)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t ci = 0; ci < g.in_channels_per_group(); ++ci)
        for (int64_t r = 0; r < khw; ++r)
          wt[(co * khw + r) * g.in_channels_per_group() + ci] = w[(co * g.in_channels_per_group() + ci) * khw + r];
  if (db) std::fill(db, db + g.out_channels, T(0));
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - n0), nbc = round_up(nb, vw);
    to_inner_parallel(dy + n0 * f_out, nb, f_out, dyt.data(), ld, nbc);
    // db[co] += sum over pixels of dY^T[co, p, :nbc] (the batch padding is zero): vectorised,
    // pixels and batch chunks in order.
    if (db)
      for (int64_t co = 0; co < g.out_channels; ++co)
        for (int64_t p = 0; p < g.out_pixels(); ++p)
          row_sums(dyt.data() + (co * g.out_pixels() + p) * ld, 0, 1, nbc, db + co);
    if (dw) {
      to_inner_parallel(x + n0 * f_in, nb, f_in, xt.data(), ld, nbc);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        for (int64_t p = 0; p < g.out_pixels(); ++p) {
          const int64_t oh = p / g.out_w, ow = p % g.out_w;
          const T* xg = xt.data() + (grp * g.in_channels_per_group() * hw + oh * g.in_w + ow) * ld;
          const T** row = taps.data() + p * g.taps_per_group();
          if (tap.interior(oh, ow)) {
            for (int64_t k = 0; k < g.taps_per_group(); ++k) row[k] = xg + tap.off[k] * ld;
          } else {
            for (int64_t k = 0; k < g.taps_per_group(); ++k) {
              const int64_t ih = oh + tap.dh[k], iw = ow + tap.dw[k];
              row[k] = (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) ? zeros.data()
                                                                     : xg + tap.off[k] * ld;
            }
          }
        }
        // dW[co, k] (+)= sum over pixels p and the batch of dY^T[co, p][:] X^T[tap k of p][:]
        cpu::gemm_dot_segments<T>(g.out_channels_per_group(), g.taps_per_group(), g.out_pixels(), nbc, dyt.data() + grp * g.out_channels_per_group() * g.out_pixels() * ld,
                                  g.out_pixels() * ld, ld, taps.data(), dw + grp * g.out_channels_per_group() * g.taps_per_group(), g.taps_per_group(), 1,
                                  /*accumulate=*/n0 > 0);
      }
    }
    if (dx) {
      const double pixel_work = double(g.out_channels * g.taps_per_group() * nbc) * g.out_pixels() / std::max<int64_t>(1, hw);
      at::parallel_for(0, hw, grain_for(pixel_work), [&](int64_t q0, int64_t q1) {
        const size_t most = static_cast<size_t>(g.out_channels_per_group() * khw);
        std::vector<const T*> arows(most), brows(most);
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t ih = q / g.in_w, iw = q % g.in_w;
          // Taps (ki, kj) that reach input pixel (ih, iw): oh = ih + ph - ki*dh in [0, OH),
          // ow = iw + pw - kj*dw in [0, OW): a range of ki and a range of kj.
          auto range = [](int64_t i, int64_t pad, int64_t d, int64_t out, int64_t k,
                          int64_t& lo, int64_t& hi) {
            const int64_t top = i + pad;  // k*d <= top and k*d > top - out
            lo = top - out + 1 <= 0 ? 0 : (top - out + 1 + d - 1) / d;
            hi = top < 0 ? 0 : std::min(k, top / d + 1);
          };
          int64_t ki_lo, ki_hi, kj_lo, kj_hi;
          range(ih, g.padding_h, g.dilation_h, g.out_h, g.kernel_h, ki_lo, ki_hi);
          range(iw, g.padding_w, g.dilation_w, g.out_w, g.kernel_w, kj_lo, kj_hi);
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            int64_t count = 0;
            for (int64_t co = grp * g.out_channels_per_group(); co < (grp + 1) * g.out_channels_per_group(); ++co)
              for (int64_t ki = ki_lo; ki < ki_hi; ++ki) {
                const int64_t oh = ih + g.padding_h - ki * g.dilation_h;
                const T* a = wt.data() + (co * khw + ki * g.kernel_w + kj_lo) * g.in_channels_per_group();
                const T* b = dyt.data() + (co * g.out_pixels() + oh * g.out_w + iw + g.padding_w - kj_lo * g.dilation_w) * ld;
                for (int64_t kj = kj_lo; kj < kj_hi; ++kj, a += g.in_channels_per_group(), b -= g.dilation_w * ld) {
                  arows[count] = a;
                  brows[count] = b;
                  ++count;
                }
              }
            cpu::gemm_indirect<T>(g.in_channels_per_group(), nbc, count, arows.data(), brows.data(),
                                  dxt.data() + (grp * g.in_channels_per_group() * hw + q) * ld, hw * ld, 1, false);
          }
        }
      });
      from_inner_parallel(dxt.data(), ld, nb, f_in, dx + n0 * f_in, static_cast<const T*>(nullptr),
                          1);
    }
  }
}

template <typename T>
void conv2d_forward(const Geometry& g, const T* x, const T* w, const T* bias, T* y) {
  const Split sp = make_split(g, sizeof(T));
  const int64_t in_img = g.in_image(), out_img = g.out_image();
  const bool pointwise = g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 && g.padding_h == 0 &&
                         g.padding_w == 0;
  const double chunk_work = double(sp.images_per_chunk) * g.out_channels * g.taps_per_group() * g.out_pixels();
  at::parallel_for(0, sp.chunks, grain_for(chunk_work), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * sp.images_per_chunk;
      const int64_t nimg = std::min(sp.images_per_chunk, g.batch - n0);
      const int64_t cols = nimg * g.out_pixels();
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const T* xg = x + n0 * in_img + grp * g.in_channels_per_group() * g.in_pixels();
        T* yg = y + n0 * out_img + grp * g.out_channels_per_group() * g.out_pixels();
        const T* wg = w + grp * g.out_channels_per_group() * g.taps_per_group();
        const T* bg = bias ? bias + grp * g.out_channels_per_group() : nullptr;
        if (pointwise) {  // 1x1, stride 1, no padding: the input is its own im2col
          for (int64_t n = 0; n < nimg; ++n) {
            T* yn = yg + n * out_img;
            if (bg)
              for (int64_t co = 0; co < g.out_channels_per_group(); ++co)
                std::fill(yn + co * g.out_pixels(), yn + (co + 1) * g.out_pixels(), bg[co]);
            cpu::gemm<T>(g.out_channels_per_group(), g.out_pixels(), g.taps_per_group(), wg, g.taps_per_group(), 1, xg + n * in_img, g.out_pixels(), 1, yn, g.out_pixels(), 1,
                         bg != nullptr);
          }
          continue;
        }
        for (int64_t q0 = 0; q0 < cols; q0 += sp.strip) {
          const int64_t len = std::min(sp.strip, cols - q0);
          T* col = scratch_ptr<T>(0, g.taps_per_group() * len);
          T* out = scratch_ptr<T>(1, g.out_channels_per_group() * len);
          im2col(g, xg, in_img, q0, len, col, len);
          cpu::gemm<T>(g.out_channels_per_group(), len, g.taps_per_group(), wg, g.taps_per_group(), 1, col, len, 1, out, len, 1, false);
          scatter(g, out, len, bg, yg, out_img, g.out_channels_per_group(), q0, len);
        }
      }
    }
  });
}

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups) {
  const Geometry g = check_conv2d<int64_t>(input, weight, bias, stride, padding, dilation, groups);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  const bool channels_last = conv2d_channels_last(input, weight);
  Tensor out = at::empty(g.output_sizes(), x.options());
  if (out.numel() == 0) return as_image_layout(out, channels_last);
  dispatch_floating(x.scalar_type(), "conv2d", [&](auto tag) {
    using T = decltype(tag);
    if (use_batch_inner(g)) {
      conv2d_forward_inner<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                              has_bias ? b.const_data_ptr<T>() : nullptr,
                              out.mutable_data_ptr<T>());
      return;
    }
    conv2d_forward<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                      has_bias ? b.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>());
  });
  return as_image_layout(out, channels_last);
}

// ---- Backward -----------------------------------------------------------------------------

template <typename T>
void conv2d_backward_impl(const Geometry& g, const T* dy, const T* x, const T* w, T* dx, T* dw,
                          T* db) {
  const Split sp = make_split(g, sizeof(T));
  const int64_t in_img = g.in_image(), out_img = g.out_image();
  const bool reduce = dw || db;
  // Slots: consecutive chunks summed in order into one partial. At most 32, and the partials
  // capped at ~32 MB; with no reduction every chunk is its own task.
  int64_t slots = sp.chunks;
  const int64_t part = g.out_channels * g.taps_per_group() + g.out_channels;
  if (reduce) {
    const int64_t cap = std::max<int64_t>(
        1, (int64_t(32) << 20) / (std::max<int64_t>(1, part) * static_cast<int64_t>(sizeof(T))));
    slots = std::min({slots, int64_t(32), cap});
  }
  const int64_t chunks_per_slot = (sp.chunks + slots - 1) / slots;
  slots = (sp.chunks + chunks_per_slot - 1) / chunks_per_slot;
  std::vector<T> parts(reduce ? static_cast<size_t>(slots * part) : 0, T(0));
  const int64_t vw = cpu::simd_width<T>();

  const double slot_work = double(chunks_per_slot) * sp.images_per_chunk * g.out_channels * g.taps_per_group() * g.out_pixels() *
                           ((dx ? 1 : 0) + (dw ? 1 : 0) + (db ? 0.1 : 0));
  at::parallel_for(0, slots, grain_for(slot_work), [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      T* dw_part = reduce ? parts.data() + slot * part : nullptr;
      T* db_part = reduce ? dw_part + g.out_channels * g.taps_per_group() : nullptr;
      const int64_t cend = std::min(sp.chunks, (slot + 1) * chunks_per_slot);
      for (int64_t c = slot * chunks_per_slot; c < cend; ++c) {
        const int64_t n0 = c * sp.images_per_chunk;
        const int64_t nimg = std::min(sp.images_per_chunk, g.batch - n0);
        const int64_t cols = nimg * g.out_pixels();
        if (dx) std::fill(dx + n0 * in_img, dx + (n0 + nimg) * in_img, T(0));
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const T* xg = x + n0 * in_img + grp * g.in_channels_per_group() * g.in_pixels();
          const T* dyg = dy + n0 * out_img + grp * g.out_channels_per_group() * g.out_pixels();
          T* dxg = dx ? dx + n0 * in_img + grp * g.in_channels_per_group() * g.in_pixels() : nullptr;
          const T* wg = w + grp * g.out_channels_per_group() * g.taps_per_group();
          for (int64_t q0 = 0; q0 < cols; q0 += sp.strip) {
            const int64_t len = std::min(sp.strip, cols - q0);
            const int64_t ld = round_up(len, vw);  // zero-padded: dot kernel needs no tail
            T* dyc = scratch_ptr<T>(0, g.out_channels_per_group() * ld);
            gather(g, dyg, out_img, g.out_channels_per_group(), q0, len, dyc, ld);
            if (db) row_sums(dyc, ld, g.out_channels_per_group(), len, db_part + grp * g.out_channels_per_group());
            if (dw) {
              T* col = scratch_ptr<T>(1, g.taps_per_group() * ld);
              im2col(g, xg, in_img, q0, len, col, ld);
              // dW[co, k] += sum_j dY[co, j] Xcol[k, j]
              cpu::gemm<T>(g.out_channels_per_group(), g.taps_per_group(), ld, dyc, ld, 1, col, 1, ld, dw_part + grp * g.out_channels_per_group() * g.taps_per_group(),
                           g.taps_per_group(), 1, true);
            }
            if (dx) {
              T* dcol = scratch_ptr<T>(2, g.taps_per_group() * len);
              // dXcol[k, j] = sum_co W[co, k] dY[co, j]
              cpu::gemm<T>(g.taps_per_group(), len, g.out_channels_per_group(), wg, 1, g.taps_per_group(), dyc, ld, 1, dcol, len, 1, false);
              col2im_strip(g, dcol, len, dxg, in_img, q0, len);
            }
          }
        }
      }
    }
  });

  // Partials, added in slot order.
  if (dw) {
    const int64_t n = g.out_channels * g.taps_per_group();
    at::parallel_for(0, n, 4096, [&](int64_t e0, int64_t e1) {
      sum_parts(parts.data(), slots, part, e0, e1, dw);
    });
  }
  if (db) sum_parts(parts.data() + g.out_channels * g.taps_per_group(), slots, part, 0, g.out_channels, db);
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cpu(const Tensor& grad_output,
                                                       const Tensor& input, const Tensor& weight,
                                                       at::IntArrayRef stride,
                                                       at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups,
                                                       std::array<bool, 3> mask) {
  const Geometry g = check_conv2d_backward<int64_t>(grad_output, input, weight, stride, padding,
                                                dilation, groups);
  const Tensor dy = grad_output.contiguous();
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  Tensor grad_input, grad_weight, grad_bias;
  if (mask[0]) grad_input = at::empty(input.sizes(), x.options());
  if (mask[1]) grad_weight = at::empty(weight.sizes(), x.options());
  if (mask[2]) grad_bias = at::empty({g.out_channels}, x.options());
  dispatch_floating(x.scalar_type(), "conv2d_backward", [&](auto tag) {
    using T = decltype(tag);
    T* dx = mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr;
    T* dw = mask[1] ? grad_weight.mutable_data_ptr<T>() : nullptr;
    T* db = mask[2] ? grad_bias.mutable_data_ptr<T>() : nullptr;
    if (g.batch == 0) {  // empty batch: no contribution
      if (dw) std::fill(dw, dw + grad_weight.numel(), T(0));
      if (db) std::fill(db, db + g.out_channels, T(0));
      return;
    }
    if (!dx && !dw && !db) return;
    if (use_batch_inner(g)) {
      conv2d_backward_inner<T>(g, dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                               w.const_data_ptr<T>(), dx, dw, db);
      return;
    }
    conv2d_backward_impl<T>(g, dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                            w.const_data_ptr<T>(), dx, dw, db);
  });
  const bool channels_last = conv2d_channels_last(input, weight);
  if (mask[0]) grad_input = as_image_layout(grad_input, channels_last);
  if (mask[1]) grad_weight = as_image_layout(grad_weight, channels_last);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("conv2d", conv2d_cpu);
  m.impl("conv2d_backward", conv2d_backward_cpu);
}

}  // namespace pyengine
