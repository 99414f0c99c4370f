// The direct algorithm of the CPU conv2d forward (interface: cpu/conv2d.h; when it is chosen:
// cpu/conv2d.cpp): for layers with few output channels and a stride of 1, such as LeNet's conv1
// (1 -> 6, 5x5, 32x32 -> 28x28), where any GEMM formulation is mostly data movement.
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
#include "cpu/isa.h"

namespace pyengine {
namespace cpu {
namespace conv2d {
namespace {

constexpr int kCo = 6;    // output channels per block
constexpr int kRows = 4;  // output rows per block

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

// R output rows from oh0, columns ow0 .. ow0 + V, channels [0, nco) of a block.
template <typename T, int R>
PE_INLINE void block(const T* planes, const Padded& pd, int64_t cin_g, int64_t kh, int64_t kw,
                     const T* wb, const T* b6, T* y, int64_t P, int64_t OW, int64_t nco,
                     int64_t oh0, int64_t ow0) {
  typedef T vec __attribute__((vector_size(64)));
  typedef T uvec __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  vec acc[R][kCo];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < kCo; ++c) acc[r][c] = vec{} + b6[c];
  const T* w = wb;
  for (int64_t ci = 0; ci < cin_g; ++ci) {
    const T* pc = planes + ci * pd.plane + oh0 * pd.wpp + ow0;
    for (int64_t ki = 0; ki < kh; ++ki) {
      const T* prow = pc + ki * pd.wpp;
      for (int64_t kj = 0; kj < kw; ++kj, w += kCo) {
        vec x[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) x[r] = *reinterpret_cast<const uvec*>(prow + r * pd.wpp + kj);
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
      *reinterpret_cast<uvec*>(y + c * P + (oh0 + r) * OW + ow0) = acc[r][c];
}

// Every output row and column of one image, group and block of channels.
template <typename T>
PE_INLINE void channels_impl(const Geometry& g, const T* planes, const T* wb, const T* b6, T* y,
                             int64_t nco) {
  constexpr int64_t V = 64 / sizeof(T);
  const Padded pd = make_padded(g);
  const int64_t OH = g.out_h, OW = g.out_w, P = g.out_pixels(), cin_g = g.in_channels_per_group();
  for (int64_t ow = 0; ow < OW; ow += V) {
    const int64_t ow0 = std::min(ow, OW - V);  // the last vector overlaps the one before
    int64_t oh0 = 0;
    for (; oh0 + kRows <= OH; oh0 += kRows)
      block<T, kRows>(planes, pd, cin_g, g.kernel_h, g.kernel_w, wb, b6, y, P, OW, nco, oh0, ow0);
    for (; oh0 < OH; ++oh0)
      block<T, 1>(planes, pd, cin_g, g.kernel_h, g.kernel_w, wb, b6, y, P, OW, nco, oh0, ow0);
  }
}

#define PE_DEFINE_DIRECT(T)                                                                    \
  PE_ISA_FUNCTION(Family::Conv2d, void, direct_channels,                                       \
                  (const Geometry& g, const T* planes, const T* wb, const T* b6, T* y,         \
                   int64_t nco),                                                               \
                  (g, planes, wb, b6, y, nco), channels_impl<T>)
PE_DEFINE_DIRECT(float)
PE_DEFINE_DIRECT(double)
#undef PE_DEFINE_DIRECT

}  // namespace

bool direct_fits(const Geometry& g) {
  // Rows of at least a vector of doubles (the overlapping last vector needs a whole one), a
  // filter small enough that its weights stay in L1, fewer channels than the implicit GEMM
  // wants. (Wider rows of floats than 16 are the common case: LeNet's 28.)
  return g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1 &&
         g.out_channels_per_group() < 16 && g.out_w >= 16 &&
         g.taps_per_group() * kCo <= 4096;
}

template <typename T>
void forward_direct(const Geometry& g, const T* x, const T* w, const T* bias, T* y) {
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
  const double work = double(g.out_channels) * K * P;
  at::parallel_for(0, g.batch * g.groups, grain_for(work), [&](int64_t t0, int64_t t1) {
    CachedBuffer<T> planes(static_cast<size_t>(cin_g * pd.plane));  // zero: the padding
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g.groups, grp = t % g.groups;
      const T* xg = x + n * g.in_image() + grp * cin_g * g.in_pixels();
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t ih = 0; ih < g.in_h; ++ih)
          std::memcpy(planes.data() + ci * pd.plane + (ih + g.padding_h) * pd.wpp + g.padding_w,
                      xg + ci * g.in_pixels() + ih * g.in_w, sizeof(T) * g.in_w);
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t co0 = blk * kCo, nco = std::min<int64_t>(kCo, cout_g - co0);
        direct_channels(g, planes.data(), wb.data() + (grp * blocks + blk) * K * kCo,
                        bb.data() + (grp * blocks + blk) * kCo,
                        y + n * g.out_image() + (grp * cout_g + co0) * P, nco);
      }
    }
  });
}

template void forward_direct<float>(const Geometry&, const float*, const float*, const float*,
                                    float*);
template void forward_direct<double>(const Geometry&, const double*, const double*,
                                     const double*, double*);

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
