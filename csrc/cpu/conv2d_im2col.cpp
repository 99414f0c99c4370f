// The im2col algorithm of the CPU conv2d kernels (interface: cpu/conv2d.h; how it is chosen and
// the napkin math: cpu/conv2d.cpp). Per group g, with K = (C_in / groups) * kH * kW taps and the
// output pixels of a run of images as the columns j (image-major, so several small images make
// one wide GEMM):
//   forward      Y[co, j]  = sum_k W[co, k] Xcol[k, j]          gemm(C_out/g, cols, K)
//   grad_weight  dW[co, k] = sum_j dY[co, j] Xcol[k, j]         gemm(C_out/g, K, cols): the dot
//                                                               kernel, both operands along j
//   grad_input   dXcol[k, j] = sum_co W[co, k] dY[co, j]        gemm(K, cols, C_out/g), then
//                                                               col2im adds dXcol into dX
//   grad_bias    db[co] = sum_j dY[co, j]
// The batch is cut into chunks of `images_per_chunk` images (from the shapes only); a chunk's
// columns go in strips of at most `strip` columns, so the im2col scratch (K x strip) stays in L2
// whatever the image size. at::parallel_for runs chunks (forward, and grad_input alone) or "slots"
// of consecutive chunks (when grad_weight / grad_bias are wanted): a slot sums its chunks'
// contributions in chunk order into its own partial, and the partials are added in slot order at
// the end. col2im of a chunk touches only the chunk's own images, so grad_input needs no
// reduction. Deterministic: the order of every sum depends on the shapes only.
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/conv2d.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"

namespace pyengine {
namespace cpu {
namespace conv2d {
namespace {

// How the batch is cut (from the shapes only: see the top of the file).
struct Split {
  int64_t strip;             // max columns per GEMM
  int64_t images_per_chunk;  // images whose columns are merged
  int64_t chunks;
};

Split make_split(const Geometry& g, size_t elem) {
  Split s;
  // K x strip scratch of ~256 KB (L2), at least 64 columns.
  const int64_t bytes_per_col =
      std::max<int64_t>(1, g.taps_per_group()) * static_cast<int64_t>(elem);
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
// level's build), instead of a scalar loop for short rows.
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
// (the LeNet rows are 10 and 28 floats); the portable ones serve the AVX2 and baseline levels.
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
#define PE_DEFINE_BLOCKS(T)                                                                   \
  PE_ISA_FUNCTION(Family::Conv2d, void, copy_block,                                           \
                  (T* d, int64_t ds, const T* s, int64_t ss, int64_t rows, int64_t n),       \
                  (d, ds, s, ss, rows, n), copy_block_impl<T>)                                \
  PE_ISA_FUNCTION(Family::Conv2d, void, add_block,                                            \
                  (T* d, int64_t ds, const T* s, int64_t ss, int64_t rows, int64_t n),       \
                  (d, ds, s, ss, rows, n), add_block_impl<T>)
PE_DEFINE_BLOCKS(float)
PE_DEFINE_BLOCKS(double)
#undef PE_DEFINE_BLOCKS

PE_TARGET_AVX512 void copy_block_masked_avx512(float* d, int64_t ds, const float* s, int64_t ss,
                                        int64_t rows, int64_t n) {
  const int64_t full = n / 16 * 16;
  const __mmask16 m = static_cast<__mmask16>((1u << (n - full)) - 1u);
  for (int64_t r = 0; r < rows; ++r, d += ds, s += ss) {
    for (int64_t t = 0; t < full; t += 16) _mm512_storeu_ps(d + t, _mm512_loadu_ps(s + t));
    if (m) _mm512_mask_storeu_ps(d + full, m, _mm512_maskz_loadu_ps(m, s + full));
  }
}
PE_TARGET_AVX512 void copy_block_masked_avx512(double* d, int64_t ds, const double* s, int64_t ss,
                                        int64_t rows, int64_t n) {
  const int64_t full = n / 8 * 8;
  const __mmask8 m = static_cast<__mmask8>((1u << (n - full)) - 1u);
  for (int64_t r = 0; r < rows; ++r, d += ds, s += ss) {
    for (int64_t t = 0; t < full; t += 8) _mm512_storeu_pd(d + t, _mm512_loadu_pd(s + t));
    if (m) _mm512_mask_storeu_pd(d + full, m, _mm512_maskz_loadu_pd(m, s + full));
  }
}
// Picked once per dtype.
template <typename T>
struct BlockOps {
  void (*copy)(T*, int64_t, const T*, int64_t, int64_t, int64_t);
  void (*add)(T*, int64_t, const T*, int64_t, int64_t, int64_t);
};
template <typename T>
const BlockOps<T>& block_ops() {
  static const BlockOps<T> ops = [] {
    if (cpu::isa_for(cpu::Family::Conv2d) == cpu::Isa::Avx512)
      return BlockOps<T>{copy_block_masked_avx512, add_block};  // AVX-512 col2im: see below
    return BlockOps<T>{copy_block, add_block};
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
PE_INLINE void im2col_impl(const Geometry& geom, T* x, int64_t img_stride, int64_t q0,
                           int64_t len, T* col, int64_t ld) {
  // Local copies: the byte-wise copies below could otherwise alias the geometry, which the
  // compiler would then reload on every row.
  const Geometry g = geom;
  const int64_t H = g.in_h, W = g.in_w, OW = g.out_w, OH = g.out_h, P = g.out_pixels();
  const int64_t sh = g.stride_h, sw = g.stride_w, K = g.taps_per_group();
  const int64_t khw = g.kernel_pixels(), qend = q0 + len;
  const BlockOps<T>& ops = block_ops<T>();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ci = k / khw, ki = (k % khw) / g.kernel_w, kj = k % g.kernel_w;
    const int64_t ihoff = ki * g.dilation_h - g.padding_h;
    const int64_t iwoff = kj * g.dilation_w - g.padding_w;
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
PE_TARGET_AVX512 void col2im_rows_avx512(const Geometry& geom, const T* colq, int64_t ld,
                                         T* dximg, int64_t oh0, int64_t rows) {
  constexpr int V = 64 / sizeof(T);
  const Geometry g = geom;
  const int64_t cin_g = g.in_channels_per_group();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t oh = oh0 + r;
    const T* colrow = colq + r * g.out_w;
    for (int64_t ci = 0; ci < cin_g; ++ci)
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
void col2im_strip(const Geometry& g, const T* col, int64_t ld, T* dx, int64_t img_stride,
                  int64_t q0, int64_t len);

// Between a [rows x ld] scratch of a strip and an NCHW tensor: `t` points at the run's first image,
// channel 0 of the group, images `img_stride` apart, channels P apart.
// to_scratch: buf[r, j] = t[..] for j < len, 0 for len <= j < ld.
template <typename T>
PE_INLINE void gather_impl(const Geometry& g, const T* t, int64_t img_stride, int64_t rows,
                           int64_t q0, int64_t len, T* buf, int64_t ld) {
  const int64_t P = g.out_pixels();
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = buf + r * ld;
    int64_t q = q0;
    while (q < q0 + len) {
      const int64_t n = q / P, p = q % P;
      const int64_t seg = std::min(P - p, q0 + len - q);
      const T* src = t + n * img_stride + r * P + p;
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
  const int64_t P = g.out_pixels();
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = buf + r * ld;
    const T b = bias ? bias[r] : T(0);
    int64_t q = q0;
    while (q < q0 + len) {
      const int64_t n = q / P, p = q % P;
      const int64_t seg = std::min(P - p, q0 + len - q);
      T* dst = t + n * img_stride + r * P + p;
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

// The memory-bound loops above, built for every level (cpu/isa.h).
template <typename T>
PE_INLINE void im2col_body(const Geometry& g, const T* x, int64_t img_stride, int64_t q0,
                           int64_t len, T* col, int64_t ld) {
  im2col_impl<T, false>(g, const_cast<T*>(x), img_stride, q0, len, col, ld);
}
template <typename T>
PE_INLINE void col2im_body(const Geometry& g, const T* col, int64_t ld, T* dx,
                           int64_t img_stride, int64_t q0, int64_t len) {
  im2col_impl<T, true>(g, dx, img_stride, q0, len, const_cast<T*>(col), ld);
}
#define PE_DEFINE_STRIP_LOOPS(T)                                                               \
  PE_ISA_FUNCTION(Family::Conv2d, void, im2col,                                                \
                  (const Geometry& g, const T* x, int64_t img_stride, int64_t q0, int64_t len, \
                   T* col, int64_t ld),                                                        \
                  (g, x, img_stride, q0, len, col, ld), im2col_body<T>)                        \
  PE_ISA_FUNCTION(Family::Conv2d, void, col2im_portable,                                       \
                  (const Geometry& g, const T* col, int64_t ld, T* dx, int64_t img_stride,     \
                   int64_t q0, int64_t len),                                                   \
                  (g, col, ld, dx, img_stride, q0, len), col2im_body<T>)                       \
  PE_ISA_FUNCTION(Family::Conv2d, void, gather,                                                \
                  (const Geometry& g, const T* t, int64_t img_stride, int64_t rows, int64_t q0, \
                   int64_t len, T* buf, int64_t ld),                                           \
                  (g, t, img_stride, rows, q0, len, buf, ld), gather_impl<T>)                  \
  PE_ISA_FUNCTION(Family::Conv2d, void, scatter,                                               \
                  (const Geometry& g, const T* buf, int64_t ld, const T* bias, T* t,           \
                   int64_t img_stride, int64_t rows, int64_t q0, int64_t len),                 \
                  (g, buf, ld, bias, t, img_stride, rows, q0, len), scatter_impl<T>)           \
  PE_ISA_FUNCTION(Family::Conv2d, void, sum_parts,                                             \
                  (const T* parts, int64_t nparts, int64_t n, int64_t e0, int64_t e1, T* out), \
                  (parts, nparts, n, e0, e1, out), sum_parts_impl<T>)
PE_DEFINE_STRIP_LOOPS(float)
PE_DEFINE_STRIP_LOOPS(double)
#undef PE_DEFINE_STRIP_LOOPS

template <typename T>
void col2im_strip(const Geometry& g, const T* col, int64_t ld, T* dx, int64_t img_stride,
                  int64_t q0, int64_t len) {
  static const bool avx512 = cpu::isa_for(Family::Conv2d) == cpu::Isa::Avx512;
  if (!avx512 || g.stride_w != 1) {
    col2im_portable(g, col, ld, dx, img_stride, q0, len);
    return;
  }
  const int64_t khw = g.kernel_pixels(), K = g.taps_per_group(), P = g.out_pixels();
  const int64_t OW = g.out_w, qend = q0 + len;
  int64_t q = q0;
  while (q < qend) {
    const int64_t n = q / P, p = q % P, oh = p / OW, ow = p % OW;
    T* img = dx + n * img_stride;
    const int64_t rows = ow == 0 ? std::min(g.out_h - oh, (qend - q) / OW) : 0;
    if (rows == 0) {  // a partial row at either end of the strip: tap by tap
      const int64_t seg = std::min(OW - ow, qend - q);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t ci = k / khw, ki = (k % khw) / g.kernel_w, kj = k % g.kernel_w;
        segment<T, true>(g, const_cast<T*>(col) + k * ld + (q - q0), img + ci * g.in_pixels(),
                         oh, ow, seg, ki * g.dilation_h - g.padding_h,
                         kj * g.dilation_w - g.padding_w);
      }
      q += seg;
      continue;
    }
    col2im_rows_avx512<T>(g, col + (q - q0), ld, img, oh, rows);
    q += rows * OW;
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

}  // namespace

template <typename T>
void forward_im2col(const Geometry& g, const T* x, const T* w, const T* bias, T* y) {
  const Split sp = make_split(g, sizeof(T));
  // The GEMM's sizes: K taps per group, P output pixels per image.
  const int64_t K = g.taps_per_group(), P = g.out_pixels();
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t in_img = g.in_image(), out_img = g.out_image();
  const bool pointwise = g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 &&
                         g.stride_w == 1 && g.padding_h == 0 && g.padding_w == 0;
  const double chunk_work = double(sp.images_per_chunk) * g.out_channels * K * P;
  at::parallel_for(0, sp.chunks, grain_for(chunk_work), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * sp.images_per_chunk;
      const int64_t nimg = std::min(sp.images_per_chunk, g.batch - n0);
      const int64_t cols = nimg * P;
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const T* xg = x + n0 * in_img + grp * cin_g * g.in_pixels();
        T* yg = y + n0 * out_img + grp * cout_g * P;
        const T* wg = w + grp * cout_g * K;
        const T* bg = bias ? bias + grp * cout_g : nullptr;
        if (pointwise) {  // 1x1, stride 1, no padding: the input is its own im2col
          // The bias set by gemm tile by tile, in cache: one image's 256 x 3136 outputs filled
          // with it first went to memory and back (64->256 @56: 1.37 ms an image on one thread,
          // where the GEMM alone takes 0.63).
          for (int64_t n = 0; n < nimg; ++n)
            cpu::gemm<T>(cout_g, P, K, wg, K, 1, xg + n * in_img, P, 1, yg + n * out_img, P, 1,
                         false, bg, /*bias_per_row=*/true);
          continue;
        }
        for (int64_t q0 = 0; q0 < cols; q0 += sp.strip) {
          const int64_t len = std::min(sp.strip, cols - q0);
          T* col = scratch_ptr<T>(0, K * len);
          T* out = scratch_ptr<T>(1, cout_g * len);
          im2col(g, xg, in_img, q0, len, col, len);
          cpu::gemm<T>(cout_g, len, K, wg, K, 1, col, len, 1, out, len, 1, false);
          scatter(g, out, len, bg, yg, out_img, cout_g, q0, len);
        }
      }
    }
  });
}

template <typename T>
void backward_im2col(const Geometry& g, const T* dy, const T* x, const T* w, T* dx, T* dw,
                     T* db) {
  const Split sp = make_split(g, sizeof(T));
  const int64_t K = g.taps_per_group(), P = g.out_pixels();
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t in_img = g.in_image(), out_img = g.out_image();
  const bool reduce = dw || db;
  // Slots: consecutive chunks summed in order into one partial (dW, then db). At most 32, and
  // the partials capped at ~32 MB; with no reduction every chunk is its own task.
  int64_t slots = sp.chunks;
  const int64_t dw_size = g.out_channels * K, part = dw_size + g.out_channels;
  if (reduce) {
    const int64_t cap = std::max<int64_t>(
        1, (int64_t(32) << 20) / (std::max<int64_t>(1, part) * static_cast<int64_t>(sizeof(T))));
    slots = std::min({slots, int64_t(32), cap});
  }
  const int64_t chunks_per_slot = (sp.chunks + slots - 1) / slots;
  slots = (sp.chunks + chunks_per_slot - 1) / chunks_per_slot;
  CachedBuffer<T> parts(reduce ? static_cast<size_t>(slots * part) : 0);
  const int64_t vw = cpu::simd_width<T>();

  const double slot_work = double(chunks_per_slot) * sp.images_per_chunk * g.out_channels * K *
                           P * ((dx ? 1 : 0) + (dw ? 1 : 0) + (db ? 0.1 : 0));
  at::parallel_for(0, slots, grain_for(slot_work), [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      T* dw_part = reduce ? parts.data() + slot * part : nullptr;
      T* db_part = reduce ? dw_part + dw_size : nullptr;
      const int64_t cend = std::min(sp.chunks, (slot + 1) * chunks_per_slot);
      for (int64_t c = slot * chunks_per_slot; c < cend; ++c) {
        const int64_t n0 = c * sp.images_per_chunk;
        const int64_t nimg = std::min(sp.images_per_chunk, g.batch - n0);
        const int64_t cols = nimg * P;
        if (dx) std::fill(dx + n0 * in_img, dx + (n0 + nimg) * in_img, T(0));
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const T* xg = x + n0 * in_img + grp * cin_g * g.in_pixels();
          const T* dyg = dy + n0 * out_img + grp * cout_g * P;
          T* dxg = dx ? dx + n0 * in_img + grp * cin_g * g.in_pixels() : nullptr;
          const T* wg = w + grp * cout_g * K;
          for (int64_t q0 = 0; q0 < cols; q0 += sp.strip) {
            const int64_t len = std::min(sp.strip, cols - q0);
            const int64_t ld = round_up(len, vw);  // zero-padded: dot kernel needs no tail
            T* dyc = scratch_ptr<T>(0, cout_g * ld);
            gather(g, dyg, out_img, cout_g, q0, len, dyc, ld);
            if (db) row_sums(dyc, ld, cout_g, len, db_part + grp * cout_g);
            if (dw) {
              T* col = scratch_ptr<T>(1, K * ld);
              im2col(g, xg, in_img, q0, len, col, ld);
              // dW[co, k] += sum_j dY[co, j] Xcol[k, j]
              cpu::gemm<T>(cout_g, K, ld, dyc, ld, 1, col, 1, ld, dw_part + grp * cout_g * K, K, 1,
                           true);
            }
            if (dx) {
              T* dcol = scratch_ptr<T>(2, K * len);
              // dXcol[k, j] = sum_co W[co, k] dY[co, j]
              cpu::gemm<T>(K, len, cout_g, wg, 1, K, dyc, ld, 1, dcol, len, 1, false);
              col2im_strip(g, dcol, len, dxg, in_img, q0, len);
            }
          }
        }
      }
    }
  });

  // Partials, added in slot order.
  if (dw) {
    at::parallel_for(0, dw_size, 4096, [&](int64_t e0, int64_t e1) {
      sum_parts(parts.data(), slots, part, e0, e1, dw);
    });
  }
  if (db) sum_parts(parts.data() + dw_size, slots, part, 0, g.out_channels, db);
}

template <typename T>
void backward_input_pointwise(const Geometry& g, const T* dy, const T* w, T* dx) {
  // 1x1, stride 1, no padding: per image and group, dX = W^T dY, one GEMM straight into dX.
  const int64_t P = g.out_pixels(), cin_g = g.in_channels_per_group();
  const int64_t cout_g = g.out_channels_per_group();
  const double work = double(g.in_channels) * cout_g * P;
  at::parallel_for(0, g.batch, grain_for(work), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t grp = 0; grp < g.groups; ++grp)
        cpu::gemm<T>(cin_g, P, cout_g, w + grp * cout_g * cin_g, 1, cin_g,
                     dy + n * g.out_image() + grp * cout_g * P, P, 1,
                     dx + n * g.in_image() + grp * cin_g * P, P, 1, false);
  });
}

template <typename T>
void backward_weight_pointwise(const Geometry& g, const T* dy, const T* x, T* dw) {
  // 1x1, stride 1, no padding: dW = sum over images of dY_n X_n^T, one GEMM per image straight
  // from dY and x (im2col's strips copied both first: 64->256 @56, batch 8, one thread, 13.5 ms
  // against 6.6 for the GEMMs alone). Tasks take blocks of output channels, each summing the
  // images in order, so the result does not depend on the thread count.
  const int64_t P = g.out_pixels(), cin_g = g.in_channels_per_group();
  const int64_t cout_g = g.out_channels_per_group();
  constexpr int64_t kRowsPerTask = 64;
  const int64_t blocks = (cout_g + kRowsPerTask - 1) / kRowsPerTask;
  const double work = double(g.batch) * std::min(cout_g, kRowsPerTask) * cin_g * P;
  at::parallel_for(0, g.groups * blocks, grain_for(work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t grp = t / blocks, co0 = (t % blocks) * kRowsPerTask;
      const int64_t rows = std::min(kRowsPerTask, cout_g - co0);
      const int64_t co = grp * cout_g + co0;  // first output channel of the block
      // dW[co, ci] (+)= sum_p dY[n, co, p] x[n, ci, p]
      for (int64_t n = 0; n < g.batch; ++n)
        cpu::gemm<T>(rows, cin_g, P, dy + n * g.out_image() + co * P, P, 1,
                     x + n * g.in_image() + grp * cin_g * P, 1, P, dw + co * cin_g, cin_g, 1,
                     /*accumulate=*/n > 0);
    }
  });
}

template <typename T>
void forward_pointwise_channels_last(const Geometry& g, const T* x, const T* w, const T* bias,
                                     T* y) {
  // y[p, co] = bias[co] + sum_ci x[p, ci] W[co, ci] for the batch's pixels p, per group: one
  // product over all of them (gemm_parallel splits it evenly over the threads and sets the bias
  // per tile; each row's arithmetic does not depend on the split).
  const int64_t rows = g.batch * g.out_pixels(), cin = g.in_channels, cout = g.out_channels;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp)
    cpu::gemm_parallel<T>(rows, cout_g, cin_g, x + grp * cin_g, cin, 1, w + grp * cout_g * cin_g,
                          1, cin_g, y + grp * cout_g, cout, 1, false,
                          bias ? bias + grp * cout_g : nullptr);
}

template <typename T>
void backward_pointwise_channels_last(const Geometry& g, const T* dy, const T* x, const T* w,
                                      T* dx, T* dw) {
  const int64_t rows = g.batch * g.out_pixels(), cin = g.in_channels, cout = g.out_channels;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    if (dx)  // dX[p, ci] = sum_co dY[p, co] W[co, ci]
      cpu::gemm_parallel<T>(rows, cin_g, cout_g, dy + grp * cout_g, cout, 1,
                            w + grp * cout_g * cin_g, cin_g, 1, dx + grp * cin_g, cin, 1, false);
    if (dw)  // dW[co, ci] = sum_p dY[p, co] x[p, ci]: dY^T x over every pixel
      cpu::gemm_parallel<T>(cout_g, cin_g, rows, dy + grp * cout_g, 1, cout, x + grp * cin_g,
                            cin, 1, dw + grp * cout_g * cin_g, cin_g, 1, false);
  }
}

template void forward_pointwise_channels_last<float>(const Geometry&, const float*, const float*,
                                                     const float*, float*);
template void forward_pointwise_channels_last<double>(const Geometry&, const double*,
                                                      const double*, const double*, double*);
template void backward_pointwise_channels_last<float>(const Geometry&, const float*,
                                                      const float*, const float*, float*, float*);
template void backward_pointwise_channels_last<double>(const Geometry&, const double*,
                                                       const double*, const double*, double*,
                                                       double*);
template void backward_weight_pointwise<float>(const Geometry&, const float*, const float*,
                                               float*);
template void backward_weight_pointwise<double>(const Geometry&, const double*, const double*,
                                                double*);
template void backward_input_pointwise<float>(const Geometry&, const float*, const float*,
                                              float*);
template void backward_input_pointwise<double>(const Geometry&, const double*, const double*,
                                               double*);
template void forward_im2col<float>(const Geometry&, const float*, const float*, const float*,
                                    float*);
template void forward_im2col<double>(const Geometry&, const double*, const double*,
                                     const double*, double*);
template void backward_im2col<float>(const Geometry&, const float*, const float*, const float*,
                                     float*, float*, float*);
template void backward_im2col<double>(const Geometry&, const double*, const double*,
                                      const double*, double*, double*, double*);

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
