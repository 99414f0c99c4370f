// The direct algorithm of the CPU conv2d forward and grad_weight (interface: cpu/conv2d.h; when it
// is chosen: cpu/conv2d.cpp): for layers with few output channels and a stride of 1, such as
// LeNet's conv1 (1 -> 6, 5x5, 32x32 -> 28x28), where any GEMM formulation is mostly data movement,
// and for the forward of wider layers with few taps (an RGB input's 3 -> 64 3x3: direct_fits).
//
// Each output value is computed where it is stored: a block of 4 output rows x 16 columns (a
// vector) x 6 output channels (24 accumulators in registers) sums, tap by tap, the 4 input rows'
// vectors (loaded from a zero-padded copy of the input plane, so every load is in bounds)
// times each channel's weight (broadcast). Per tap: 4 loads, 6 broadcasts, 24 FMAs. Columns go
// in vectors of 16, the last one overlapping the one before where the width is not a multiple
// (its shared columns come out bitwise the same from both: same operations, same order).
//
// Napkin math (LeNet conv1 at batch 256; reference machine: csrc/cpu/README.md): 30 M
// multiply-adds; the 28-wide rows fill 28 of 32 lanes, so ~34 M lane-FMAs = 2.1 M vector FMAs,
// ~1.1 M cycles at two per cycle: ~0.15 ms on 2 cores. im2col + GEMM moved 25 copies of every
// pixel through memory first (28% of its time) and scattered the result (10%).
//
// Deterministic: every output sums its bias, then its taps in (ci, ki, kj) order.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "cpu/allocator.h"
#include "cpu/conv2d.h"
#include "cpu/convert.h"
#include "cpu/isa.h"

namespace pyengine {
namespace cpu {
namespace conv2d {
namespace {

constexpr int kCo = 6;  // output channels per block

// Vectors per level. Columns go in chunks of V = 64 bytes (16 floats) on every level; AVX2 and
// SSE2 take a chunk as 32- or 16-byte vectors, one pass each. (64-byte GCC vectors compiled for
// AVX2 are not split into register pairs but assembled through general registers and the
// stack: on an AVX2 machine LeNet's conv1 forward took 27 ms at batch 256, torch's 5.4, one
// thread.) Every output and every weight sum adds the same terms in the same order on each
// level: the same bits.
// Forward: output rows per block, 4 on AVX-512 (24 accumulators of its 32 registers), 2 below
// (12 of 16).
constexpr int kRowsAvx512 = 4, kRowsNarrow = 2;

// Zero-padded input planes of one image and group: [cin_g][hp][wpp].
struct Padded {
  int64_t hp, wpp, plane;
};

Padded make_padded(const Geometry& g) {
  Padded p;
  p.hp = g.in_h + 2 * g.padding_h;
  // A 16-wide vector loaded at column out_w - 16 + kw - 1 ends at in_w + 2 * padding_w: in
  // bounds; the slack covers double vectors' 8 as well.
  p.wpp = g.in_w + 2 * g.padding_w + 16;
  p.plane = p.hp * p.wpp;
  return p;
}

// R output rows from oh0, columns ow0 .. ow0 + V, channels [0, nco) of a block, in passes of
// kBytes-wide vectors.
template <typename T, int R, int kBytes>
PE_INLINE void block(const T* planes, const Padded& pd, int64_t cin_g, int64_t kh, int64_t kw,
                     const T* wb, const T* b6, T* y, int64_t P, int64_t OW, int64_t nco,
                     int64_t oh0, int64_t ow0) {
  typedef T vec __attribute__((vector_size(kBytes)));
  typedef T uvec __attribute__((vector_size(kBytes), aligned(sizeof(T)), may_alias));
  constexpr int64_t V = 64 / sizeof(T), W = kBytes / sizeof(T);
  for (int64_t h = 0; h < V; h += W) {
    vec acc[R][kCo];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < kCo; ++c) acc[r][c] = vec{} + b6[c];
    const T* w = wb;
    for (int64_t ci = 0; ci < cin_g; ++ci) {
      const T* pc = planes + ci * pd.plane + oh0 * pd.wpp + ow0 + h;
      for (int64_t ki = 0; ki < kh; ++ki) {
        const T* prow = pc + ki * pd.wpp;
        for (int64_t kj = 0; kj < kw; ++kj, w += kCo) {
          vec x[R];
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
            x[r] = *reinterpret_cast<const uvec*>(prow + r * pd.wpp + kj);
#pragma GCC unroll 8
          for (int c = 0; c < kCo; ++c) {
            const T wc = w[c];
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) acc[r][c] += wc * x[r];
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < nco; ++c)
        *reinterpret_cast<uvec*>(y + c * P + (oh0 + r) * OW + ow0 + h) = acc[r][c];
  }
}

// Every output row and column of one image, group and block of channels, kRows rows at a time.
template <typename T, int kRows, int kBytes>
PE_INLINE void channels_impl(const Geometry& g, const T* planes, const T* wb, const T* b6, T* y,
                             int64_t nco) {
  constexpr int64_t V = 64 / sizeof(T);
  const Padded pd = make_padded(g);
  const int64_t OH = g.out_h, OW = g.out_w, P = g.out_pixels(), cin_g = g.in_channels_per_group();
  for (int64_t ow = 0; ow < OW; ow += V) {
    const int64_t ow0 = std::min(ow, OW - V);  // the last vector overlaps the one before
    int64_t oh0 = 0;
    for (; oh0 + kRows <= OH; oh0 += kRows)
      block<T, kRows, kBytes>(planes, pd, cin_g, g.kernel_h, g.kernel_w, wb, b6, y, P, OW, nco, oh0, ow0);
    for (; oh0 < OH; ++oh0)
      block<T, 1, kBytes>(planes, pd, cin_g, g.kernel_h, g.kernel_w, wb, b6, y, P, OW, nco, oh0, ow0);
  }
}

// ---- grad_weight ---------------------------------------------------------------------------
// Napkin math (LeNet conv1 at batch 256): the same 30 M multiply-adds as the forward; per image
// 5 kernel rows x 28 output rows x 2 row chunks x (24 + 6) FMAs = 8400 vector FMAs, ~0.15 ms on
// 2 cores at two per cycle. Measured: 284 us in a loop (im2col + GEMM: 382 us), the kernel ~70%
// of it (perf); the rest is copying dY's rows and X's planes into the padded scratch.
// dW[co, ci, ki, kj] = sum over images and output pixels of dY[co, oh, ow] X[ci, oh + ki, ow + kj]
// (the zero-padded input). A block of 6 channels x up to 4 kernel columns keeps 24 vector
// accumulators (lane l sums the pixels of column ow0 + l) beside the 6 dY vectors of a row chunk
// and one X vector: per row chunk 6 + KJ loads for 6 * KJ FMAs. dY rows are read from a copy
// padded to whole vectors with zeros; X's lanes past the row's end are set to zero (an Inf there
// times dY's zero would be a NaN torch has no term for).
constexpr int kKj = 4;  // kernel columns per grad_weight block (the accumulators' layout)

// The accumulators keep 64-byte lanes on every level: lane l sums the pixels of column ow0 + l.
// On AVX-512 one call holds a block of KJ <= 4 kernel columns (24 registers of 32); below, one
// kernel column in passes of narrower vectors (6 accumulators, 6 dY vectors and X: 13 of 16).
template <typename T, int KJ, int kBytes>
PE_INLINE void weight_block(const T* dyb, int64_t dy_plane, int64_t dy_ld, const T* xb,
                            int64_t wpp, int64_t OH, int64_t OW, T* accp) {
  typedef T vec __attribute__((vector_size(kBytes)));
  typedef T uvec __attribute__((vector_size(kBytes), aligned(sizeof(T)), may_alias));
  typedef decltype(vec{} < vec{}) ivec;
  constexpr int64_t V = 64 / sizeof(T);      // lanes of the accumulators' layout
  constexpr int64_t W = kBytes / sizeof(T);  // lanes of one pass
  const int64_t full = OW / V * V;
  for (int64_t h = 0; h < V; h += W) {
    vec acc[kCo][KJ];
#pragma GCC unroll 8
    for (int c = 0; c < kCo; ++c)
#pragma GCC unroll 8
      for (int j = 0; j < KJ; ++j)
        acc[c][j] = *reinterpret_cast<const uvec*>(accp + (c * kKj + j) * V + h);
    ivec in_row;  // the tail chunk's lanes inside the row
    for (int64_t l = 0; l < W; ++l) in_row[l] = h + l < OW - full ? -1 : 0;
    for (int64_t oh = 0; oh < OH; ++oh) {
      const T* dr = dyb + oh * dy_ld + h;
      const T* xr = xb + oh * wpp + h;
      for (int64_t ow0 = 0; ow0 < OW; ow0 += V) {
        const bool tail = ow0 == full;
        vec d[kCo];
#pragma GCC unroll 8
        for (int c = 0; c < kCo; ++c)
          d[c] = *reinterpret_cast<const uvec*>(dr + c * dy_plane + ow0);
#pragma GCC unroll 8
        for (int j = 0; j < KJ; ++j) {
          vec xv = *reinterpret_cast<const uvec*>(xr + ow0 + j);
          if (tail) xv = in_row ? xv : vec{};
#pragma GCC unroll 8
          for (int c = 0; c < kCo; ++c) acc[c][j] += d[c] * xv;
        }
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < kCo; ++c)
#pragma GCC unroll 8
      for (int j = 0; j < KJ; ++j)
        *reinterpret_cast<uvec*>(accp + (c * kKj + j) * V + h) = acc[c][j];
  }
}

// weight_block over `cols` <= KJ kernel columns.
template <typename T, int KJ, int kBytes>
PE_INLINE void weight_columns(int64_t cols, const T* dyb, int64_t dy_plane, int64_t dy_ld,
                              const T* xb, int64_t wpp, int64_t OH, int64_t OW, T* accp) {
  if constexpr (KJ > 1) {
    if (cols < KJ)
      return weight_columns<T, KJ - 1, kBytes>(cols, dyb, dy_plane, dy_ld, xb, wpp, OH, OW,
                                               accp);
  }
  weight_block<T, KJ, kBytes>(dyb, dy_plane, dy_ld, xb, wpp, OH, OW, accp);
}

// One image and group: every block of channels, input channel, kernel row and block of kernel
// columns adds to its vector accumulators (accp: [blk][ci][ki][kjb][kCo][kKj][V]).
// dyp: [blocks * kCo][OH][dy_ld], zero-padded.
// kBytes, kKjPass: weight_block's vector bytes and most kernel columns per call on this level.
template <typename T, int kBytes, int kKjPass>
PE_INLINE void weight_image_impl(const Geometry& g, const T* planes, const T* dyp, int64_t dy_ld,
                                 T* accp) {
  constexpr int64_t V = 64 / sizeof(T);
  const Padded pd = make_padded(g);
  const int64_t OH = g.out_h, OW = g.out_w, cin_g = g.in_channels_per_group();
  const int64_t blocks = ceil_div(g.out_channels_per_group(), int64_t(kCo));
  const int64_t kjb = ceil_div(g.kernel_w, int64_t(kKj)), dy_plane = OH * dy_ld;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const T* dyb = dyp + blk * kCo * dy_plane;
    for (int64_t ci = 0; ci < cin_g; ++ci)
      for (int64_t ki = 0; ki < g.kernel_h; ++ki)
        for (int64_t b = 0; b < kjb; ++b) {
          const T* xb = planes + ci * pd.plane + ki * pd.wpp + b * kKj;
          T* ap = accp + (((blk * cin_g + ci) * g.kernel_h + ki) * kjb + b) * kCo * kKj * V;
          const int64_t cols = std::min<int64_t>(kKj, g.kernel_w - b * kKj);
          for (int64_t j0 = 0; j0 < cols; j0 += kKjPass)
            weight_columns<T, kKjPass, kBytes>(std::min<int64_t>(kKjPass, cols - j0), dyb,
                                               dy_plane, dy_ld, xb + j0, pd.wpp, OH, OW,
                                               ap + j0 * V);
        }
  }
}

#define PE_DEFINE_DIRECT_WEIGHT(T)                                                           \
  PE_ISA_FUNCTION_PER_LEVEL(Family::Conv2d, void, weight_image,                              \
                            (const Geometry& g, const T* planes, const T* dyp, int64_t dy_ld, \
                             T* accp),                                                       \
                            (g, planes, dyp, dy_ld, accp),                                   \
                            (weight_image_impl<T, 64, kKj>), (weight_image_impl<T, 32, 1>),  \
                            (weight_image_impl<T, 16, 1>))
PE_DEFINE_DIRECT_WEIGHT(float)
PE_DEFINE_DIRECT_WEIGHT(double)
#undef PE_DEFINE_DIRECT_WEIGHT

#define PE_DEFINE_DIRECT(T)                                                                   \
  PE_ISA_FUNCTION_PER_LEVEL(Family::Conv2d, void, direct_channels,                            \
                            (const Geometry& g, const T* planes, const T* wb, const T* b6,    \
                             T* y, int64_t nco),                                              \
                            (g, planes, wb, b6, y, nco), (channels_impl<T, kRowsAvx512, 64>), \
                            (channels_impl<T, kRowsNarrow, 32>),                              \
                            (channels_impl<T, kRowsNarrow, 16>))
PE_DEFINE_DIRECT(float)
PE_DEFINE_DIRECT(double)
#undef PE_DEFINE_DIRECT

}  // namespace

namespace {

// Where the kernel runs at all: stride 1, undilated, rows of at least a vector of doubles (the
// overlapping last vector needs a whole one), a filter small enough that its weights stay in L1.
// (Wider rows of floats than 16 are the common case: LeNet's 28.)
bool direct_runs(const Geometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1 &&
         g.out_w >= 16 && g.taps_per_group() * kCo <= 4096;
}

// A wide layer (16 or more output channels per group, the implicit GEMM's) with few taps per
// output, such as an RGB input's first 3x3 layer (3 -> 64: 27 taps), whose rows fill the 16-column
// chunks: the implicit GEMM's per-output costs (its Y^T scratch transposed into NCHW) then
// outweigh its multiply-adds, and the direct kernel, which stores each output where it computes
// it, is faster. Measured against the implicit GEMM (AVX2, one thread; same process, builds
// alternating): 27 taps, 64 output channels, rows of 32 0.70-0.75x (3 -> 16 / 32 / 128 alike),
// 28 0.83-0.88, 48 0.93, 64 0.88, 128 0.84, 56 0.89-1.07, 16 0.98-1.05; 72-75 taps (8 -> 64 3x3,
// 3 -> 64 5x5) 0.75 at 32, 0.89 at 64; 144 taps (16 -> 64) 0.83 at 32 but 0.99-1.04 at 28, 56
// and 64. Rows that leave a chunk mostly empty lose: 20 columns (two chunks for 20) 1.25x.
// A 1x1 layer's GEMM stays where it is (pointwise, cpu/conv2d.cpp).
bool direct_beats_implicit(const Geometry& g) {
  constexpr int64_t kMostTaps = 80, kChunk = 16;
  const int64_t padded_w = ceil_div(g.out_w, kChunk) * kChunk;
  return g.kernel_h * g.kernel_w > 1 && g.taps_per_group() <= kMostTaps &&
         double(padded_w) <= 1.15 * double(g.out_w);
}

}  // namespace

bool direct_fits(const Geometry& g) {
  return direct_runs(g) && (g.out_channels_per_group() < 16 || direct_beats_implicit(g));
}

template <typename T, typename S>
void forward_direct(const Geometry& g, const S* x, const T* w, const T* bias, T* y,
                    const YImage<T>* y_done) {
  TORCH_INTERNAL_ASSERT(!y_done || g.groups == 1);
  const Padded pd = make_padded(g);
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t K = g.taps_per_group(), P = g.out_pixels();
  const int64_t blocks = ceil_div(cout_g, int64_t(kCo));
  // Weights per block: wb[grp][block][k][c] (zero for channels past cout_g); bias likewise.
  CachedBuffer<T> wb(static_cast<size_t>(g.groups * blocks * K * kCo));
  CachedBuffer<T> bb(static_cast<size_t>(g.groups * blocks * kCo));
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t co = 0; co < cout_g; ++co) {
      const int64_t blk = co / kCo, c = co % kCo, oc = grp * cout_g + co;
      T* dst = wb.data() + ((grp * blocks + blk) * K) * kCo + c;
      for (int64_t k = 0; k < K; ++k) dst[k * kCo] = w[oc * K + k];
      if (bias) bb[(grp * blocks + blk) * kCo + c] = bias[oc];
    }
  // Tasks: (image, group, block of channels), images outermost, so that a batch smaller than
  // the thread count still busies every thread (3 -> 64 at batch 1: 11 blocks); a thread copies
  // an image's planes once for its run of tasks on that image. A fused caller's y_done takes
  // whole images: one task per image and group.
  const int64_t tasks_per_image = y_done ? 1 : blocks;
  const double work = double(y_done ? cout_g : std::min<int64_t>(kCo, cout_g)) * K * P;
  at::parallel_for(0, g.batch * g.groups * tasks_per_image, grain_for(work),
                   [&](int64_t t0, int64_t t1) {
    CachedBuffer<T> planes(static_cast<size_t>(cin_g * pd.plane));  // zero: the padding
    CachedBuffer<T> image(y_done ? static_cast<size_t>(g.out_image()) : 0, /*zero=*/false);
    int64_t filled = -1;  // the (image, group) in planes
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ng = t / tasks_per_image, n = ng / g.groups, grp = ng % g.groups;
      T* yn = y_done ? image.data() : y + n * g.out_image();
      if (ng != filled) {
        const S* xg = x + n * g.in_image() + grp * cin_g * g.in_pixels();
        for (int64_t ci = 0; ci < cin_g; ++ci)
          for (int64_t ih = 0; ih < g.in_h; ++ih)
            load_row(planes.data() + ci * pd.plane + (ih + g.padding_h) * pd.wpp + g.padding_w,
                     xg + ci * g.in_pixels() + ih * g.in_w, g.in_w);
        filled = ng;
      }
      const int64_t first = y_done ? 0 : t % tasks_per_image;
      const int64_t last = y_done ? blocks : first + 1;
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t co0 = blk * kCo, nco = std::min<int64_t>(kCo, cout_g - co0);
        direct_channels(g, planes.data(), wb.data() + (grp * blocks + blk) * K * kCo,
                        bb.data() + (grp * blocks + blk) * kCo,
                        yn + (grp * cout_g + co0) * P, nco);
      }
      if (y_done) (*y_done)(n, image.data());
    }
  });
}

bool direct_fits_backward_weight(const Geometry& g) {
  // The forward's conditions for narrow layers (wide ones have the implicit GEMM's grad_weight, or
  // im2col's where it does not fit); the vector accumulators of a chunk of images stay within 64 K
  // elements per group.
  return direct_runs(g) && g.out_channels_per_group() < 16 &&
         g.in_channels_per_group() * g.kernel_h * ceil_div(g.kernel_w, int64_t(kKj)) *
                 ceil_div(g.out_channels_per_group(), int64_t(kCo)) * kCo * kKj * 16 <=
             (int64_t(1) << 16);
}

template <typename T, typename S>
void backward_weight_direct(const Geometry& g, const T* dy, const S* x, T* dw, T* db,
                            const DyImage<T>* dy_of) {
  constexpr int64_t V = 64 / sizeof(T);
  const Padded pd = make_padded(g);
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t K = g.taps_per_group(), P = g.out_pixels(), OH = g.out_h, OW = g.out_w;
  const int64_t blocks = ceil_div(cout_g, int64_t(kCo)), kjb = ceil_div(g.kernel_w, int64_t(kKj));
  const int64_t dy_ld = round_up(OW, V);
  // Per chunk of images and group: the weight accumulators.
  const int64_t per_group = blocks * cin_g * g.kernel_h * kjb * kCo * kKj * V;
  const int64_t per_chunk = g.groups * per_group;
  // Images are split into chunks by the shapes only (at most 32, and at most 4 M accumulator
  // elements in all); each chunk's vectors are summed in chunk order at the end, so the result
  // does not depend on the thread count.
  const int64_t most = std::max<int64_t>(1, (int64_t(1) << 22) / per_chunk);
  const int64_t per = ceil_div(g.batch, std::min({g.batch, int64_t(32), most}));
  const int64_t chunks = ceil_div(g.batch, per);
  CachedBuffer<T> partial(static_cast<size_t>(chunks * per_chunk));
  // grad_bias: each image's channel sums (row_sums), added in image order at the end: bias_grad's
  // arithmetic, so the bits do not depend on whether grad_weight was asked for too (they did
  // when the kernel summed dY in its own lanes: a fused block's grad_bias alone, on bias_grad,
  // differed from the one computed beside grad_weight).
  CachedBuffer<T> image_db(static_cast<size_t>(db ? g.batch * g.out_channels : 0));
  const double work = double(per) * g.out_channels * K * P;
  at::parallel_for(0, chunks, work >= 65536.0 ? 1 : chunks, [&](int64_t c0, int64_t c1) {
    CachedBuffer<T> planes(static_cast<size_t>(cin_g * pd.plane));  // zero: the padding
    CachedBuffer<T> dyp(static_cast<size_t>(blocks * kCo * OH * dy_ld));  // zero: the padding
    CachedBuffer<T> made(static_cast<size_t>(dy_of ? g.out_image() : 0), /*zero=*/false);
    for (int64_t chunk = c0; chunk < c1; ++chunk)
      for (int64_t n = chunk * per; n < std::min(g.batch, (chunk + 1) * per); ++n) {
        if (dy_of) (*dy_of)(n, made.data());
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const S* xg = x + n * g.in_image() + grp * cin_g * g.in_pixels();
          for (int64_t ci = 0; ci < cin_g; ++ci)
            for (int64_t ih = 0; ih < g.in_h; ++ih)
              load_row(planes.data() + ci * pd.plane + (ih + g.padding_h) * pd.wpp + g.padding_w,
                       xg + ci * g.in_pixels() + ih * g.in_w, g.in_w);
          const T* dyg = (dy_of ? made.data() : dy + n * g.out_image()) + grp * cout_g * P;
          for (int64_t co = 0; co < cout_g; ++co)
            for (int64_t oh = 0; oh < OH; ++oh)
              std::memcpy(dyp.data() + (co * OH + oh) * dy_ld, dyg + co * P + oh * OW,
                          sizeof(T) * OW);
          weight_image(g, planes.data(), dyp.data(), dy_ld,
                       partial.data() + chunk * per_chunk + grp * per_group);
          if (db)
            row_sums(dyg, P, cout_g, P, image_db.data() + n * g.out_channels + grp * cout_g);
        }
      }
  });
  // Sum the chunks' vectors in order, then each vector's lanes in a fixed tree.
  auto reduce = [&](int64_t offset) {
    T lane[V];
    for (int64_t l = 0; l < V; ++l) lane[l] = T(0);
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t l = 0; l < V; ++l) lane[l] += partial[chunk * per_chunk + offset + l];
    for (int64_t w = V / 2; w >= 1; w /= 2)
      for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
    return lane[0];
  };
  const int64_t khw = g.kernel_pixels();
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t co = 0; co < cout_g; ++co) {
      const int64_t blk = co / kCo, c = co % kCo, oc = grp * cout_g + co;
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t ki = 0; ki < g.kernel_h; ++ki)
          for (int64_t kj = 0; kj < g.kernel_w; ++kj) {
            const int64_t slot =
                ((((blk * cin_g + ci) * g.kernel_h + ki) * kjb + kj / kKj) * kCo + c) * kKj +
                kj % kKj;
            dw[oc * K + ci * khw + ki * g.kernel_w + kj] = reduce(grp * per_group + slot * V);
          }
    }
  for (int64_t oc = 0; db && oc < g.out_channels; ++oc) {
    T sum = T(0);
    for (int64_t n = 0; n < g.batch; ++n) sum += image_db[n * g.out_channels + oc];
    db[oc] = sum;
  }
}

template void forward_direct<float, float>(const Geometry&, const float*, const float*,
                                           const float*, float*, const YImage<float>*);
template void forward_direct<double, double>(const Geometry&, const double*, const double*,
                                             const double*, double*, const YImage<double>*);
template void forward_direct<float, c10::BFloat16>(const Geometry&, const c10::BFloat16*,
                                                   const float*, const float*, float*,
                                                   const YImage<float>*);
template void backward_weight_direct<float, float>(const Geometry&, const float*, const float*,
                                                   float*, float*, const DyImage<float>*);
template void backward_weight_direct<double, double>(const Geometry&, const double*,
                                                     const double*, double*, double*,
                                                     const DyImage<double>*);
template void backward_weight_direct<float, c10::BFloat16>(const Geometry&, const float*,
                                                           const c10::BFloat16*, float*, float*,
                                                           const DyImage<float>*);

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
