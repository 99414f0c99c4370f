// The gradients of a convolution whose output went through relu and a max-pool
// (conv2d_relu_max_pool2d's backward), summed over the pool's windows instead of over the
// convolution's whole gradient image.
//
// Unpooling puts each window's gradient at the one output pixel its index names and zero at every
// other: at least three quarters of the gradient image a 2x2 pool leaves are zeros, more where
// relu's step zeroes a window. conv2d's backward is linear in that image, so it is a sum over
// windows: each window adds its gradient g times the input patch under its index's pixel to
// grad_weight (dW[co] += g X[patch]), times the weights to that patch of grad_input (dX[patch] +=
// g W[co]), and g to grad_bias. The windows relu or a zero gradient leave out are not in the list
// the sums walk.
//
// Layouts: "patch columns" (PatchColumns) copy each image so that a patch over all of a group's
// input channels is contiguous (each input kernel_w times: LeNet's conv2, 6 channels x 5 x 5 = 150
// taps, is 10 16-lane vectors, 160 lanes with its rows padded to whole vectors), built from a
// channels-last copy of the image, where each row of a patch is one run; grad_input scatters
// into the same layout and folds it back into a channels-last gradient (image_fold_columns),
// transposed to NCHW at the end. A first layer (one input
// channel a group, no grad_input: LeNet's conv1) reads its kernel rows from the image itself, one
// masked 8-lane vector each (row_sums), which costs fewer instructions than copying the columns.
//
// Exactness: the sums are those of the dense gradient image less terms that are exactly 0 * x
// (another order, so not bitwise the dense kernels'). A non-finite x (w), where 0 * inf = NaN
// reaches the dense grad_weight (grad_input), takes the dense kernels for it. Any pool geometry:
// overlapping windows add at a pixel as unpooling adds them. AVX-512 and float32 only (masked
// loads, compressed lists; bfloat16 on float32 copies); elsewhere the dense
// kernels. Images whose patch columns exceed 256 KB keep the dense kernels (not measured).
//
// Napkin math, LeNet at batch 64. conv1 block (1 -> 6, 28x28 outputs): dense grad_weight 7.5 M
// multiply-adds = 0.47 M 16-lane steps; here 64 x 6 x 196 = 75 K windows x 5 rows = 0.38 M 8-lane
// steps (half the lanes, a third fewer instructions, no copy). conv2 block (6 -> 16, 10x10):
// dense grad_weight and grad_input 2 x 15.4 M multiply-adds = 1.9 M steps; here 64 x 16 x 25 =
// 25.6 K windows x 10 vectors, twice (grad_weight; grad_input's read-modify-write) = 0.51 M.
// Measured (2 threads, medians of 200 calls, the blocks' backward before -> after): conv1
// without grad_input 179-190 -> 92-94 us; conv2 441 -> 226-232 us. One thread, conv2's
// grad_input alone (before the columns were line-aligned, which took it 169 -> 125 us on two
// threads): the scatter ~54% of its time, the fold ~20% (perf; since the channels-last rows,
// below, less); conv1: the row sums ~55%, the lists ~25%.
//
// Deterministic: the batch is split into at most 64 fixed blocks of images (not by thread
// count), each block's sums are added in block order; grad_input is per image.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <utility>
#include <vector>

#include "common/layout.h"
#include "common/low_precision.h"
#include "cpu/allocator.h"
#include "cpu/conv2d.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "cpu/transpose.h"

namespace pyengine {
namespace cpu {
namespace {

using at::Tensor;

template <typename T, int kBytes>
struct Bytes {  // a GCC vector of kBytes; unaligned, for loads and stores anywhere
  typedef T type __attribute__((vector_size(kBytes)));
  typedef T unaligned __attribute__((vector_size(kBytes), aligned(sizeof(T)), may_alias));
};

// sums[l] += sum over e < count of val[e] * cols[off[e] + l], l < NV * W (W = kBytes /
// sizeof(T) lanes a vector): a patch is NV vectors (lanes past its kernel_h * kernel_w elements
// unused). kSets accumulator sets, the entries dealt round-robin among them (a multiply-add's
// latency hidden behind the others'), added into sums at the end in a fixed order.
template <typename T, int kBytes, int kSets, int NV>
PE_INLINE void patch_sums_nv(const T* cols, const int32_t* off, const T* val, int64_t count,
                             T* sums) {
  constexpr int W = kBytes / static_cast<int>(sizeof(T));
  using V = typename Bytes<T, kBytes>::type;
  using U = typename Bytes<T, kBytes>::unaligned;
  V acc[kSets][NV];
  #pragma GCC unroll 8
  for (int s = 0; s < kSets; ++s)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[s][v] = V{};
  int64_t e = 0;
  for (; e + kSets <= count; e += kSets) {
    #pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) {
      const T* p = cols + off[e + s];
      const T g = val[e + s];
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[s][v] += g * *reinterpret_cast<const U*>(p + v * W);
    }
  }
  for (; e < count; ++e) {
    const T* p = cols + off[e];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[0][v] += val[e] * *reinterpret_cast<const U*>(p + v * W);
  }
  #pragma GCC unroll 8
  for (int s = 1; s < kSets; ++s)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[0][v] += acc[s][v];
  #pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(sums + v * W) += acc[0][v];
}

// One image's patch columns are kernel_w copies of it; kept to 256 KB (LeNet's blocks: 18 and
// 17 KB), well inside L2. Larger images keep the dense kernels (the sums over windows were not
// measured there).
constexpr int64_t kMostImageFloats = 65536;
constexpr int kPieceVectors = 12;  // a patch's vectors held in registers at once (LeNet's conv2: 10)

// sums[l] += sum over the list of val[e] * cols[off[e] + l], l < nv * 16: a patch's vectors in
// pieces of at most kPieceVectors (each piece walks the list once).
PE_TARGET_AVX512 void patch_sums(const float* cols, int64_t nv, const int32_t* off,
                                 const float* val, int64_t count, float* sums) {
  for (int64_t v0 = 0; v0 < nv; v0 += kPieceVectors) {
    const float* c = cols + v0 * 16;
    float* s = sums + v0 * 16;
    switch (std::min<int64_t>(kPieceVectors, nv - v0)) {
      case 1: patch_sums_nv<float, 64, 4, 1>(c, off, val, count, s); break;
      case 2: patch_sums_nv<float, 64, 4, 2>(c, off, val, count, s); break;
      case 3: patch_sums_nv<float, 64, 4, 3>(c, off, val, count, s); break;
      case 4: patch_sums_nv<float, 64, 4, 4>(c, off, val, count, s); break;
      case 5: patch_sums_nv<float, 64, 2, 5>(c, off, val, count, s); break;
      case 6: patch_sums_nv<float, 64, 2, 6>(c, off, val, count, s); break;
      case 7: patch_sums_nv<float, 64, 2, 7>(c, off, val, count, s); break;
      case 8: patch_sums_nv<float, 64, 2, 8>(c, off, val, count, s); break;
      case 9: patch_sums_nv<float, 64, 2, 9>(c, off, val, count, s); break;
      case 10: patch_sums_nv<float, 64, 2, 10>(c, off, val, count, s); break;
      case 11: patch_sums_nv<float, 64, 2, 11>(c, off, val, count, s); break;
      default: patch_sums_nv<float, 64, 2, 12>(c, off, val, count, s); break;
    }
  }
}

// cols[off[e] + l] += val[e] * w[l] for every listed window, l < taps (w: nv * 16, zero past
// taps; the last vector's store masked to taps, so that a non-finite gradient touches nothing
// past its patch). Windows one after another are in different patch columns (their output
// columns differ), so a store is not read back at once (partly overlapping reads would wait
// for it).
template <int NV>
PE_TARGET_AVX512 inline void patch_scatter_nv(float* cols, const int32_t* off, const float* val,
                                              int64_t count, const float* w, __mmask16 last) {
  __m512 wv[NV];
  for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(w + 16 * v);
  for (int64_t e = 0; e < count; ++e) {
    float* p = cols + off[e];
    const __m512 g = _mm512_set1_ps(val[e]);
    #pragma GCC unroll 16
    for (int v = 0; v < NV - 1; ++v)
      _mm512_storeu_ps(p + 16 * v, _mm512_fmadd_ps(g, wv[v], _mm512_loadu_ps(p + 16 * v)));
    float* q = p + 16 * (NV - 1);
    _mm512_mask_storeu_ps(q, last,
                          _mm512_fmadd_ps(g, wv[NV - 1], _mm512_maskz_loadu_ps(last, q)));
  }
}
PE_TARGET_AVX512 void patch_scatter(float* cols, int64_t nv, int64_t taps, const int32_t* off,
                                    const float* val, int64_t count, const float* w) {
  for (int64_t v0 = 0; v0 < nv; v0 += kPieceVectors) {
    const int64_t n = std::min<int64_t>(kPieceVectors, nv - v0);
    const int64_t tail = std::min<int64_t>(16, taps - (v0 + n - 1) * 16);
    const __mmask16 last = static_cast<__mmask16>(tail == 16 ? 0xffffu : (1u << tail) - 1u);
    float* c = cols + v0 * 16;
    const float* wp = w + v0 * 16;
    switch (n) {
      case 1: patch_scatter_nv<1>(c, off, val, count, wp, last); break;
      case 2: patch_scatter_nv<2>(c, off, val, count, wp, last); break;
      case 3: patch_scatter_nv<3>(c, off, val, count, wp, last); break;
      case 4: patch_scatter_nv<4>(c, off, val, count, wp, last); break;
      case 5: patch_scatter_nv<5>(c, off, val, count, wp, last); break;
      case 6: patch_scatter_nv<6>(c, off, val, count, wp, last); break;
      case 7: patch_scatter_nv<7>(c, off, val, count, wp, last); break;
      case 8: patch_scatter_nv<8>(c, off, val, count, wp, last); break;
      case 9: patch_scatter_nv<9>(c, off, val, count, wp, last); break;
      case 10: patch_scatter_nv<10>(c, off, val, count, wp, last); break;
      case 11: patch_scatter_nv<11>(c, off, val, count, wp, last); break;
      default: patch_scatter_nv<12>(c, off, val, count, wp, last); break;
    }
  }
}

// grad_weight where a group has one input channel (a network's first layer: LeNet's conv1), read
// straight from the padded image: sums[ki * 8 + l] += sum over the list of val[e] * xp[off[e] +
// ki * wp + l], l < kernel_w <= 8 (a masked 8-lane load per kernel row), KH <= 5 rows. Cheaper there
// than the patch columns, whose copies (kernel_w per input) the other channels would not share.
template <int KH, int kSets>
PE_TARGET_AVX512 inline void row_sums_kh(const float* xp, int64_t wp, __mmask8 lanes,
                                         const int32_t* off, const float* val, int64_t count,
                                         float* sums) {
  __m256 acc[kSets][KH];
  #pragma GCC unroll 8
  for (int s = 0; s < kSets; ++s)
    #pragma GCC unroll 8
    for (int r = 0; r < KH; ++r) acc[s][r] = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + kSets <= count; e += kSets) {
    #pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) {
      const float* p = xp + off[e + s];
      const __m256 g = _mm256_set1_ps(val[e + s]);
      #pragma GCC unroll 8
      for (int r = 0; r < KH; ++r)
        acc[s][r] = _mm256_fmadd_ps(g, _mm256_maskz_loadu_ps(lanes, p + r * wp), acc[s][r]);
    }
  }
  for (; e < count; ++e) {
    const float* p = xp + off[e];
    const __m256 g = _mm256_set1_ps(val[e]);
    #pragma GCC unroll 8
    for (int r = 0; r < KH; ++r)
      acc[0][r] = _mm256_fmadd_ps(g, _mm256_maskz_loadu_ps(lanes, p + r * wp), acc[0][r]);
  }
  #pragma GCC unroll 8
  for (int s = 1; s < kSets; ++s)
    #pragma GCC unroll 8
    for (int r = 0; r < KH; ++r) acc[0][r] = _mm256_add_ps(acc[0][r], acc[s][r]);
  #pragma GCC unroll 8
  for (int r = 0; r < KH; ++r)
    _mm256_storeu_ps(sums + r * 8, _mm256_add_ps(_mm256_loadu_ps(sums + r * 8), acc[0][r]));
}
constexpr int64_t kMostRowKernel = 8;  // kernel_w of row_sums (an 8-lane vector)
PE_TARGET_AVX512 void row_sums(const float* xp, int64_t wp, int64_t kh, int64_t kw,
                               const int32_t* off, const float* val, int64_t count, float* sums) {
  const __mmask8 lanes = static_cast<__mmask8>((1u << kw) - 1u);
  switch (kh) {  // (four accumulator sets: 20 registers at most)
    case 1: return row_sums_kh<1, 4>(xp, wp, lanes, off, val, count, sums);
    case 2: return row_sums_kh<2, 4>(xp, wp, lanes, off, val, count, sums);
    case 3: return row_sums_kh<3, 4>(xp, wp, lanes, off, val, count, sums);
    case 4: return row_sums_kh<4, 4>(xp, wp, lanes, off, val, count, sums);
    default: return row_sums_kh<5, 4>(xp, wp, lanes, off, val, count, sums);
  }
}

// The patch columns of an image, group by group: cols[((grp * out_w + ow) * hp + h) * R + kj *
// cin_g + ci] = xp[grp * cin_g + ci][h][ow * stride_w + kj], for output column ow and padded
// row h (xp: the image zero-padded, hp x wp planes), R >= cin_g * kernel_w. Output pixel (oh,
// ow)'s patch, every input channel of its group, is then kernel_h rows of R: contiguous, at
// ((grp * out_w + ow) * hp + oh * stride_h) * R, its taps in the order (ki, kj, ci) (dilation
// 1): a row of it is kernel_w * cin_g consecutive elements of the padded channels-last image.
// (In the order (ki, ci, kj), each row took a masked load per (channel, row) run of kernel_w
// elements, and the fold an expanding load per column: 33% of LeNet conv2's block backward at
// batch 256 on a Zen 5, 19% after this change, transposes included; the block's backward on two
// threads 585-592 -> 493-502 us at batch 256, 154-165 -> 131-137 at 64, builds alternating.)
// R is rounded up to whole vectors where the patch needs no more vectors for it (LeNet's
// conv2: 30 -> 32, 10 vectors either way): every patch then starts on a cache line, so no
// vector straddles two, and grad_input's stores are read back whole (a partly overlapping read
// waits for the store). kernel_w copies of each input, one image at a time.
struct PatchColumns {
  int64_t hp, wp, taps_row, row, block, image;  // padded rows, columns; cin_g * kw; R; a column;
                                                // all of an image's
  explicit PatchColumns(const Conv2dGeometry<int64_t>& g)
      : hp(g.in_h + 2 * g.padding_h),
        wp(g.in_w + 2 * g.padding_w),
        taps_row(g.in_channels_per_group() * g.kernel_w),
        row(aligned_row(taps_row, g.kernel_h)),
        block(hp * row),
        image(g.groups * g.out_w * block) {}
  static int64_t aligned_row(int64_t r, int64_t kh) {
    const int64_t whole = (r + 15) / 16 * 16;
    return (kh * whole + 15) / 16 == (kh * r + 15) / 16 ? whole : r;
  }
  int64_t patch_at(const Conv2dGeometry<int64_t>& g, int64_t grp, int64_t oh, int64_t ow) const {
    return ((grp * g.out_w + ow) * hp + oh * g.stride_h) * row;
  }
};

// Images per task: a fixed split of the batch (at most 64 blocks, 8+ images each), whose
// partial sums are added in block order: the same bits at any thread count.
int64_t images_per_block(int64_t batch) { return std::max<int64_t>(8, (batch + 63) / 64); }

// An image's padded channels-last copy, group by group: xh[((grp * hp + h) * wp + c) * cin_g +
// ci] = x[grp * cin_g + ci][h - padding_h][c - padding_w] (x: in_channels x in_h x in_w), its
// padding left as it is (the caller's zeros): register transposes of 16 channels x 16 columns,
// inlined here (conv2d::transpose, a call per block, took the conv2 block's backward 3.5-5%
// longer on one thread at batch 256).
PE_TARGET_AVX512 void image_to_channels_last(const Conv2dGeometry<int64_t>& g,
                                             const PatchColumns& pc, const float* x, float* xh) {
  const int64_t cin_g = g.in_channels_per_group(), hw = g.in_h * g.in_w;
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t h = 0; h < g.in_h; ++h)
      for (int64_t c0 = 0; c0 < cin_g; c0 += 16)
        for (int64_t w0 = 0; w0 < g.in_w; w0 += 16)
          conv2d::transpose16(
              x + (grp * cin_g + c0) * hw + h * g.in_w + w0, hw,
              std::min<int64_t>(16, cin_g - c0), std::min<int64_t>(16, g.in_w - w0),
              xh + ((grp * pc.hp + h + g.padding_h) * pc.wp + w0 + g.padding_w) * cin_g + c0,
              cin_g, nullptr);
}

// The reverse, the interior only: dx[grp * cin_g + ci][h][c] = dxh's element (grp, h +
// padding_h, c + padding_w, ci).
PE_TARGET_AVX512 void channels_last_to_image(const Conv2dGeometry<int64_t>& g,
                                             const PatchColumns& pc, const float* dxh,
                                             float* dx) {
  const int64_t cin_g = g.in_channels_per_group(), hw = g.in_h * g.in_w;
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t h = 0; h < g.in_h; ++h)
      for (int64_t w0 = 0; w0 < g.in_w; w0 += 16)
        for (int64_t c0 = 0; c0 < cin_g; c0 += 16)
          conv2d::transpose16(
              dxh + ((grp * pc.hp + h + g.padding_h) * pc.wp + w0 + g.padding_w) * cin_g + c0,
              cin_g, std::min<int64_t>(16, g.in_w - w0), std::min<int64_t>(16, cin_g - c0),
              dx + (grp * cin_g + c0) * hw + h * g.in_w + w0, hw, nullptr);
}

PE_TARGET_AVX512 inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xffffu : n <= 0 ? 0u : (1u << n) - 1u);
}

// One image's patch columns from its padded channels-last copy: each column row is the
// kernel_w * cin_g elements that start at (h, ow * stride_w) in xh, one run, then zeros up to R.
PE_TARGET_AVX512 void image_patch_columns(const Conv2dGeometry<int64_t>& g,
                                          const PatchColumns& pc, const float* xh, float* cols) {
  const int64_t cin_g = g.in_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const float* from = xh + (grp * pc.hp * pc.wp + ow * g.stride_w) * cin_g;
      float* out = cols + (grp * g.out_w + ow) * pc.block;
      for (int64_t h = 0; h < pc.hp; ++h, from += pc.wp * cin_g, out += pc.row)
        for (int64_t j = 0; j < pc.row; j += 16)
          _mm512_mask_storeu_ps(out + j, first_lanes(pc.row - j),
                                _mm512_maskz_loadu_ps(first_lanes(pc.taps_row - j), from + j));
    }
}

// The reverse: each column row's kernel_w * cin_g elements added into dxh where they were
// copied from (dxh zeroed by the caller). Output column by output column, so that the rows one
// after another do not overlap (a column's neighbour shares kernel_w - stride_w of its
// positions, and a load that overlaps a store just made waits for it).
PE_TARGET_AVX512 void image_fold_columns(const Conv2dGeometry<int64_t>& g, const PatchColumns& pc,
                                         const float* cols, float* dxh) {
  const int64_t cin_g = g.in_channels_per_group();
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      float* to = dxh + (grp * pc.hp * pc.wp + ow * g.stride_w) * cin_g;
      const float* in = cols + (grp * g.out_w + ow) * pc.block;
      for (int64_t h = 0; h < pc.hp; ++h, to += pc.wp * cin_g, in += pc.row)
        for (int64_t j = 0; j < pc.taps_row; j += 16) {
          const __mmask16 m = first_lanes(pc.taps_row - j);
          _mm512_mask_storeu_ps(to + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, to + j),
                                                         _mm512_maskz_loadu_ps(m, in + j)));
        }
    }
}

// Window list of one (image, output channel) plane of `windows` pooled gradients: the windows
// relu's step keeps whose gradient is not 0, in order, as the offset of their patch (base +
// patch_at[p] for the output pixel p their index names) and their gradient (off and val have
// room for windows + 15: whole vectors are stored); adds the kept gradients to bias's lanes.
// Returns their count, or -1 at an index outside its plane. (The offsets by a gather from the
// table: computing divmod(p, out_w) in vectors was a chain of ~45 cycles' latency a step.)
// (GCC 12 flags its own _mm256_undefined_si256 inside _mm512_cvtepi64_epi32 as uninitialized, as
// in cpu/transpose.h.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
PE_TARGET_AVX512 int64_t window_list(const Conv2dGeometry<int64_t>& g, const int32_t* patch_at,
                                     const float* grad, const float* result,
                                     const int64_t* indices, int64_t windows, int32_t base,
                                     int32_t* off, float* val, float* bias) {
  __m512 bias_sum = _mm512_loadu_ps(bias);
  const __m512i base_v = _mm512_set1_epi32(base);
  const __m512i plane_v = _mm512_set1_epi64(g.out_pixels());
  int64_t count = 0;
  for (int64_t q = 0; q < windows; q += 16) {
    const __mmask16 m = static_cast<__mmask16>(
        windows - q >= 16 ? 0xffffu : (1u << (windows - q)) - 1u);
    const __m512 gv = _mm512_maskz_loadu_ps(m, grad + q);
    const __m512 yv = _mm512_maskz_loadu_ps(m, result + q);
    // relu_bwd: kept unless result <= 0; listed unless the gradient is 0
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, yv, _mm512_setzero_ps(), _CMP_NLE_UQ) &
                           _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    const __m512i lo = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), indices + q);
    const __m512i hi = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m >> 8), indices + q + 8);
    const __mmask16 inside = static_cast<__mmask16>(
        _mm512_cmplt_epu64_mask(lo, plane_v) | (_mm512_cmplt_epu64_mask(hi, plane_v) << 8));
    if ((inside & m) != m) return -1;
    const __m512i p = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
                                         _mm512_cvtepi64_epi32(hi), 1);
    const __m512i at = _mm512_add_epi32(
        base_v, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), keep, p, patch_at, 4));
    _mm512_storeu_si512(off + count, _mm512_maskz_compress_epi32(keep, at));
    _mm512_storeu_ps(val + count, _mm512_maskz_compress_ps(keep, gv));
    bias_sum = _mm512_add_ps(bias_sum, _mm512_maskz_mov_ps(keep, gv));
    count += __builtin_popcount(keep);
  }
  _mm512_storeu_ps(bias, bias_sum);
  return count;
}
#pragma GCC diagnostic pop

// The gradients: dx (if not null: w finite, checked by the caller), dw, db (each may be null).
bool pooled_grads(const Conv2dGeometry<int64_t>& g, const Pool2dGeometry<int64_t>& pool,
                  const float* grad_output, const float* result, const int64_t* indices,
                  const float* x, const float* w, float* dx, float* dw, float* db) {
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t kh = g.kernel_h, kw = g.kernel_w;
  const PatchColumns pc(g);
  // grad_weight from kernel rows of the padded image where a group has one input channel and no
  // grad_input wants the columns (a first layer), else from the patch columns. Up to 5 rows the
  // rows' sums take the 4 accumulator sets the columns' take (a patch of at most 4 vectors):
  // the same bits, with grad_input asked or not.
  const bool by_rows = !dx && cin_g == 1 && kw <= kMostRowKernel && kh <= 5;
  const int64_t taps = kh * pc.row, nv = (taps + 15) / 16;  // (R's padding too)
  const int64_t width = by_rows ? kh * 8 : nv * 16;  // a patch's sums
  const int64_t windows = pool.out_pixels(), in_image = g.in_channels * g.in_h * g.in_w;
  const int64_t padded_image = g.in_channels * pc.hp * pc.wp;
  const bool pads = g.padding_h > 0 || g.padding_w > 0;
  const int64_t per_block = images_per_block(g.batch);
  const int64_t blocks = (g.batch + per_block - 1) / per_block;
  // Each block's sums, a patch's vectors per output channel, taps in the columns' (ki, ci, kj)
  // order; the bias's after them, a vector of lanes per co (added up at the end).
  const int64_t sums_size = g.out_channels * width, block_size = sums_size + g.out_channels * 16;
  // (Zeroed by each block's task: a serial fill of all blocks' sums showed in perf.)
  CachedBuffer<float> sums(static_cast<size_t>(blocks * block_size), /*zero=*/false);
  // (These setup loops and the final one run serially on every call; written with a division
  // per element, they were 5% of the calling thread's samples in LeNet's step at batch 1.)
  // Each output pixel's patch, from its group's first: in the padded image (by_rows), in the
  // patch columns (else).
  std::vector<int32_t> patch_at(static_cast<size_t>(g.out_pixels()));
  for (int64_t oh = 0, p = 0; oh < g.out_h; ++oh)
    for (int64_t ow = 0; ow < g.out_w; ++ow, ++p)
      patch_at[p] = static_cast<int32_t>(by_rows ? oh * g.stride_h * pc.wp + ow * g.stride_w
                                                 : pc.patch_at(g, 0, oh, ow));
  // w in the same (ki, kj, ci) order, zero past the patch, for grad_input's scatter.
  std::vector<float> wk(dx ? static_cast<size_t>(g.out_channels * width) : 0, 0.f);
  if (dx)
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t ki = 0; ki < kh; ++ki)
          for (int64_t kj = 0; kj < kw; ++kj)
            wk[co * width + ki * pc.row + kj * cin_g + ci] =
                w[((co * cin_g + ci) * kh + ki) * kw + kj];
  std::atomic<bool> ok{true};
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // One image's patch columns and their gradient (+ the slack a last patch's vectors read
    // past), one window list, the padded image (NCHW for by_rows, else channels-last: xh) and
    // its gradient (channels-last).
    thread_local LineVector<float> cols, dcols;  // (patches on cache lines: see PatchColumns)
    thread_local std::vector<float> val, xpad, xh, dxh;
    thread_local std::vector<int32_t> off;
    if (!by_rows) {
      cols.resize(static_cast<size_t>(pc.image + width));
      std::fill(cols.begin() + pc.image, cols.end(), 0.f);
    }
    val.resize(static_cast<size_t>(windows + 15));
    off.resize(static_cast<size_t>(windows + 15));
    if (dw && by_rows && pads) xpad.assign(static_cast<size_t>(padded_image), 0.f);
    if (dw && !by_rows) xh.assign(static_cast<size_t>(padded_image), 0.f);
    if (dx) {
      dcols.resize(static_cast<size_t>(pc.image + width));
      dxh.resize(static_cast<size_t>(padded_image));
    }
    for (int64_t blk = b0; blk < b1 && ok; ++blk) {
      float* part = sums.data() + blk * block_size;
      std::fill(part, part + block_size, 0.f);
      for (int64_t n = blk * per_block; n < std::min(g.batch, (blk + 1) * per_block); ++n) {
        if (dw) {
          const float* xn = x + n * in_image;
          if (!conv2d::all_finite(xn, in_image)) {
            ok = false;  // 0 * inf in the dense sums: the dense kernels
            return;
          }
          if (by_rows && pads)  // the interior; the borders stay 0
            for (int64_t c = 0; c < g.in_channels; ++c)
              for (int64_t h = 0; h < g.in_h; ++h)
                std::copy(xn + (c * g.in_h + h) * g.in_w, xn + (c * g.in_h + h + 1) * g.in_w,
                          xpad.data() + (c * pc.hp + g.padding_h + h) * pc.wp + g.padding_w);
          if (!by_rows) {
            image_to_channels_last(g, pc, xn, xh.data());  // (its borders stay 0)
            image_patch_columns(g, pc, xh.data(), cols.data());
          }
        }
        const float* image = pads ? xpad.data() : x + n * in_image;  // (by_rows)
        if (dx) std::fill(dcols.begin(), dcols.begin() + pc.image, 0.f);
        for (int64_t co = 0; co < g.out_channels; ++co) {
          const int64_t at = (n * g.out_channels + co) * windows;
          const int64_t grp = co / cout_g;
          const int64_t count = window_list(
              g, patch_at.data(), grad_output + at, result + at, indices + at, windows,
              static_cast<int32_t>(by_rows ? grp * pc.hp * pc.wp : pc.patch_at(g, grp, 0, 0)),
              off.data(), val.data(), part + sums_size + co * 16);
          if (count < 0) {  // the general unpooling names the index
            ok = false;
            return;
          }
          if (dw && by_rows)
            row_sums(image, pc.wp, kh, kw, off.data(), val.data(), count, part + co * width);
          else if (dw)
            patch_sums(cols.data(), nv, off.data(), val.data(), count, part + co * width);
          if (dx)
            patch_scatter(dcols.data(), nv, taps, off.data(), val.data(), count,
                          wk.data() + co * width);
        }
        if (dx) {
          std::fill(dxh.begin(), dxh.end(), 0.f);
          image_fold_columns(g, pc, dcols.data(), dxh.data());
          channels_last_to_image(g, pc, dxh.data(), dx + n * in_image);
        }
      }
    }
  });
  if (!ok) return false;
  // The blocks' sums added in block order, element by element: split over the elements, the
  // same bits whatever the threads. (Serial, this was 5% of LeNet conv2's backward at batch 64,
  // 8 blocks of 2816 sums, with the other thread waiting; 64 blocks at batch 1024.)
  at::parallel_for(0, block_size, 2048, [&](int64_t i0, int64_t i1) {
    for (int64_t blk = 1; blk < blocks; ++blk) {
      const float* from = sums.data() + blk * block_size;
      for (int64_t i = i0; i < i1; ++i) sums[i] += from[i];
    }
  });
  if (dw) {
    const int64_t row = by_rows ? 8 : pc.row;
    for (int64_t co = 0; co < g.out_channels; ++co)
      for (int64_t ci = 0; ci < cin_g; ++ci)
        for (int64_t ki = 0; ki < kh; ++ki)
          for (int64_t kj = 0; kj < kw; ++kj)
            dw[((co * cin_g + ci) * kh + ki) * kw + kj] =
                sums[co * width + ki * row + kj * cin_g + ci];
  }
  if (db)
    for (int64_t co = 0; co < g.out_channels; ++co) {
      const float* lanes = sums.data() + sums_size + co * 16;
      float total = 0.f;
      for (int l = 0; l < 16; ++l) total += lanes[l];
      db[co] = total;
    }
  return true;
}

}  // namespace

bool conv2d_grads_pooled(const Conv2dGeometry<int64_t>& conv, const Pool2dGeometry<int64_t>& pool,
                         const Tensor& grad_output, const Tensor& result, const Tensor& indices,
                         const Tensor& x, const Tensor& w, std::array<bool, 3> mask,
                         std::tuple<Tensor, Tensor, Tensor>& grads) {
  // AVX-512 and float32 only (masked loads, compress stores): bfloat16 on float32 copies (the
  // float32 kernel's results, rounded once by the caller); other levels and float64 keep the
  // dense kernels.
  auto f32 = [](const Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  if (cpu::isa_for(Family::Conv2d) != cpu::Isa::Avx512 || !f32(x) || !f32(grad_output) ||
      !f32(result) || w.scalar_type() != at::kFloat)
    return false;
  const PatchColumns pc(conv);
  if (conv.batch == 0 || conv.dilation_h != 1 || conv.dilation_w != 1 ||
      pc.image > kMostImageFloats || pool.in_h != conv.out_h || pool.in_w != conv.out_w)
    return false;  // (small images: every offset and pixel index fits int32)
  // grad_input here only where w is finite (a 0 gradient times an inf weight is NaN in the
  // dense sums); else the caller's dense kernels.
  const Tensor wc = w.contiguous();
  const bool input = mask[0] && conv2d::all_finite(wc.const_data_ptr<float>(), wc.numel());
  if (!input && !mask[1] && !mask[2]) return false;
  Tensor grad_input, grad_weight, grad_bias;
  if (input) grad_input = empty_of(x.sizes(), w.options());
  if (mask[1]) grad_weight = empty_of(w.sizes(), w.options());
  if (mask[2]) grad_bias = empty_of(at::IntArrayRef{conv.out_channels}, w.options());
  const Tensor go = low_precision::widen(grad_output).contiguous();
  const Tensor r = low_precision::widen(result).contiguous(), ix = indices.contiguous();
  const Tensor xc = low_precision::widen(x).contiguous();
  const bool ok = pooled_grads(
      conv, pool, go.const_data_ptr<float>(), r.const_data_ptr<float>(),
      ix.const_data_ptr<int64_t>(), xc.const_data_ptr<float>(), wc.const_data_ptr<float>(),
      input ? grad_input.mutable_data_ptr<float>() : nullptr,
      mask[1] ? grad_weight.mutable_data_ptr<float>() : nullptr,
      mask[2] ? grad_bias.mutable_data_ptr<float>() : nullptr);
  if (ok) grads = {grad_input, grad_weight, grad_bias};
  return ok;
}

}  // namespace cpu
}  // namespace pyengine
