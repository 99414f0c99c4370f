// CPU kernels of conv2d and conv2d_backward: im2col into a small scratch, then pyengine's GEMM
// (cpu/gemm.h).
//
// Per group g, with K = (C_in / groups) * kH * kW taps and the output pixels of a run of images as
// the columns j (image-major, so several small images make one wide GEMM):
//   forward      Y[co, j]  = sum_k W[co, k] Xcol[k, j]          gemm(C_out/g, cols, K)
//   grad_weight  dW[co, k] = sum_j dY[co, j] Xcol[k, j]         gemm(C_out/g, K, cols): the dot
//                                                               kernel, both operands along j
//   grad_input   dXcol[k, j] = sum_co W[co, k] dY[co, j]        gemm(K, cols, C_out/g), then
//                                                               col2im adds dXcol back into dX
//   grad_bias    db[co] = sum_j dY[co, j]
//
// Work split. The batch is cut into chunks of `images_per_chunk` images (from the shapes only);
// each chunk's columns are processed in strips of at most `strip` columns, so the im2col scratch
// (K x strip) stays in L2 whatever the image size. at::parallel_for runs chunks (forward, and
// grad_input alone) or "slots" of consecutive chunks (when grad_weight / grad_bias are wanted):
// a slot sums its chunks' contributions in chunk order into its own partial, and the partials are
// added in slot order at the end. The slots depend on the shapes only, so gradients are bitwise
// identical across runs and thread counts. col2im of a chunk touches only the chunk's own images,
// so grad_input needs no reduction at all.
//
// Napkin math, LeNet at batch 64, fp32 (per pass; the machine: 2 cores, ~200 GFLOP/s per core at
// 2 x 512-bit FMA per cycle, L2 1 MB per core):
//   conv1 1->6, 5x5, 32x32 -> 28x28: K = 25, 784 columns per image. Forward 2*64*6*25*784 = 15.1
//     MFLOP, grad_weight the same. The GEMM floor is ~0.04 ms per pass on 2 cores, but with only
//     6 output channels each im2col element (25*784 per image, 5 MB over the batch, written and
//     read once, in L2) feeds just 6 FMAs: im2col and the output copy cost as much as the FMAs.
//   conv2 6->16, 5x5, 14x14 -> 10x10: K = 150, 100 columns per image. Forward 30.7 MFLOP, and
//     grad_weight, grad_input the same: ~0.08 ms per pass at the floor; im2col is 15000 elements
//     per image (3.8 MB over the batch) against 16 FMAs each.
//   So the floor is set by im2col's memory traffic as much as by the FMAs; both stay in L2 thanks
//   to the strips.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/gemm.h"

namespace pyengine {
namespace {

using at::Tensor;

#define PE_INLINE inline __attribute__((always_inline))
#define PE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

struct Geom {
  int64_t N, C, H, W;        // input (unbatched input: N = 1)
  int64_t Co, OH, OW;        // output
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t G, Cig, Cog;       // groups, channels per group
  int64_t K, P;              // taps per group (Cig * kh * kw), output pixels per image
};

Geom make_geom(const Conv2dShape<int64_t>& s, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation) {
  Geom g;
  g.N = s.batch;
  g.C = s.in_channels;
  g.H = s.in_h;
  g.W = s.in_w;
  g.Co = s.out_channels;
  g.OH = s.out_h;
  g.OW = s.out_w;
  g.kh = s.kernel_h;
  g.kw = s.kernel_w;
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.G = s.groups;
  g.Cig = g.C / g.G;
  g.Cog = g.Co / g.G;
  g.K = g.Cig * g.kh * g.kw;
  g.P = g.OH * g.OW;
  return g;
}

// How the batch is cut (from the shapes only: see the top of the file).
struct Split {
  int64_t strip;             // max columns per GEMM
  int64_t images_per_chunk;  // images whose columns are merged
  int64_t chunks;
};

Split make_split(const Geom& g, size_t elem) {
  Split s;
  // K x strip scratch of ~256 KB (L2), at least 64 columns.
  const int64_t bytes_per_col = std::max<int64_t>(1, g.K) * static_cast<int64_t>(elem);
  s.strip = std::clamp<int64_t>(int64_t(256) * 1024 / bytes_per_col, 64, 8192);
  // Merge small images up to a strip, but keep >= 16 chunks when the batch allows.
  const int64_t by_size = std::max<int64_t>(1, s.strip / std::max<int64_t>(1, g.P));
  const int64_t by_count = std::max<int64_t>(1, g.N / 16);
  s.images_per_chunk = std::min(by_size, by_count);
  s.chunks = (g.N + s.images_per_chunk - 1) / s.images_per_chunk;
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
  lo = iw0 >= 0 ? 0 : (-iw0 + sw - 1) / sw;
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
    if (b > static_cast<int64_t>(sizeof(T))) std::memcpy(d + b - sizeof(T), s + b - sizeof(T), sizeof(T));
  }
}

template <typename T>
PE_INLINE void zero_run(T* dst, int64_t n) {
  for (int64_t t = 0; t < n; ++t) dst[t] = T(0);
}

// One output-row segment (image n, output row oh, columns ow .. ow + seg) of tap (ci, ki, kj):
// the matching input row, strided by sw, zero where it falls in the padding.
template <typename T, bool kAdd>
PE_INLINE void segment(const Geom& g, T* col, T* img, int64_t oh, int64_t ow, int64_t seg,
                       int64_t ihoff, int64_t iwoff) {
  const int64_t ih = oh * g.sh + ihoff;
  if (ih < 0 || ih >= g.H) {
    if (!kAdd) zero_run(col, seg);
    return;
  }
  T* row = img + ih * g.W;
  const int64_t iw0 = ow * g.sw + iwoff;
  int64_t lo, hi;
  valid_range(iw0, g.sw, g.W, seg, lo, hi);
  if (kAdd) {
    for (int64_t t = lo; t < hi; ++t) row[iw0 + t * g.sw] += col[t];
  } else {
    zero_run(col, lo);
    if (g.sw == 1)
      copy_run(col + lo, row + iw0 + lo, hi - lo);
    else
      for (int64_t t = lo; t < hi; ++t) col[t] = row[iw0 + t * g.sw];
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
PE_INLINE void im2col_impl(const Geom& geom, T* x, int64_t img_stride, int64_t q0, int64_t len,
                           T* col, int64_t ld) {
  // Local copies: the byte-wise copies below could otherwise alias the geometry, which the
  // compiler would then reload on every row.
  const Geom g = geom;
  const int64_t H = g.H, W = g.W, OW = g.OW, OH = g.OH, P = g.P, sh = g.sh, sw = g.sw;
  const int64_t khw = g.kh * g.kw, qend = q0 + len;
  for (int64_t k = 0; k < g.K; ++k) {
    const int64_t ci = k / khw, ki = (k % khw) / g.kw, kj = k % g.kw;
    const int64_t ihoff = ki * g.dh - g.ph, iwoff = kj * g.dw - g.pw;
    // Output rows whose input row is inside the image: ih = oh * sh + ihoff in [0, H).
    const int64_t oh_lo = ihoff >= 0 ? 0 : (-ihoff + sh - 1) / sh;
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
          for (int64_t r = r_lo; r < r_hi; ++r, d += OW, src += src_step)
            for (int64_t t = lo; t < hi; ++t) src[t] += d[t];
        } else {
          for (int64_t r = r_lo; r < r_hi; ++r, d += OW, src += src_step)
            for (int64_t t = lo; t < hi; ++t) src[t * sw] += d[t];
        }
      } else if (sw == 1) {
        if (lo == 0 && hi == OW) {
          for (int64_t r = r_lo; r < r_hi; ++r, d += OW, src += src_step) copy_run(d, src, OW);
        } else {
          for (int64_t r = r_lo; r < r_hi; ++r, d += OW, src += src_step) {
            zero_run(d, lo);
            copy_run(d + lo, src + lo, w);
            zero_run(d + hi, OW - hi);
          }
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

// Between a [rows x ld] scratch of a strip and an NCHW tensor: `t` points at the run's first image,
// channel 0 of the group, images `img_stride` apart, channels P apart.
// to_scratch: buf[r, j] = t[..] for j < len, 0 for len <= j < ld.
template <typename T>
PE_INLINE void gather_impl(const Geom& g, const T* t, int64_t img_stride, int64_t rows,
                           int64_t q0, int64_t len, T* buf, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = buf + r * ld;
    int64_t q = q0;
    while (q < q0 + len) {
      const int64_t n = q / g.P, p = q % g.P;
      const int64_t seg = std::min(g.P - p, q0 + len - q);
      const T* src = t + n * img_stride + r * g.P + p;
      for (int64_t i = 0; i < seg; ++i) dst[i] = src[i];
      dst += seg;
      q += seg;
    }
    for (int64_t j = len; j < ld; ++j) buf[r * ld + j] = T(0);
  }
}
// from scratch: t[..] = buf[r, j] (+ bias[r] when bias is not null).
template <typename T>
PE_INLINE void scatter_impl(const Geom& g, const T* buf, int64_t ld, const T* bias, T* t,
                            int64_t img_stride, int64_t rows, int64_t q0, int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = buf + r * ld;
    const T b = bias ? bias[r] : T(0);
    int64_t q = q0;
    while (q < q0 + len) {
      const int64_t n = q / g.P, p = q % g.P;
      const int64_t seg = std::min(g.P - p, q0 + len - q);
      T* dst = t + n * img_stride + r * g.P + p;
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
  PE_CLONES void im2col(const Geom& g, const T* x, int64_t img_stride, int64_t q0, int64_t len, \
                        T* col, int64_t ld) {                                                   \
    im2col_impl<T, false>(g, const_cast<T*>(x), img_stride, q0, len, col, ld);                  \
  }                                                                                             \
  PE_CLONES void col2im(const Geom& g, const T* col, int64_t ld, T* dx, int64_t img_stride,     \
                        int64_t q0, int64_t len) {                                              \
    im2col_impl<T, true>(g, dx, img_stride, q0, len, const_cast<T*>(col), ld);                  \
  }                                                                                             \
  PE_CLONES void gather(const Geom& g, const T* t, int64_t img_stride, int64_t rows,            \
                        int64_t q0, int64_t len, T* buf, int64_t ld) {                          \
    gather_impl(g, t, img_stride, rows, q0, len, buf, ld);                                      \
  }                                                                                             \
  PE_CLONES void scatter(const Geom& g, const T* buf, int64_t ld, const T* bias, T* t,          \
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

// ---- Forward ------------------------------------------------------------------------------

template <typename T>
void conv2d_forward(const Geom& g, const T* x, const T* w, const T* bias, T* y) {
  const Split sp = make_split(g, sizeof(T));
  const int64_t in_img = g.C * g.H * g.W, out_img = g.Co * g.P;
  const bool pointwise = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 &&
                         g.pw == 0;
  at::parallel_for(0, sp.chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * sp.images_per_chunk;
      const int64_t nimg = std::min(sp.images_per_chunk, g.N - n0);
      const int64_t cols = nimg * g.P;
      for (int64_t grp = 0; grp < g.G; ++grp) {
        const T* xg = x + n0 * in_img + grp * g.Cig * g.H * g.W;
        T* yg = y + n0 * out_img + grp * g.Cog * g.P;
        const T* wg = w + grp * g.Cog * g.K;
        const T* bg = bias ? bias + grp * g.Cog : nullptr;
        if (pointwise) {  // 1x1, stride 1, no padding: the input is its own im2col
          for (int64_t n = 0; n < nimg; ++n) {
            T* yn = yg + n * out_img;
            if (bg)
              for (int64_t co = 0; co < g.Cog; ++co) std::fill(yn + co * g.P, yn + (co + 1) * g.P, bg[co]);
            cpu::gemm<T>(g.Cog, g.P, g.K, wg, g.K, 1, xg + n * in_img, g.P, 1, yn, g.P, 1,
                         bg != nullptr);
          }
          continue;
        }
        for (int64_t q0 = 0; q0 < cols; q0 += sp.strip) {
          const int64_t len = std::min(sp.strip, cols - q0);
          T* col = scratch_ptr<T>(0, g.K * len);
          T* out = scratch_ptr<T>(1, g.Cog * len);
          im2col(g, xg, in_img, q0, len, col, len);
          cpu::gemm<T>(g.Cog, len, g.K, wg, g.K, 1, col, len, 1, out, len, 1, false);
          scatter(g, out, len, bg, yg, out_img, g.Cog, q0, len);
        }
      }
    }
  });
}

Tensor conv2d_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t groups) {
  const auto s = check_conv2d<int64_t>(input, weight, bias, stride, padding, dilation, groups);
  const Geom g = make_geom(s, stride, padding, dilation);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  Tensor out = at::empty(s.output_sizes(), x.options());
  if (out.numel() == 0) return out;
  dispatch_floating(x.scalar_type(), "conv2d", [&](auto tag) {
    using T = decltype(tag);
    conv2d_forward<T>(g, x.const_data_ptr<T>(), w.const_data_ptr<T>(),
                      has_bias ? b.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>());
  });
  return out;
}

// ---- Backward -----------------------------------------------------------------------------

template <typename T>
void conv2d_backward_impl(const Geom& g, const T* dy, const T* x, const T* w, T* dx, T* dw,
                          T* db) {
  const Split sp = make_split(g, sizeof(T));
  const int64_t in_img = g.C * g.H * g.W, out_img = g.Co * g.P;
  const bool reduce = dw || db;
  // Slots: consecutive chunks summed in order into one partial. At most 32, and the partials
  // capped at ~32 MB; with no reduction every chunk is its own task.
  int64_t slots = sp.chunks;
  const int64_t part = g.Co * g.K + g.Co;
  if (reduce) {
    const int64_t cap = std::max<int64_t>(
        1, (int64_t(32) << 20) / (std::max<int64_t>(1, part) * static_cast<int64_t>(sizeof(T))));
    slots = std::min({slots, int64_t(32), cap});
  }
  const int64_t chunks_per_slot = (sp.chunks + slots - 1) / slots;
  slots = (sp.chunks + chunks_per_slot - 1) / chunks_per_slot;
  std::vector<T> parts(reduce ? static_cast<size_t>(slots * part) : 0, T(0));
  const int64_t vw = cpu::simd_width<T>();

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      T* dw_part = reduce ? parts.data() + slot * part : nullptr;
      T* db_part = reduce ? dw_part + g.Co * g.K : nullptr;
      const int64_t cend = std::min(sp.chunks, (slot + 1) * chunks_per_slot);
      for (int64_t c = slot * chunks_per_slot; c < cend; ++c) {
        const int64_t n0 = c * sp.images_per_chunk;
        const int64_t nimg = std::min(sp.images_per_chunk, g.N - n0);
        const int64_t cols = nimg * g.P;
        if (dx) std::fill(dx + n0 * in_img, dx + (n0 + nimg) * in_img, T(0));
        for (int64_t grp = 0; grp < g.G; ++grp) {
          const T* xg = x + n0 * in_img + grp * g.Cig * g.H * g.W;
          const T* dyg = dy + n0 * out_img + grp * g.Cog * g.P;
          T* dxg = dx ? dx + n0 * in_img + grp * g.Cig * g.H * g.W : nullptr;
          const T* wg = w + grp * g.Cog * g.K;
          for (int64_t q0 = 0; q0 < cols; q0 += sp.strip) {
            const int64_t len = std::min(sp.strip, cols - q0);
            const int64_t ld = round_up(len, vw);  // zero-padded: dot kernel needs no tail
            T* dyc = scratch_ptr<T>(0, g.Cog * ld);
            gather(g, dyg, out_img, g.Cog, q0, len, dyc, ld);
            if (db) row_sums(dyc, ld, g.Cog, len, db_part + grp * g.Cog);
            if (dw) {
              T* col = scratch_ptr<T>(1, g.K * ld);
              im2col(g, xg, in_img, q0, len, col, ld);
              // dW[co, k] += sum_j dY[co, j] Xcol[k, j]
              cpu::gemm<T>(g.Cog, g.K, ld, dyc, ld, 1, col, 1, ld, dw_part + grp * g.Cog * g.K,
                           g.K, 1, true);
            }
            if (dx) {
              T* dcol = scratch_ptr<T>(2, g.K * len);
              // dXcol[k, j] = sum_co W[co, k] dY[co, j]
              cpu::gemm<T>(g.K, len, g.Cog, wg, 1, g.K, dyc, ld, 1, dcol, len, 1, false);
              col2im(g, dcol, len, dxg, in_img, q0, len);
            }
          }
        }
      }
    }
  });

  // Partials, added in slot order.
  if (dw) {
    const int64_t n = g.Co * g.K;
    at::parallel_for(0, n, 4096, [&](int64_t e0, int64_t e1) {
      sum_parts(parts.data(), slots, part, e0, e1, dw);
    });
  }
  if (db) sum_parts(parts.data() + g.Co * g.K, slots, part, 0, g.Co, db);
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_cpu(const Tensor& grad_output,
                                                       const Tensor& input, const Tensor& weight,
                                                       at::IntArrayRef stride,
                                                       at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, int64_t groups,
                                                       std::array<bool, 3> mask) {
  const auto s = check_conv2d_backward<int64_t>(grad_output, input, weight, stride, padding,
                                                dilation, groups);
  const Geom g = make_geom(s, stride, padding, dilation);
  const Tensor dy = grad_output.contiguous();
  const Tensor x = input.contiguous();
  const Tensor w = weight.contiguous();
  Tensor grad_input, grad_weight, grad_bias;
  if (mask[0]) grad_input = at::empty(input.sizes(), x.options());
  if (mask[1]) grad_weight = at::empty(weight.sizes(), x.options());
  if (mask[2]) grad_bias = at::empty({g.Co}, x.options());
  dispatch_floating(x.scalar_type(), "conv2d_backward", [&](auto tag) {
    using T = decltype(tag);
    T* dx = mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr;
    T* dw = mask[1] ? grad_weight.mutable_data_ptr<T>() : nullptr;
    T* db = mask[2] ? grad_bias.mutable_data_ptr<T>() : nullptr;
    if (g.N == 0) {  // empty batch: no contribution
      if (dw) std::fill(dw, dw + grad_weight.numel(), T(0));
      if (db) std::fill(db, db + g.Co, T(0));
      return;
    }
    if (!dx && !dw && !db) return;
    conv2d_backward_impl<T>(g, dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
                            w.const_data_ptr<T>(), dx, dw, db);
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("conv2d", conv2d_cpu);
  m.impl("conv2d_backward", conv2d_backward_cpu);
}

}  // namespace pyengine
