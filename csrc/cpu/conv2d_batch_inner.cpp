// The batch-innermost algorithm of the CPU conv2d kernels (interface: cpu/conv2d.h; when it is
// chosen and the napkin math: cpu/conv2d.cpp).
//
// The im2col path copies K x H_out x W_out elements per image for K FMAs each; with LeNet conv2's
// 10-wide output rows that copy, a few cycles per 10 floats, cost as much as the GEMM. With the
// batch innermost ("CHWN": x^T[c, h, w][n]) every tap of every output pixel is a contiguous
// vector over the batch, so no im2col is needed at all:
//   forward      Y^T[co, p][:]  = sum_k W[co, k] X^T[tap k of p][:]       gemm_indirect per pixel
//   grad_input   dX^T[ci, q][:] = sum_(co,ki,kj) W[co, ci, ki, kj] dY^T[co, q - (ki, kj)][:]
//                (a gather over the taps that reach input pixel q: no col2im, no races)
//   grad_weight  dW[co, k] = sum_p dY^T[co, p][:] . X^T[tap k of p][:]   gemm_dot_segments
// Taps in the padding point at a vector of zeros (forward, grad_weight); grad_input gathers
// only the taps that reach a real input pixel. The price is transposing x, y, dY and dX (each
// element moved once) and padding the batch to whole vectors. Napkin math, LeNet conv2 at batch
// 64: 15.4 M multiply-adds (30.7 MFLOP) per pass, ~0.13 ms at one core's peak (reference machine:
// csrc/cpu/README.md), in tiles of 16 / 6 / 6x4 rows that keep the FMA units busy; the transposes
// move 0.36 M elements, a few percent of that.
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/conv2d.h"
#include "cpu/convert.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/transpose.h"

namespace pyengine {
namespace cpu {
namespace conv2d {
namespace {

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
#define PE_DEFINE_TRANSPOSES(T)                                                              \
  PE_ISA_FUNCTION(Family::Conv2d, void, to_inner,                                            \
                  (const T* src, int64_t nb, int64_t F, int64_t f0, int64_t f1, T* dst,      \
                   int64_t ld, int64_t nbc),                                                 \
                  (src, nb, F, f0, f1, dst, ld, nbc), to_inner_impl<T>)                      \
  PE_ISA_FUNCTION(Family::Conv2d, void, from_inner,                                          \
                  (const T* src, int64_t ld, int64_t nb, int64_t F, int64_t f0, int64_t f1,  \
                   T* dst, const T* bias, int64_t P),                                        \
                  (src, ld, nb, F, f0, f1, dst, bias, P), from_inner_impl<T>)
PE_DEFINE_TRANSPOSES(float)
PE_DEFINE_TRANSPOSES(double)
#undef PE_DEFINE_TRANSPOSES

// AVX-512 versions: one 16-lane (8 for double) gather per output vector; the rows a block of
// gathers touches stay in L1 across consecutive f. Offsets are int32: callers check the range.

// d[i] = sp[i * stride] (+ add[i], add may be null) for i < cnt <= one vector.
template <typename T>
PE_TARGET_AVX512 inline void gather_store_avx512(const T* sp, int64_t stride, int64_t cnt,
                                                 const T* add, T* d) {
  const uint32_t m = (1u << cnt) - 1u;  // cnt <= 16
  if constexpr (sizeof(T) == 4) {
    const __mmask16 mask = static_cast<__mmask16>(m);
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(stride)));
    __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, sp, 4);
    if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, add));
    _mm512_mask_storeu_ps(d, mask, v);
  } else {
    const __mmask8 mask = static_cast<__mmask8>(m);
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(static_cast<int>(stride)));
    __m512d v = _mm512_mask_i32gather_pd(_mm512_setzero_pd(), mask, idx, sp, 8);
    if (add) v = _mm512_add_pd(v, _mm512_maskz_loadu_pd(mask, add));
    _mm512_mask_storeu_pd(d, mask, v);
  }
}

template <typename T>
PE_TARGET_AVX512 void to_inner_gather_avx512(const T* src, int64_t nb, int64_t F, int64_t f0,
                                             int64_t f1, T* dst, int64_t ld, int64_t nbc) {
  constexpr int V = 64 / sizeof(T);
  for (int64_t f = f0; f < f1; ++f) {
    T* d = dst + f * ld;
    for (int64_t n0 = 0; n0 < nb; n0 += V)
      gather_store_avx512(src + n0 * F + f, F, std::min<int64_t>(V, nb - n0), (const T*)nullptr,
                          d + n0);
    for (int64_t n = nb; n < nbc; ++n) d[n] = T(0);
  }
}
// dst[n * F + f] = src[f * ld + n] + add[f] (add may be null), n < nb, f in [f0, f1).
template <typename T>
PE_TARGET_AVX512 void from_inner_gather_avx512(const T* src, int64_t ld, int64_t nb, int64_t F,
                                               int64_t f0, int64_t f1, T* dst, const T* add) {
  constexpr int V = 64 / sizeof(T);
  for (int64_t n = 0; n < nb; ++n) {
    for (int64_t fb = f0; fb < f1; fb += V)
      gather_store_avx512(src + fb * ld + n, ld, std::min<int64_t>(V, f1 - fb),
                          add ? add + fb : nullptr, dst + n * F + fb);
  }
}


// float: 16 x 16 register transposes over the (f, n) plane.
PE_TARGET_AVX512 void to_inner_transpose_avx512(const float* src, int64_t nb, int64_t F,
                                                int64_t f0, int64_t f1, float* dst, int64_t ld,
                                                int64_t nbc) {
  for (int64_t fb = f0; fb < f1; fb += 16) {
    const int64_t nc = std::min<int64_t>(16, f1 - fb);
    for (int64_t n0 = 0; n0 < nb; n0 += 16)
      transpose16(src + n0 * F + fb, F, std::min<int64_t>(16, nb - n0), nc, dst + fb * ld + n0,
                  ld, nullptr);
    for (int64_t f = fb; f < fb + nc; ++f)
      for (int64_t n = nb; n < nbc; ++n) dst[f * ld + n] = 0.f;
  }
}
// Images [n_begin, n_end) (a multiple of 16 apart but for the batch's end).
PE_TARGET_AVX512 void from_inner_transpose_avx512(const float* src, int64_t ld, int64_t n_begin,
                                                  int64_t n_end, int64_t F, int64_t f0,
                                                  int64_t f1, float* dst, const float* add) {
  for (int64_t fb = f0; fb < f1; fb += 16) {
    const int64_t nr = std::min<int64_t>(16, f1 - fb);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 16)
      transpose16(src + fb * ld + n0, ld, nr, std::min<int64_t>(16, n_end - n0),
                  dst + n0 * F + fb, F, add ? add + fb : nullptr);
  }
}

// AVX2, float: 8 x 8 register transposes over whole blocks, element by element around them.
// (The portable loops ran a strided load per element: 21% of LeNet's fused conv2 block forward
// at batch 256 on an AVX2 machine, one thread.)
PE_TARGET_AVX2 void to_inner_transpose_avx2(const float* src, int64_t nb, int64_t F, int64_t f0,
                                            int64_t f1, float* dst, int64_t ld, int64_t nbc) {
  for (int64_t fb = f0; fb < f1; fb += 8) {
    const int64_t fe = std::min<int64_t>(f1, fb + 8);
    int64_t n0 = 0;
    if (fe - fb == 8)
      for (; n0 + 8 <= nb; n0 += 8)
        transpose8(src + n0 * F + fb, F, dst + fb * ld + n0, ld, nullptr);
    for (int64_t f = fb; f < fe; ++f) {
      for (int64_t n = n0; n < nb; ++n) dst[f * ld + n] = src[n * F + f];
      for (int64_t n = nb; n < nbc; ++n) dst[f * ld + n] = 0.f;
    }
  }
}
PE_TARGET_AVX2 void from_inner_transpose_avx2(const float* src, int64_t ld, int64_t nb,
                                              int64_t F, int64_t f0, int64_t f1, float* dst,
                                              const float* add) {
  for (int64_t fb = f0; fb < f1; fb += 8) {
    const int64_t fe = std::min<int64_t>(f1, fb + 8);
    int64_t n0 = 0;
    if (fe - fb == 8)
      for (; n0 + 8 <= nb; n0 += 8)
        transpose8(src + fb * ld + n0, ld, dst + n0 * F + fb, F, add ? add + fb : nullptr);
    for (int64_t n = n0; n < nb; ++n)
      for (int64_t f = fb; f < fe; ++f)
        dst[n * F + f] = add ? src[f * ld + n] + add[f] : src[f * ld + n];
  }
}

// Which register transposes this process runs for float: 16 x 16 (AVX-512), 8 x 8 (AVX2) or
// none (the portable loops).
int transpose_width() {
  static const int width = cpu::isa_for(Family::Conv2d) == cpu::Isa::Avx512 ? 16
                           : cpu::isa_for(Family::Conv2d) == cpu::Isa::Avx2 ? 8
                                                                             : 0;
  return width;
}

bool gathers_ok(int64_t stride) {
  static const bool avx512 = cpu::isa_for(Family::Conv2d) == cpu::Isa::Avx512;
  return avx512 && stride * 16 < (int64_t(1) << 31);
}

// Transposes move each element once (LeNet conv2's 0.1 M floats at batch 64: 0.8 MB read and
// written, ~8 us in L2 on one core): below 128 K elements one thread does it, as waking the pool
// costs about as much.
int64_t transpose_grain(int64_t F, int64_t n) {
  if (F * n < (int64_t(1) << 17)) return F;
  return std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(1, n));
}

template <typename T>
void to_inner_range(const T* src, int64_t nb, int64_t F, int64_t f0, int64_t f1, T* dst,
                    int64_t ld, int64_t nbc) {
  if constexpr (std::is_same_v<T, float>) {
    if (transpose_width() == 8) return to_inner_transpose_avx2(src, nb, F, f0, f1, dst, ld, nbc);
  }
  if (!gathers_ok(F))
    to_inner(src, nb, F, f0, f1, dst, ld, nbc);
  else if constexpr (std::is_same_v<T, float>)
    to_inner_transpose_avx512(src, nb, F, f0, f1, dst, ld, nbc);
  else
    to_inner_gather_avx512(src, nb, F, f0, f1, dst, ld, nbc);
}
template <typename T>
void to_inner_parallel(const T* src, int64_t nb, int64_t F, T* dst, int64_t ld, int64_t nbc) {
  at::parallel_for(0, F, transpose_grain(F, nbc), [&](int64_t f0, int64_t f1) {
    to_inner_range(src, nb, F, f0, f1, dst, ld, nbc);
  });
}
// bfloat16 x into float's batch-innermost layout, widened on the way: 16 x 16 blocks widened
// into a float tile in L1, then the float register transpose (AVX-512); element by element on
// the other levels. (GCC 12 flags its own _mm512_undefined_* inside the widening intrinsics as
// uninitialized, as in cpu/transpose.h.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
PE_TARGET_AVX512 void to_inner_widen_avx512(const c10::BFloat16* src, int64_t nb, int64_t F,
                                            int64_t f0, int64_t f1, float* dst, int64_t ld,
                                            int64_t nbc) {
  alignas(64) float tile[16 * 16];
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t fb = f0; fb < f1; fb += 16) {
    const int64_t nc = std::min<int64_t>(16, f1 - fb);
    const __mmask16 cm = static_cast<__mmask16>(nc == 16 ? 0xffffu : (1u << nc) - 1u);
    for (int64_t n0 = 0; n0 < nb; n0 += 16) {
      const int64_t rows = std::min<int64_t>(16, nb - n0);
      for (int64_t r = 0; r < rows; ++r)
        _mm512_store_si512(tile + r * 16,
                           _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                                                 cm, bits + (n0 + r) * F + fb)),
                                             16));
      transpose16(tile, 16, rows, nc, dst + fb * ld + n0, ld, nullptr);
    }
    for (int64_t f = fb; f < fb + nc; ++f)
      for (int64_t n = nb; n < nbc; ++n) dst[f * ld + n] = 0.f;
  }
}
#pragma GCC diagnostic pop
void to_inner_range(const c10::BFloat16* src, int64_t nb, int64_t F, int64_t f0, int64_t f1,
                    float* dst, int64_t ld, int64_t nbc) {
  if (cpu::isa_for(Family::Conv2d) == cpu::Isa::Avx512)
    return to_inner_widen_avx512(src, nb, F, f0, f1, dst, ld, nbc);
  for (int64_t f = f0; f < f1; ++f) {
    for (int64_t n = 0; n < nb; ++n) dst[f * ld + n] = bf16_to_float(src[n * F + f]);
    for (int64_t n = nb; n < nbc; ++n) dst[f * ld + n] = 0.f;
  }
}
void to_inner_parallel(const c10::BFloat16* src, int64_t nb, int64_t F, float* dst, int64_t ld,
                       int64_t nbc) {
  at::parallel_for(0, F, transpose_grain(F, nbc), [&](int64_t f0, int64_t f1) {
    to_inner_range(src, nb, F, f0, f1, dst, ld, nbc);
  });
}

constexpr int64_t kFromInnerParallel = int64_t(1) << 15;  // elements: below, one task

// `bias` (per channel, P features each) may be null.
template <typename T>
void from_inner_parallel(const T* src, int64_t ld, int64_t nb, int64_t F, T* dst, const T* bias,
                         int64_t P) {
  const bool avx2_float = std::is_same_v<T, float> && transpose_width() == 8;
  if (!gathers_ok(ld) && !avx2_float) {
    at::parallel_for(0, F, transpose_grain(F, nb), [&](int64_t f0, int64_t f1) {
                       from_inner(src, ld, nb, F, f0, f1, dst, bias, P);
                     });
    return;
  }
  std::vector<T> add(bias ? static_cast<size_t>(F) : 0);
  for (int64_t f = 0; bias && f < F; ++f) add[f] = bias[f / P];
  const T* pa = bias ? add.data() : nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (!avx2_float) {
      // Split by blocks of 16 images: every task writes whole rows of dst (split by features,
      // tasks shared the cache lines where their slices of a row met).
      const int64_t blocks = (nb + 15) / 16;
      const int64_t grain = F * nb < kFromInnerParallel ? blocks
                                                         : std::max<int64_t>(1, 4096 / F);
      at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
        from_inner_transpose_avx512(src, ld, b0 * 16, std::min(nb, b1 * 16), F, 0, F, dst, pa);
      });
      return;
    }
  }
  // Split by feature blocks of whole vectors, so every task writes whole rows' slices.
  const int64_t V = 64 / static_cast<int64_t>(sizeof(T)), blocks = (F + V - 1) / V;
  at::parallel_for(0, blocks, (transpose_grain(F, nb) + V - 1) / V, [&](int64_t b0, int64_t b1) {
    if constexpr (std::is_same_v<T, float>)
      from_inner_transpose_avx2(src, ld, nb, F, b0 * V, std::min(F, b1 * V), dst, pa);
    else
      from_inner_gather_avx512(src, ld, nb, F, b0 * V, std::min(F, b1 * V), dst, pa);
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
  const int64_t khw = g.kernel_pixels(), K = g.taps_per_group();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t ci = k / khw, ki = (k % khw) / g.kernel_w, kj = k % g.kernel_w;
    t.dh.push_back(ki * g.dilation_h - g.padding_h);
    t.dw.push_back(kj * g.dilation_w - g.padding_w);
    t.off.push_back(ci * g.in_pixels() + t.dh.back() * g.in_w + t.dw.back());
  }
  t.inner_rows = g.inner_rows();
  t.inner_cols = g.inner_cols();
  return t;
}

}  // namespace

// Images a thread's slice of the batch holds at least before the forward splits the batch
// between threads (below, by bands of output rows): the indirect GEMM's widest AVX-512 tile.
constexpr int64_t kSliceImages = 64;

// The forward's GEMMs, chunk by chunk of the batch: Y^T of images [n0, n0 + nb) in yt
// (f_out rows of ld, batch padding to nbc lanes), then epilogue(n0, nb, yt, ld) stores it. The
// epilogue may run on several threads at once, for disjoint images.
template <typename T, typename S, typename Epilogue>
void forward_batch_inner_chunks(const Geometry& g, const S* x, const T* w,
                                const Epilogue& epilogue) {
  // The GEMM's sizes: K taps per group, P output pixels per image.
  const int64_t K = g.taps_per_group(), P = g.out_pixels();
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t vw = cpu::simd_width<T>();
  const int64_t f_in = g.in_image(), f_out = g.out_image(), hw = g.in_pixels();
  // W^T per group: wt[grp][k][co], so a tap's weights are a contiguous column of M = C_out/g.
  std::vector<T> wt(static_cast<size_t>(g.out_channels * K));
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t co = 0; co < cout_g; ++co)
      for (int64_t k = 0; k < K; ++k)
        wt[(grp * K + k) * cout_g + co] = w[(grp * cout_g + co) * K + k];
  const Taps taps = make_taps(g);
  std::vector<const T*> wrows(static_cast<size_t>(g.groups * K));  // every tap's weights
  for (int64_t k = 0; k < g.groups * K; ++k) wrows[k] = wt.data() + k * cout_g;

  // One tile width, hence one k block, for every chunk and slice of the batch: a lane's sums
  // are then the same however the batch is cut (gemm.h), so the results do not depend on the
  // thread count. (The cost model's pick for a whole chunk: a last chunk or a slice of 80
  // images took other widths.)
  const int tile_vectors = cpu::gemm_indirect_tile_vectors<T>(
      cout_g, round_up(std::min(g.batch, kInnerBatch), vw), K, /*csc=*/1);

  // Images [lo, hi) in chunks; each chunk's output rows in `threads` bands (1: this thread
  // alone).
  auto run = [&](int64_t lo, int64_t hi, int64_t threads) {
    const int64_t chunk = std::min(hi - lo, kInnerBatch);
    // ld: a batch vector per pixel, off 512-byte multiples (gemm.h in_place_ld: 256 floats per
    // pixel put a tap panel in a quarter of L1's sets).
    const int64_t ld = in_place_ld<T>(round_up(chunk, vw));
    // Not zeroed: the transposes write every row's lanes up to nbc (zeros past the batch), the
    // GEMMs every output row's; nothing reads past nbc. (Zeroing both cost ~25 us of LeNet
    // conv2's 230 at batch 64.)
    // x^T: one per band (below), at most one a thread: the scratch grows with the threads
    // (LeNet conv2 at batch 256: 1.3 MB a band).
    const int64_t max_bands = std::min<int64_t>(threads, g.out_h);
    cpu::CachedBuffer<T> xt(static_cast<size_t>(max_bands * f_in * ld), /*zero=*/false);
    cpu::CachedBuffer<T> yt(static_cast<size_t>(f_out * ld), /*zero=*/false);
    // Taps in the padding read zeros rather than being left out: 0 * (an inf or NaN weight)
    // must give NaN, as in torch and the im2col path. Only border pixels have such taps.
    const std::vector<T> zeros(static_cast<size_t>(ld), T(0));
    // Bands of output rows, one per thread: each transposes every input row its outputs read
    // (every channel) into its own x^T, then computes those outputs, so that the x^T rows its
    // GEMMs read are all in its own core's cache. The rows two bands share (kernel_h - 1 of
    // them where they meet) are transposed by both: when each transposed only the rows its
    // outputs start on, the first band read the rows below from the other core's cache, and at
    // LeNet conv2's batch 64 its GEMMs took 1.6x the second's while that one waited (perf); one
    // thread transposing all of x^T was worse still.
    for (int64_t n0 = lo; n0 < hi; n0 += chunk) {
      const int64_t nb = std::min(chunk, hi - n0), nbc = round_up(nb, vw);
      // (at least grain_for's work a band: 64 K multiply-adds)
      const int64_t bands =
          std::clamp<int64_t>(P * g.out_channels * K * nbc / 65536, 1, max_bands);
      auto band_rows = [&](int64_t b) { return g.out_h * b / bands; };  // first output row of b
      auto band = [&](int64_t b) {
        std::vector<const T*> brows(static_cast<size_t>(K));
        T* xb = xt.data() + b * f_in * ld;  // this band's x^T (only its rows written)
        // The input rows the band's outputs read: from its first row's first tap to its last
        // row's last.
        const int64_t r0 = std::clamp<int64_t>(band_rows(b) * g.stride_h - g.padding_h, 0,
                                               g.in_h);
        const int64_t r1 = std::clamp<int64_t>((band_rows(b + 1) - 1) * g.stride_h -
                                                   g.padding_h +
                                                   (g.kernel_h - 1) * g.dilation_h + 1,
                                               r0, g.in_h);
        for (int64_t c = 0; c < g.in_channels; ++c)
          to_inner_range(x + n0 * f_in, nb, f_in, c * hw + r0 * g.in_w, c * hw + r1 * g.in_w,
                         xb, ld, nbc);
        for (int64_t p = band_rows(b) * g.out_w; p < band_rows(b + 1) * g.out_w; ++p) {
          const int64_t oh = p / g.out_w, ow = p % g.out_w;
          const bool inside = taps.interior(oh, ow);
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            const T* xg = xb + (grp * cin_g * hw + oh * g.in_w + ow) * ld;
            for (int64_t k = 0; k < K; ++k) {
              const int64_t ih = oh + taps.dh[k], iw = ow + taps.dw[k];
              const bool padding =
                  !inside && (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w);
              brows[k] = padding ? zeros.data() : xg + taps.off[k] * ld;
            }
            cpu::gemm_indirect<T>(cout_g, nbc, K, wrows.data() + grp * K, brows.data(),
                                  yt.data() + (grp * cout_g * P + p) * ld, P * ld, 1, false,
                                  nullptr, nullptr, nullptr, tile_vectors);
          }
        }
      };
      if (bands == 1) {
        band(0);
      } else {
        at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) band(b);
        });
      }
      epilogue(n0, nb, static_cast<const T*>(yt.data()), ld);
    }
  };

  // A batch of kSliceImages a thread or more is split between the threads by images instead:
  // each slice is transposed, multiplied and stored (pooled, for the fused block) by one
  // thread, so no pass reads what the other core wrote. With bands, the epilogue's passes
  // (pooling, the transposes back) read Y^T rows that both cores' GEMMs had written: perf of
  // LeNet conv2's block forward at batch 256 (Zen 5, AVX-512) had the pooling at 2.6x and the
  // transposes at 1.8x their one-thread share of the samples, libgomp's wait at 11%. The
  // block's forward on two threads, builds alternating (3 pairs): 339-348 -> 308-312 us at
  // batch 256, 180-195 -> 164-170 at 128, 1373-1397 -> 1268-1330 at 1024. Slices start on
  // whole vectors.
  const int64_t threads = at::get_num_threads();
  const int64_t slices = std::min<int64_t>(threads, g.batch / kSliceImages);
  if (slices < 2) {
    run(0, g.batch, threads);
    return;
  }
  auto slice_start = [&](int64_t s) {
    return std::min(g.batch, round_up(g.batch * s / slices, vw));
  };
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) run(slice_start(s), slice_start(s + 1), 1);
  });
}

template <typename T, typename S>
void forward_batch_inner(const Geometry& g, const S* x, const T* w, const T* bias, T* y) {
  const int64_t P = g.out_pixels(), f_out = g.out_image();
  forward_batch_inner_chunks<T>(g, x, w, [&](int64_t n0, int64_t nb, const T* yt, int64_t ld) {
    from_inner_parallel(yt, ld, nb, f_out, y + n0 * f_out, bias, P);
  });
}

// ---- The fused conv2d + 2x2 max-pool + relu forward (conv2d_relu_max_pool2d) ----------------
//
// Y^T holds each output pixel as a vector over the batch, so a 2x2 window's maximum is four
// vector loads and three compare-selects for a whole vector of images: pooled here, before the
// transpose back, the convolution's output is never stored in NCHW, the pooling's narrow rows
// (LeNet conv2's 10-wide planes fill 5 of 16 lanes in cpu/pool.cpp's row kernel) are not
// walked, and a quarter of the elements are transposed. Measured on LeNet conv2's block
// forward (means of 2000 calls, 2 threads): 230 -> 202 us at batch 64, 896 -> 824 at 256
// (and -> 178 / 665 with the scratch no longer zeroed, below). The vector loop is intrinsics
// for float with AVX-512; the portable loop serves the other levels and float64.
//
// The same values and indices, bit for bit, as bias + convolution, then max_pool2d, then relu:
// each tap is Y + bias as from_inner adds it, the window's taps are folded in row-major order
// with max_pool2d's rule (a later tap wins if it is larger or NaN: torch's), relu last.

// Index lanes as wide as T's (int32 for float, beside the values in the AVX-512 kernel's 16
// lanes; a plane of a batch-innermost convolution has at most 16 columns and far fewer than
// 2^31 pixels).
template <typename T>
using PoolIndex = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T, bool kBias>
PE_INLINE void pool2x2_relu_inner_impl(const T* __restrict__ r0, int64_t ld, int64_t row_w,
                                       int64_t n, T b, PoolIndex<T> p0, T* __restrict__ out,
                                       PoolIndex<T>* __restrict__ idx) {
  using I = PoolIndex<T>;
  const T* r1 = r0 + ld;
  const T* r2 = r0 + row_w * ld;
  const T* r3 = r2 + ld;
  const I w = static_cast<I>(row_w);
  for (int64_t i = 0; i < n; ++i) {
    T best = kBias ? r0[i] + b : r0[i];
    I at = p0;
    const T v1 = kBias ? r1[i] + b : r1[i];
    const bool w1 = (v1 > best) | (v1 != v1);
    best = w1 ? v1 : best;
    at = w1 ? p0 + 1 : at;
    const T v2 = kBias ? r2[i] + b : r2[i];
    const bool w2 = (v2 > best) | (v2 != v2);
    best = w2 ? v2 : best;
    at = w2 ? p0 + w : at;
    const T v3 = kBias ? r3[i] + b : r3[i];
    const bool w3 = (v3 > best) | (v3 != v3);
    best = w3 ? v3 : best;
    at = w3 ? p0 + w + 1 : at;
    out[i] = ((best > T(0)) | (best != best)) ? best : T(0);  // relu_fwd (common/elementwise.h)
    idx[i] = at;
  }
}
#define PE_DEFINE_POOL_INNER(name, T, B)                                                    \
  PE_ISA_FUNCTION(Family::Conv2d, void, name,                                               \
                  (const T* r0, int64_t ld, int64_t row_w, int64_t n, T b, PoolIndex<T> p0, \
                   T* out, PoolIndex<T>* idx),                                              \
                  (r0, ld, row_w, n, b, p0, out, idx), (pool2x2_relu_inner_impl<T, B>))
PE_DEFINE_POOL_INNER(pool2x2_bias_relu_inner, float, true)
PE_DEFINE_POOL_INNER(pool2x2_relu_inner, float, false)
PE_DEFINE_POOL_INNER(pool2x2_bias_relu_inner, double, true)
PE_DEFINE_POOL_INNER(pool2x2_relu_inner, double, false)
#undef PE_DEFINE_POOL_INNER

// float with AVX-512, in intrinsics: GCC leaves the loop above scalar, branching per tap (it
// took 30% of the block's forward that way). n a multiple of 16.
template <bool kBias>
PE_TARGET_AVX512 void pool2x2_relu_inner_avx512_float(const float* r0, int64_t ld, int64_t row_w,
                                                      int64_t n, float b, int32_t p0, float* out,
                                                      int32_t* idx) {
  const float* rows[4] = {r0, r0 + ld, r0 + row_w * ld, r0 + row_w * ld + ld};
  const int32_t w = static_cast<int32_t>(row_w);
  const __m512i tap[4] = {_mm512_set1_epi32(p0), _mm512_set1_epi32(p0 + 1),
                          _mm512_set1_epi32(p0 + w), _mm512_set1_epi32(p0 + w + 1)};
  const __m512 bias = _mm512_set1_ps(b);
  for (int64_t i = 0; i < n; i += 16) {
    __m512 best = _mm512_loadu_ps(rows[0] + i);
    if (kBias) best = _mm512_add_ps(best, bias);
    __m512i at = tap[0];
    for (int t = 1; t < 4; ++t) {
      __m512 v = _mm512_loadu_ps(rows[t] + i);
      if (kBias) v = _mm512_add_ps(v, bias);
      // A later tap wins if larger, or NaN (max_pool2d's rule).
      const __mmask16 wins = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
                             _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      best = _mm512_mask_blend_ps(wins, best, v);
      at = _mm512_mask_blend_epi32(wins, at, tap[t]);
    }
    // relu: the maximum where it is > 0 or NaN, +0 elsewhere.
    const __mmask16 keep = _mm512_cmp_ps_mask(best, _mm512_setzero_ps(), _CMP_GT_OQ) |
                           _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    _mm512_storeu_ps(out + i, _mm512_maskz_mov_ps(keep, best));
    _mm512_storeu_si512(idx + i, at);
  }
}

// The same with AVX2 (the portable loop was as scalar there: 32% of the block's forward at batch
// 64 on a Zen 3, perf, one thread). n a multiple of 8.
template <bool kBias>
PE_TARGET_AVX2 void pool2x2_relu_inner_avx2_float(const float* r0, int64_t ld, int64_t row_w,
                                                  int64_t n, float b, int32_t p0, float* out,
                                                  int32_t* idx) {
  const float* rows[4] = {r0, r0 + ld, r0 + row_w * ld, r0 + row_w * ld + ld};
  const int32_t w = static_cast<int32_t>(row_w);
  const __m256 tap[4] = {
      _mm256_castsi256_ps(_mm256_set1_epi32(p0)), _mm256_castsi256_ps(_mm256_set1_epi32(p0 + 1)),
      _mm256_castsi256_ps(_mm256_set1_epi32(p0 + w)),
      _mm256_castsi256_ps(_mm256_set1_epi32(p0 + w + 1))};
  const __m256 bias = _mm256_set1_ps(b);
  for (int64_t i = 0; i < n; i += 8) {
    __m256 best = _mm256_loadu_ps(rows[0] + i);
    if (kBias) best = _mm256_add_ps(best, bias);
    __m256 at = tap[0];  // the indices' bits, blended as floats
    for (int t = 1; t < 4; ++t) {
      __m256 v = _mm256_loadu_ps(rows[t] + i);
      if (kBias) v = _mm256_add_ps(v, bias);
      // A later tap wins if larger, or NaN (max_pool2d's rule).
      const __m256 wins = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ),
                                       _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      best = _mm256_blendv_ps(best, v, wins);
      at = _mm256_blendv_ps(at, tap[t], wins);
    }
    // relu: the maximum where it is > 0 or NaN, +0 elsewhere.
    const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(best, _mm256_setzero_ps(), _CMP_GT_OQ),
                                     _mm256_cmp_ps(best, best, _CMP_UNORD_Q));
    _mm256_storeu_ps(out + i, _mm256_and_ps(best, keep));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + i), _mm256_castps_si256(at));
  }
}

template <typename T, typename S>
void forward_batch_inner_pool2x2_relu(const Geometry& g, const S* x, const T* w, const T* bias,
                                      T* out, int64_t* indices) {
  const int64_t OW = g.out_w, P = g.out_pixels(), PH = g.out_h / 2, PW = g.out_w / 2;
  const int64_t Q = PH * PW, F = g.out_channels * Q;  // pooled pixels per plane, per image
  using I = PoolIndex<T>;
  const cpu::Isa level = cpu::isa_for(Family::Conv2d);
  // (On several threads at once where the batch is split by images: scratch of its own.)
  forward_batch_inner_chunks<T>(g, x, w, [&](int64_t n0, int64_t nb, const T* yt, int64_t ld) {
    const int64_t nbc = round_up(nb, cpu::simd_width<T>());
    // Pooled Y^T, with yt's ld (not zeroed: every row is written for the lanes the transposes
    // read).
    CachedBuffer<T> pooled(static_cast<size_t>(F * ld), /*zero=*/false);
    CachedBuffer<I> at(static_cast<size_t>(F * ld), /*zero=*/false);
    // float's int32 indices, transposed to NCHW before their widening to int64.
    CachedBuffer<I> at_nchw(sizeof(I) == 4 ? static_cast<size_t>(F * nb) : 0, /*zero=*/false);
    at::parallel_for(0, F, grain_for(4.0 * double(nbc)), [&](int64_t f0, int64_t f1) {
      for (int64_t f = f0; f < f1; ++f) {
        const int64_t co = f / Q, ph = (f % Q) / PW, pw = f % PW;
        const int64_t p0 = 2 * ph * OW + 2 * pw;  // the window's top-left pixel in the plane
        const T* r0 = yt + (co * P + p0) * ld;
        T* o = pooled.data() + f * ld;
        I* i = at.data() + f * ld;
        if constexpr (std::is_same_v<T, float>) {
          if (level == cpu::Isa::Avx512) {
            if (bias)
              pool2x2_relu_inner_avx512_float<true>(r0, ld, OW, nbc, bias[co], p0, o, i);
            else
              pool2x2_relu_inner_avx512_float<false>(r0, ld, OW, nbc, 0.f, p0, o, i);
            continue;
          }
          if (level == cpu::Isa::Avx2) {
            if (bias)
              pool2x2_relu_inner_avx2_float<true>(r0, ld, OW, nbc, bias[co], p0, o, i);
            else
              pool2x2_relu_inner_avx2_float<false>(r0, ld, OW, nbc, 0.f, p0, o, i);
            continue;
          }
        }
        if (bias)
          pool2x2_bias_relu_inner(r0, ld, OW, nbc, bias[co], static_cast<I>(p0), o, i);
        else
          pool2x2_relu_inner(r0, ld, OW, nbc, T(0), static_cast<I>(p0), o, i);
      }
    });
    from_inner_parallel(static_cast<const T*>(pooled.data()), ld, nb, F, out + n0 * F,
                        static_cast<const T*>(nullptr), 1);
    // The indices' bits move as T (a transpose only copies them).
    using Bits = std::conditional_t<sizeof(I) == 4, float, double>;
    if constexpr (sizeof(I) == 8) {
      from_inner_parallel(reinterpret_cast<const Bits*>(at.data()), ld, nb, F,
                          reinterpret_cast<Bits*>(indices + n0 * F),
                          static_cast<const Bits*>(nullptr), 1);
    } else {
      from_inner_parallel(reinterpret_cast<const Bits*>(at.data()), ld, nb, F,
                          reinterpret_cast<Bits*>(at_nchw.data()),
                          static_cast<const Bits*>(nullptr), 1);
      int64_t* dst = indices + n0 * F;
      const I* src = at_nchw.data();
      at::parallel_for(0, nb * F, kFromInnerParallel, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) dst[i] = src[i];
      });
    }
  });
}

// ---- The fused backward: a 2x2 / stride-2 max-pool's gradient straight into dY^T ----------
//
// conv2d_relu_max_pool2d's backward (LeNet's conv2 block) unpooled its masked gradient into an
// NCHW image of the convolution's output, which the backward then transposed into dY^T: two
// passes over the image (20 + 17 us of the block's 445 at batch 64). Here each window's gradient
// goes straight to the dY^T row of the tap its index names, 0 to the window's other taps: one
// pass, which reads the pooled gradient (a quarter of the image) by gathers. A/B, medians of
// 1500 calls in three alternating runs: the block's backward 432-442 -> 418-420 us at batch
// 64, 1542-1572 -> 1498-1499 at 256.
//
// Rows of the chunk's dyt: dyt[(co * P + p) * ld + n] for n < nbc = pg[(n0 + n) * F + f] where
// idx (same layout, int64) names p, f = co * Q + q the window over p; 0 at its other taps, at
// the pixels in no window (an odd last row or column) and in the batch padding (n >= nb).
// False (dyt partly written) at an index that is not one of its window's taps: the caller then
// takes the general unpooling, which scatters it, or names it if outside its plane.
template <typename T>
bool unpool2x2_window(const T* pg, const int64_t* idx, int64_t F, int64_t f, int64_t nb,
                      int64_t nbc, int64_t p0, int64_t row_w, T* const rows[4]) {
  const int64_t tap[4] = {p0, p0 + 1, p0 + row_w, p0 + row_w + 1};
  for (int64_t n = 0; n < nb; ++n) {
    const T v = pg[n * F + f];
    const int64_t at = idx[n * F + f];
    bool hit = false;
    for (int t = 0; t < 4; ++t) {
      rows[t][n] = at == tap[t] ? v : T(0);
      hit |= at == tap[t];
    }
    if (!hit) return false;
  }
  for (int t = 0; t < 4; ++t)
    for (int64_t n = nb; n < nbc; ++n) rows[t][n] = T(0);
  return true;
}

// float with AVX-512: 16 images a step, by gathers (their rows F floats apart); the indices'
// int64 lanes compared in two halves. (GCC 12's false uninitialized warnings: as above.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
PE_TARGET_AVX512 bool unpool2x2_window_avx512(const float* pg, const int64_t* idx, int64_t F,
                                              int64_t f, int64_t nb, int64_t nbc, int64_t p0,
                                              int64_t row_w, float* const rows[4]) {
  const __m512i lane = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(F)));
  const __m256i lane_lo = _mm512_castsi512_si256(lane);
  const __m256i lane_hi = _mm512_extracti64x4_epi64(lane, 1);
  const int64_t tap[4] = {p0, p0 + 1, p0 + row_w, p0 + row_w + 1};
  for (int64_t n0 = 0; n0 < nbc; n0 += 16) {
    const int64_t real = std::max<int64_t>(0, std::min<int64_t>(16, nb - n0));
    const __mmask16 m = static_cast<__mmask16>(real == 16 ? 0xffffu : (1u << real) - 1u);
    const float* pv = pg + n0 * F + f;
    const int64_t* pi = idx + n0 * F + f;
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, lane, pv, 4);
    const __m512i ilo = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(),
                                                    static_cast<__mmask8>(m), lane_lo, pi, 8);
    const __m512i ihi = _mm512_mask_i32gather_epi64(
        _mm512_setzero_si512(), static_cast<__mmask8>(m >> 8), lane_hi, pi, 8);
    __mmask16 any = 0;
    for (int t = 0; t < 4; ++t) {
      const __m512i want = _mm512_set1_epi64(tap[t]);
      const __mmask16 hit = static_cast<__mmask16>(
          (_mm512_cmpeq_epi64_mask(ilo, want) | (_mm512_cmpeq_epi64_mask(ihi, want) << 8)) & m);
      _mm512_storeu_ps(rows[t] + n0, _mm512_maskz_mov_ps(hit, v));
      any |= hit;
    }
    if (any != m) return false;
  }
  return true;
}

// The same with AVX2: 8 images a step, by gathers; the int64 indices gathered in two halves of
// 4 and their compare masks narrowed to 8 float lanes. The portable loop (a branch per tap and
// per image) took 11% of LeNet's conv2 block backward on a Zen 3 (perf, batch 64, one thread).
PE_TARGET_AVX2 bool unpool2x2_window_avx2(const float* pg, const int64_t* idx, int64_t F,
                                          int64_t f, int64_t nb, int64_t nbc, int64_t p0,
                                          int64_t row_w, float* const rows[4]) {
  const int32_t Fi = static_cast<int32_t>(F);
  const __m256i lane = _mm256_setr_epi32(0, Fi, 2 * Fi, 3 * Fi, 4 * Fi, 5 * Fi, 6 * Fi, 7 * Fi);
  const __m128i lane_lo = _mm256_castsi256_si128(lane);
  const __m128i lane_hi = _mm256_extracti128_si256(lane, 1);
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const int64_t tap[4] = {p0, p0 + 1, p0 + row_w, p0 + row_w + 1};
  for (int64_t n0 = 0; n0 < nbc; n0 += 8) {
    const int64_t real = std::max<int64_t>(0, std::min<int64_t>(8, nb - n0));
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(real)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i m64_lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(m));
    const __m256i m64_hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(m, 1));
    const float* pv = pg + n0 * F + f;
    const long long* pi = reinterpret_cast<const long long*>(idx + n0 * F + f);
    const __m256 v = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), pv, lane,
                                              _mm256_castsi256_ps(m), 4);
    const __m256i ilo = _mm256_mask_i32gather_epi64(_mm256_setzero_si256(), pi, lane_lo,
                                                    m64_lo, 8);
    const __m256i ihi = _mm256_mask_i32gather_epi64(_mm256_setzero_si256(), pi, lane_hi,
                                                    m64_hi, 8);
    __m256i any = _mm256_setzero_si256();
    for (int t = 0; t < 4; ++t) {
      const __m256i want = _mm256_set1_epi64x(tap[t]);
      // Each 64-bit lane's compare is all ones or all zeros: its low 32 bits, lanes 0-3 from
      // the low half of the images, 4-7 from the high half.
      const __m256i lo = _mm256_permutevar8x32_epi32(_mm256_cmpeq_epi64(ilo, want), low_halves);
      const __m256i hi = _mm256_permutevar8x32_epi32(_mm256_cmpeq_epi64(ihi, want), low_halves);
      const __m256i hit = _mm256_and_si256(_mm256_permute2x128_si256(lo, hi, 0x20), m);
      _mm256_storeu_ps(rows[t] + n0, _mm256_and_ps(v, _mm256_castsi256_ps(hit)));
      any = _mm256_or_si256(any, hit);
    }
    // Every real image's index must be one of the taps.
    if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_xor_si256(any, m))) != 0) return false;
  }
  return true;
}
#pragma GCC diagnostic pop

template <typename T>
bool unpool2x2_inner(const Geometry& g, const T* pg, const int64_t* idx, int64_t nb, int64_t nbc,
                     T* dyt, int64_t ld) {
  const int64_t OW = g.out_w, P = g.out_pixels(), PH = g.out_h / 2, PW = g.out_w / 2;
  const int64_t Q = PH * PW, F = g.out_channels * Q;
  const cpu::Isa level = cpu::isa_for(Family::Conv2d);
  // (the gathers' lane offsets, up to 15 F with AVX-512 and 7 F with AVX2, are int32)
  const bool avx512 = std::is_same_v<T, float> && level == cpu::Isa::Avx512 &&
                      F * 16 < (int64_t(1) << 31);
  const bool avx2 =
      std::is_same_v<T, float> && level == cpu::Isa::Avx2 && F * 8 < (int64_t(1) << 31);
  std::atomic<bool> ok{true};
  at::parallel_for(0, F, grain_for(4.0 * double(nbc)), [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1 && ok; ++f) {
      const int64_t co = f / Q, ph = (f % Q) / PW, pw = f % PW;
      const int64_t p0 = 2 * ph * OW + 2 * pw;
      T* const base = dyt + (co * P + p0) * ld;
      T* const rows[4] = {base, base + ld, base + OW * ld, base + (OW + 1) * ld};
      bool good;
      if constexpr (std::is_same_v<T, float>) {
        good = avx512 ? unpool2x2_window_avx512(pg, idx, F, f, nb, nbc, p0, OW, rows)
               : avx2 ? unpool2x2_window_avx2(pg, idx, F, f, nb, nbc, p0, OW, rows)
                      : unpool2x2_window(pg, idx, F, f, nb, nbc, p0, OW, rows);
      } else {
        good = unpool2x2_window(pg, idx, F, f, nb, nbc, p0, OW, rows);
      }
      if (!good) ok = false;
    }
  });
  // Pixels in no window: an odd output's last row and column.
  for (int64_t co = 0; co < g.out_channels; ++co)
    for (int64_t p = 0; p < P; ++p)
      if (p / OW >= 2 * PH || p % OW >= 2 * PW)
        std::fill(dyt + (co * P + p) * ld, dyt + (co * P + p) * ld + nbc, T(0));
  return ok;
}

template <typename T, typename S>
bool backward_batch_inner(const Geometry& g, const T* dy, const S* x, const T* w, T* dx, T* dw,
                          T* db, const PooledGrad<T>* pooled) {
  const int64_t K = g.taps_per_group(), P = g.out_pixels();
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t vw = cpu::simd_width<T>();
  const int64_t f_in = g.in_image(), f_out = g.out_image(), hw = g.in_pixels();
  // ld: a batch vector per pixel, off 512-byte multiples (gemm.h in_place_ld: 256 floats per
  // pixel put a tap panel in a quarter of L1's sets).
  const int64_t chunk = std::min(g.batch, kInnerBatch), ld = in_place_ld<T>(round_up(chunk, vw));
  const int64_t khw = g.kernel_pixels();
  // Not zeroed, as in the forward (gemm_indirect writes zeros for a pixel no tap reaches).
  cpu::CachedBuffer<T> dyt(static_cast<size_t>(f_out * ld), /*zero=*/false);
  cpu::CachedBuffer<T> xt(dw ? static_cast<size_t>(f_in * ld) : 0, /*zero=*/false);
  cpu::CachedBuffer<T> dxt(dx ? static_cast<size_t>(f_in * ld) : 0, /*zero=*/false);
  std::vector<T> zeros(dw ? static_cast<size_t>(ld) : 0, T(0));
  std::vector<const T*> taps(dw ? static_cast<size_t>(P * K) : 0);
  const Taps tap = make_taps(g);
  // For grad_input: weights as [co][ki][kj][ci], so a tap's weights over C_in/g are contiguous.
  std::vector<T> wt(dx ? static_cast<size_t>(g.out_channels * K) : 0);
  if (dx)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t r = 0; r < khw; ++r)
          wt[(co * khw + r) * cin_g + ci] = w[(co * cin_g + ci) * khw + r];
  if (db) std::fill(db, db + g.out_channels, T(0));
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t nb = std::min(chunk, g.batch - n0), nbc = round_up(nb, vw);
    if (!pooled)
      to_inner_parallel(dy + n0 * f_out, nb, f_out, dyt.data(), ld, nbc);
    else if (!unpool2x2_inner(g, pooled->grad + n0 * pooled->per_image,
                              pooled->indices + n0 * pooled->per_image, nb, nbc, dyt.data(), ld))
      return false;
    // db[co] += sum over pixels of dY^T[co, p, :nbc] (the batch padding is zero): vectorised,
    // pixels and batch chunks in order. One row_sums call per channel (its P row sums, then
    // added in pixel order; the same bits as a call per pixel, which cost 21 us of LeNet
    // conv2's 470 at batch 64, 16 now).
    if (db) {
      std::vector<T> pixel_sums(static_cast<size_t>(P));
      for (int64_t co = 0; co < g.out_channels; ++co) {
        std::fill(pixel_sums.begin(), pixel_sums.end(), T(0));
        row_sums(dyt.data() + co * P * ld, ld, P, nbc, pixel_sums.data());
        for (int64_t p = 0; p < P; ++p) db[co] += pixel_sums[p];
      }
    }
    if (dw) {
      to_inner_parallel(x + n0 * f_in, nb, f_in, xt.data(), ld, nbc);
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        for (int64_t p = 0; p < P; ++p) {
          const int64_t oh = p / g.out_w, ow = p % g.out_w;
          const T* xg = xt.data() + (grp * cin_g * hw + oh * g.in_w + ow) * ld;
          const T** row = taps.data() + p * K;
          if (tap.interior(oh, ow)) {
            for (int64_t k = 0; k < K; ++k) row[k] = xg + tap.off[k] * ld;
          } else {
            for (int64_t k = 0; k < K; ++k) {
              const int64_t ih = oh + tap.dh[k], iw = ow + tap.dw[k];
              const bool padding = ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w;
              row[k] = padding ? zeros.data() : xg + tap.off[k] * ld;
            }
          }
        }
        // dW[co, k] (+)= sum over pixels p and the batch of dY^T[co, p][:] X^T[tap k of p][:]
        cpu::gemm_dot_segments<T>(cout_g, K, P, nbc, dyt.data() + grp * cout_g * P * ld, P * ld,
                                  ld, taps.data(), dw + grp * cout_g * K, K, 1,
                                  /*accumulate=*/n0 > 0);
      }
    }
    if (dx) {
      const double pixel_work = double(g.out_channels * K * nbc) * P / std::max<int64_t>(1, hw);
      at::parallel_for(0, hw, grain_for(pixel_work), [&](int64_t q0, int64_t q1) {
        const size_t most = static_cast<size_t>(cout_g * khw);
        std::vector<const T*> arows(most), brows(most);
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t ih = q / g.in_w, iw = q % g.in_w;
          // Taps (ki, kj) that reach input pixel (ih, iw): oh = ih + ph - ki*dh in [0, OH),
          // ow = iw + pw - kj*dw in [0, OW): a range of ki and a range of kj.
          auto range = [](int64_t i, int64_t pad, int64_t d, int64_t out, int64_t k,
                          int64_t& lo, int64_t& hi) {
            const int64_t top = i + pad;  // k*d <= top and k*d > top - out
            lo = top - out + 1 <= 0 ? 0 : ceil_div(top - out + 1, d);
            hi = top < 0 ? 0 : std::min(k, top / d + 1);
          };
          int64_t ki_lo, ki_hi, kj_lo, kj_hi;
          range(ih, g.padding_h, g.dilation_h, g.out_h, g.kernel_h, ki_lo, ki_hi);
          range(iw, g.padding_w, g.dilation_w, g.out_w, g.kernel_w, kj_lo, kj_hi);
          for (int64_t grp = 0; grp < g.groups; ++grp) {
            int64_t count = 0;
            for (int64_t co = grp * cout_g; co < (grp + 1) * cout_g; ++co)
              for (int64_t ki = ki_lo; ki < ki_hi; ++ki) {
                const int64_t oh = ih + g.padding_h - ki * g.dilation_h;
                const int64_t ow = iw + g.padding_w - kj_lo * g.dilation_w;
                const T* a = wt.data() + (co * khw + ki * g.kernel_w + kj_lo) * cin_g;
                const T* b = dyt.data() + (co * P + oh * g.out_w + ow) * ld;
                for (int64_t kj = kj_lo; kj < kj_hi; ++kj, a += cin_g, b -= g.dilation_w * ld) {
                  arows[count] = a;
                  brows[count] = b;
                  ++count;
                }
              }
            cpu::gemm_indirect<T>(cin_g, nbc, count, arows.data(), brows.data(),
                                  dxt.data() + (grp * cin_g * hw + q) * ld, hw * ld, 1, false);
          }
        }
      });
      from_inner_parallel(dxt.data(), ld, nb, f_in, dx + n0 * f_in, static_cast<const T*>(nullptr),
                          1);
    }
  }
  return true;
}

#define PE_INSTANTIATE(T, S)                                                                  \
  template void forward_batch_inner<T, S>(const Geometry&, const S*, const T*, const T*, T*);    \
  template void forward_batch_inner_pool2x2_relu<T, S>(const Geometry&, const S*, const T*,      \
                                                       const T*, T*, int64_t*);                 \
  template bool backward_batch_inner<T, S>(const Geometry&, const T*, const S*, const T*, T*,    \
                                           T*, T*, const PooledGrad<T>*);
PE_INSTANTIATE(float, float)
PE_INSTANTIATE(double, double)
PE_INSTANTIATE(float, c10::BFloat16)
#undef PE_INSTANTIATE

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
