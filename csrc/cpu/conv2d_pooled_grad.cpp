// grad_weight and grad_bias of a convolution whose output went through relu and a max-pool
// (conv2d_relu_max_pool2d's backward), summed over the pool's windows instead of over the
// convolution's whole gradient image.
//
// Unpooling puts each window's gradient at the one output pixel its index names and zero at every
// other: at least three quarters of the gradient image a 2x2 pool leaves are zeros, more where
// relu's step zeroes a window. conv2d's grad_weight, dW[co, ci, ki, kj] = sum over images and
// pixels of dY[co, p] X[ci, tap (ki, kj) of p], is then a sum over windows: each window adds its
// gradient times the input patch under its index's pixel. The patch is made contiguous by a copy
// of the image as "patch columns" (each input kernel_w times, below), so a 5x5 patch is two
// 16-lane vectors (25 of 32 lanes used) and a window costs two multiply-adds per input channel.
// The windows relu or a zero gradient leave out are not in the list the sums walk. The sums are
// those of the dense gradient image less terms that are exactly 0 * x: equal where x is finite
// (up to rounding: another order); a non-finite input, where 0 * inf = NaN reaches the dense
// sums, takes the dense kernels. Any pool geometry: overlapping windows add at a pixel as
// unpooling adds them. AVX-512 and float32 only (masked loads, compressed lists); elsewhere the
// dense kernels.
//
// Napkin math, LeNet's conv1 block at batch 64 (1 -> 6, 28x28 outputs, 2x2 pool): dense
// grad_weight 7.5 M multiply-adds = 0.47 M 16-lane vector steps; here 64 x 6 x 196 = 75 K windows
// x 2 vectors = 0.15 M, plus the patch columns (64 x 28 columns x 10 vectors, each 4 masked
// loads) and the window lists (75 K windows, 16 a step). Measured (2 threads, this block's
// backward without grad_input, medians of 200 calls): 179-190 -> 108 us; conv2's block (6 -> 16)
// grad_weight + grad_bias 263 -> 165 us. Where the time goes, one thread, conv1: the patch
// columns ~29%, the sums ~25%, the lists ~18% (perf).
//
// Deterministic: the batch is split into at most 64 fixed blocks of images (not by thread
// count), each block's sums are added in block order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <utility>
#include <vector>

#include "common/layout.h"
#include "cpu/allocator.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

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
  for (int s = 0; s < kSets; ++s)
    for (int v = 0; v < NV; ++v) acc[s][v] = V{};
  int64_t e = 0;
  for (; e + kSets <= count; e += kSets) {
    #pragma GCC unroll 8
    for (int s = 0; s < kSets; ++s) {
      const T* p = cols + off[e + s];
      const T g = val[e + s];
      #pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[s][v] += g * *reinterpret_cast<const U*>(p + v * W);
    }
  }
  for (; e < count; ++e) {
    const T* p = cols + off[e];
    #pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] += val[e] * *reinterpret_cast<const U*>(p + v * W);
  }
  for (int s = 1; s < kSets; ++s)
    for (int v = 0; v < NV; ++v) acc[0][v] += acc[s][v];
  for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(sums + v * W) += acc[0][v];
}

constexpr int64_t kMostPatchFloats = 64;  // patch_sums's 4 vectors
// One image's patch columns are kernel_w copies of it; kept to 256 KB (LeNet's blocks: 18 and
// 17 KB), well inside L2. Larger images keep the dense kernels (the sums over windows were not
// measured there).
constexpr int64_t kMostImageFloats = 65536;

// sums[l] += sum over the list of val[e] * cols[off[e] + l], l < nv * 16 (nv <= 4).
PE_TARGET_AVX512 void patch_sums(const float* cols, int64_t nv, const int32_t* off,
                                 const float* val, int64_t count, float* sums) {
  switch (nv) {
    case 1: return patch_sums_nv<float, 64, 4, 1>(cols, off, val, count, sums);
    case 2: return patch_sums_nv<float, 64, 4, 2>(cols, off, val, count, sums);
    case 3: return patch_sums_nv<float, 64, 4, 3>(cols, off, val, count, sums);
    default: return patch_sums_nv<float, 64, 4, 4>(cols, off, val, count, sums);
  }
}

// The patch columns of a channel plane: cols[(ow * hp + h) * kernel_w + kj] = xp[h][ow * stride_w
// + kj] for output column ow and padded row h (xp: the plane zero-padded, hp rows), so output
// pixel (oh, ow)'s kernel_h x kernel_w patch is contiguous at (ow * hp + oh * stride_h) *
// kernel_w (dilation 1). kernel_w copies of each input: one image's at a time, in L1.
struct PatchColumns {
  int64_t hp, wp, plane;  // padded rows and columns; cols per channel plane
  explicit PatchColumns(const Conv2dGeometry<int64_t>& g)
      : hp(g.in_h + 2 * g.padding_h),
        wp(g.in_w + 2 * g.padding_w),
        plane(g.out_w * hp * g.kernel_w) {}
};

// Images per task: a fixed split of the batch (at most 64 blocks, 8+ images each), whose
// partial sums are added in block order: the same bits at any thread count.
int64_t images_per_block(int64_t batch) { return std::max<int64_t>(8, (batch + 63) / 64); }

// Where each 16-lane vector of a patch column's hp x kernel_w block reads its source plane (hp x
// wp, the column's top-left at 0): runs of up to kernel_w lanes from consecutive rows, each a
// masked load of the plane at `at` (lane l reads at + l). Every vector has `most` runs (the
// shorter padded with empty masks: a fixed trip count, no mispredicted loop exits), run r of
// vector j at [j * most + r].
struct ColumnRuns {
  int64_t most = 0;
  std::vector<int64_t> at;
  std::vector<uint16_t> lanes;
  ColumnRuns(int64_t hp, int64_t wp, int64_t kw) {
    const int64_t block = hp * kw;
    std::vector<std::vector<std::pair<int64_t, uint16_t>>> vectors;
    for (int64_t t0 = 0; t0 < block; t0 += 16) {
      auto& runs = vectors.emplace_back();
      const int64_t t1 = std::min(block, t0 + 16);
      for (int64_t t = t0; t < t1;) {
        const int64_t h = t / kw, kj = t % kw, run = std::min(kw - kj, t1 - t);
        runs.emplace_back(h * wp + kj - (t - t0),
                          static_cast<uint16_t>(((1u << run) - 1u) << (t - t0)));
        t += run;
      }
      most = std::max<int64_t>(most, static_cast<int64_t>(runs.size()));
    }
    for (const auto& runs : vectors)
      for (int64_t r = 0; r < most; ++r) {
        const bool real = r < static_cast<int64_t>(runs.size());
        at.push_back(real ? runs[r].first : 0);
        lanes.push_back(real ? runs[r].second : 0);
      }
  }
};

// False where an element of x[0, n) is not finite (its exponent all ones: inf or NaN).
PE_TARGET_AVX512 bool all_finite(const float* x, int64_t n) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m =
        static_cast<__mmask16>(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1u);
    const __m512i e = _mm512_and_si512(_mm512_maskz_loadu_epi32(m, x + i), exponent);
    bad |= _mm512_mask_cmpeq_epi32_mask(m, e, exponent);
  }
  return bad == 0;
}

// One image's patch columns, every channel (padded: an hp x wp scratch where x has padding).
PE_TARGET_AVX512 void image_patch_columns(const Conv2dGeometry<int64_t>& g,
                                          const PatchColumns& pc, const ColumnRuns& runs,
                                          const float* x, float* padded, float* cols) {
  const int64_t block = pc.hp * g.kernel_w, nvec = (block + 15) / 16;
  const bool pads = g.padding_h > 0 || g.padding_w > 0;
  for (int64_t c = 0; c < g.in_channels; ++c) {
    const float* plane = x + c * g.in_h * g.in_w;
    if (pads) {
      std::fill(padded, padded + pc.hp * pc.wp, 0.f);
      for (int64_t h = 0; h < g.in_h; ++h)
        std::copy(plane + h * g.in_w, plane + (h + 1) * g.in_w,
                  padded + (g.padding_h + h) * pc.wp + g.padding_w);
      plane = padded;
    }
    float* col = cols + c * pc.plane;
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const float* top = plane + ow * g.stride_w;
      float* out = col + ow * block;
      const int64_t* at = runs.at.data();
      const uint16_t* lanes = runs.lanes.data();
      for (int64_t j = 0; j < nvec; ++j, at += runs.most, lanes += runs.most) {
        __m512 v = _mm512_setzero_ps();
        for (int64_t r = 0; r < runs.most; ++r)
          v = _mm512_or_ps(v, _mm512_maskz_loadu_ps(lanes[r], top + at[r]));
        _mm512_storeu_ps(out + 16 * j, v);
      }
    }
  }
}

// Window list of one (image, output channel) plane of `windows` pooled gradients: the windows
// relu's step keeps whose gradient is not 0, in order, as the offset of their patch in cols
// (from `base`) and their gradient (off and val have room for windows + 15: whole vectors are
// stored); adds the kept gradients to bias's lanes. Returns their count, or -1 at an index
// outside its plane.
PE_TARGET_AVX512 int64_t window_list(const Conv2dGeometry<int64_t>& g, const PatchColumns& pc,
                                     const float* grad, const float* result,
                                     const int64_t* indices, int64_t windows, int32_t base,
                                     int32_t* off, float* val, float* bias) {
  __m512 bias_sum = _mm512_loadu_ps(bias);
  const int64_t out_plane = g.out_pixels();
  const __m512 inv_w = _mm512_set1_ps(1.f / static_cast<float>(g.out_w));
  const __m512i ow_n = _mm512_set1_epi32(static_cast<int>(g.out_w));
  const __m512i col_step = _mm512_set1_epi32(static_cast<int>(pc.hp * g.kernel_w));
  const __m512i row_step = _mm512_set1_epi32(static_cast<int>(g.stride_h * g.kernel_w));
  const __m512i base_v = _mm512_set1_epi32(base);
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
    const __m512i plane_v = _mm512_set1_epi64(out_plane);
    const __mmask16 inside = static_cast<__mmask16>(
        _mm512_cmplt_epu64_mask(lo, plane_v) | (_mm512_cmplt_epu64_mask(hi, plane_v) << 8));
    if ((inside & m) != m) return -1;
    const __m512i p = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)),
                                         _mm512_cvtepi64_epi32(hi), 1);
    // (oh, ow) = divmod(p, out_w): the float quotient (p < 2^24), corrected by one either way
    __m512i oh = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_cvtepi32_ps(p), inv_w));
    __m512i ow = _mm512_sub_epi32(p, _mm512_mullo_epi32(oh, ow_n));
    const __mmask16 under = _mm512_cmplt_epi32_mask(ow, _mm512_setzero_si512());
    oh = _mm512_mask_sub_epi32(oh, under, oh, _mm512_set1_epi32(1));
    ow = _mm512_mask_add_epi32(ow, under, ow, ow_n);
    const __mmask16 over = _mm512_cmpge_epi32_mask(ow, ow_n);
    oh = _mm512_mask_add_epi32(oh, over, oh, _mm512_set1_epi32(1));
    ow = _mm512_mask_sub_epi32(ow, over, ow, ow_n);
    const __m512i at = _mm512_add_epi32(
        base_v, _mm512_add_epi32(_mm512_mullo_epi32(ow, col_step),
                                 _mm512_mullo_epi32(oh, row_step)));
    _mm512_storeu_si512(off + count, _mm512_maskz_compress_epi32(keep, at));
    _mm512_storeu_ps(val + count, _mm512_maskz_compress_ps(keep, gv));
    bias_sum = _mm512_add_ps(bias_sum, _mm512_maskz_mov_ps(keep, gv));
    count += __builtin_popcount(keep);
  }
  _mm512_storeu_ps(bias, bias_sum);
  return count;
}

bool weight_grads(const Conv2dGeometry<int64_t>& g, const Pool2dGeometry<int64_t>& pool,
                  const float* grad_output, const float* result, const int64_t* indices,
                  const float* x, float* dw, float* db) {
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t taps = g.kernel_h * g.kernel_w, nv = (taps + 15) / 16, width = nv * 16;
  const PatchColumns pc(g);
  const int64_t image = g.in_channels * pc.plane, windows = pool.out_pixels();
  const int64_t per_block = images_per_block(g.batch);
  const int64_t blocks = (g.batch + per_block - 1) / per_block;
  const int64_t sums_size = g.out_channels * cin_g * width;
  // Each block's sums, a patch's vectors per (co, ci): [(co * cin_g + ci) * width + ki * kw + kj];
  // the bias's after them, a vector of lanes per co (added up at the end).
  const int64_t block_size = sums_size + g.out_channels * 16;
  CachedBuffer<float> sums(static_cast<size_t>(blocks * block_size), /*zero=*/true);
  const ColumnRuns runs(pc.hp, pc.wp, g.kernel_w);
  std::atomic<bool> ok{true};
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // One image's patch columns (+ the slack its last patch's vectors read past), one window
    // list, the padded plane.
    thread_local std::vector<float> cols, val, padded;
    thread_local std::vector<int32_t> off;
    cols.resize(static_cast<size_t>(image + width));
    std::fill(cols.begin() + image, cols.end(), 0.f);
    val.resize(static_cast<size_t>(windows + 15));
    off.resize(static_cast<size_t>(windows + 15));
    padded.resize(static_cast<size_t>(pc.hp * pc.wp));
    float* c = cols.data();
    for (int64_t blk = b0; blk < b1 && ok; ++blk) {
      float* part = sums.data() + blk * block_size;
      for (int64_t n = blk * per_block; n < std::min(g.batch, (blk + 1) * per_block); ++n) {
        if (dw) {
          const float* xn = x + n * g.in_channels * g.in_h * g.in_w;
          if (!all_finite(xn, g.in_channels * g.in_h * g.in_w)) {
            ok = false;  // 0 * inf in the dense sums: the dense kernels
            return;
          }
          image_patch_columns(g, pc, runs, xn, padded.data(), c);
        }
        for (int64_t co = 0; co < g.out_channels; ++co) {
          const int64_t at = (n * g.out_channels + co) * windows;
          const int64_t grp = co / cout_g;
          const int64_t count = window_list(
              g, pc, grad_output + at, result + at, indices + at, windows,
              static_cast<int32_t>(grp * cin_g * pc.plane), off.data(), val.data(),
              part + sums_size + co * 16);
          if (count < 0) {  // the general unpooling names the index
            ok = false;
            return;
          }
          if (dw)
            for (int64_t ci = 0; ci < cin_g; ++ci)
              patch_sums(c + ci * pc.plane, nv, off.data(), val.data(), count,
                         part + (co * cin_g + ci) * width);
        }
      }
    }
  });
  if (!ok) return false;
  for (int64_t blk = 1; blk < blocks; ++blk)
    for (int64_t i = 0; i < block_size; ++i) sums[i] += sums[blk * block_size + i];
  if (dw)
    for (int64_t r = 0; r < g.out_channels * cin_g; ++r)
      std::copy(sums.data() + r * width, sums.data() + r * width + taps, dw + r * taps);
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

bool conv2d_weight_grads_pooled(const Conv2dGeometry<int64_t>& conv,
                                const Pool2dGeometry<int64_t>& pool, const Tensor& grad_output,
                                const Tensor& result, const Tensor& indices, const Tensor& x,
                                const Tensor& w, bool weight, bool bias,
                                std::tuple<Tensor, Tensor>& grads) {
  // AVX-512 float32 only (masked loads, compress stores); other levels and dtypes keep the
  // dense kernels.
  if (cpu::isa_for(Family::Conv2d) != cpu::Isa::Avx512 || x.scalar_type() != at::kFloat ||
      w.scalar_type() != at::kFloat || grad_output.scalar_type() != at::kFloat ||
      result.scalar_type() != at::kFloat)
    return false;
  const PatchColumns pc(conv);
  if (conv.batch == 0 || conv.dilation_h != 1 || conv.dilation_w != 1 ||
      conv.kernel_h * conv.kernel_w > kMostPatchFloats ||
      conv.in_channels * pc.plane > kMostImageFloats ||
      conv.out_pixels() >= (int64_t(1) << 24) || pool.in_h != conv.out_h ||
      pool.in_w != conv.out_w)
    return false;
  Tensor grad_weight, grad_bias;
  if (weight) grad_weight = empty_of(w.sizes(), w.options());
  if (bias) grad_bias = empty_of(at::IntArrayRef{conv.out_channels}, w.options());
  const Tensor go = grad_output.contiguous(), r = result.contiguous(), ix = indices.contiguous();
  const bool ok = weight_grads(conv, pool, go.const_data_ptr<float>(), r.const_data_ptr<float>(),
                               ix.const_data_ptr<int64_t>(), x.const_data_ptr<float>(),
                               weight ? grad_weight.mutable_data_ptr<float>() : nullptr,
                               bias ? grad_bias.mutable_data_ptr<float>() : nullptr);
  if (ok) grads = {grad_weight, grad_bias};
  return ok;
}

}  // namespace cpu
}  // namespace pyengine
