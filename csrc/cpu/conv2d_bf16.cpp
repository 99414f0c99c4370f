// bfloat16 conv2d on AMX tiles (level amx_bf16; interface: cpu/conv2d.h): forward, grad_input
// and grad_weight / grad_bias as implicit GEMMs that load their A tiles straight from zero-padded
// copies of the input, with float32 accumulation and one rounding per result element. Without
// AMX (level avx512_bf16) the same packed operands go through AVX512_BF16's dot products instead
// of tile multiplies (multiply_dp, weight_items_dp: below), tap by tap only (no strip mode).
//
//   y[n, co, oh, ow] = round(bias[co] + sum_(kh, kw, ci) x[n, ci, ih, iw] * w[co, ci, kh, kw]),
//   ih = oh * stride_h - padding_h + kh * dilation_h (iw likewise)
//
// Why no im2col: in a channels-last image a tap's 32 channels of one pixel are 64 contiguous
// bytes, and the same tap for 16 consecutive output pixels of a row lies at a constant stride
// (stride_w pixels), which is exactly a tile load (TILELOADD: 16 rows of 64 bytes, any row
// stride). So each (tap, 32-channel block) step of the reduction is one A tile per 16 output
// pixels read in place: no strip of taps is ever built (the im2col + tile GEMM attempt, whose
// strips were 9x the input for 3x3, was no faster than the float32 kernels).
//
// Strip mode, for narrow layers: a kernel row's kernel_w taps x in_channels channels are
// contiguous too (kernel_w * C values from the pixel's first tap on, dilation_w 1), and again at
// a constant stride for consecutive output pixels. Where that strip fills fewer 32-value steps
// than the taps' channel blocks do (LeNet's 6 -> 16 5x5: one step of 30 values per kernel row,
// 5 steps, against 25 steps of 6 channels in 32), each step loads 32 values of the strip, the
// image unpadded in its channels (Cp = C). A strip's last step reads up to 31 values past it
// (the next pixels', or the zero tail) against zero weights: the results stay exact unless those
// values hold an Inf or NaN (0 x Inf), so an input with any takes the tap-by-tap steps.
//
// Operands:
//   xp: the input as [n][padded row][padded column][Cp channels] bfloat16, Cp = in_channels
//       rounded up to 32 (zeros; strip mode: in_channels), the padding zeros too, plus a tail of
//       zeros that the last segment's rows past the output row may read (their results are
//       dropped);
//   wp: the weight as B tiles, [co block of 16][tap][channel block of 32][pair][co][2]: a tile
//       is 16 pairs of channels x 16 output channels, 1 KB, in the order the reduction reads
//       them; output channels padded to whole pairs of blocks with zeros (strip mode: [co block]
//       [kernel row][block of 32 strip values][pair][co][2], zeros past the strip).
// A "segment" is up to 16 consecutive output pixels of one output row. The C block is 2
// segments x 32 output channels (4 tiles: the 8 tile registers hold 4 C, 2 A, 2 B), summed over
// all taps and channel blocks in order by one thread, then stored through a float32 buffer:
// bias added in float32, rounded to bfloat16 (round to nearest even), written in the output's
// layout. Results depend on the shapes only, never on the thread count.
//
// Napkin math, 3x3 64 -> 64 at 56 x 56, batch 8 (1.85 GFLOP): a reduction step is 4 tile loads
// (4 KB, from L1 / L2) for 4 tile multiplies of 16 x 16 x 32: ~64 cycles either way, so about
// half of the tile unit's peak (as the linear GEMM: cpu/gemm_bf16.cpp), ~500 FLOP per cycle and
// core: ~1 ms on the 2 cores; the layout copies move ~10 MB (input to channels-last, padded
// copy, output) on top.
//
// Napkin math, strip mode, LeNet's 6 -> 16 5x5 at 14 x 14, batch 256 (123 MFLOP): 2560 segments
// of 10 pixels, 5 steps each, 4 tile multiplies a step for 2 segments, half of them on the zero
// second block of output channels: 25600 multiplies of 16 cycles, ~0.1 ms per core; measured
// 0.26 ms for the call on 2 cores (the float32 kernel 0.65, torch's bfloat16 1.3), the packing
// and the NCHW stores being the rest.
//
// Where it runs (bf16_forward_fits): one group, 16+ output channels, and 16+ input channels or
// (on tiles) a strip whose steps are at least half real (narrower layers would multiply mostly
// padding: LeNet's conv1, 1 -> 6, keeps the float32 kernels). grad_input is the same kernel run
// on dY, once per phase of the stride (backward_input_bf16, below), wherever the forward runs;
// grad_weight has its own, tap by tap and (on tiles) in strips (below). Measured against torch
// and the float32 path: README.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/layout.h"
#include "cpu/allocator.h"
#include "cpu/amx.h"
#include "cpu/conv2d.h"
#include "cpu/convert.h"
#include "cpu/isa.h"
#include "cpu/transpose.h"

namespace pyengine {
namespace cpu {
namespace conv2d {

namespace {

// What multiplies the operands: AMX tiles (level amx_bf16), or AVX512_BF16's dot products on
// the same packed operands (level avx512_bf16, no AMX: the *_dp kernels below), or neither.
enum class Unit { None, Tiles, DotProducts };

Unit unit() {
#if PE_HAVE_AMX_BF16
  static const Unit u = isa_for(Family::GemmBf16) == Isa::AmxBf16      ? Unit::Tiles
                        : isa_for(Family::GemmBf16) == Isa::Avx512Bf16 ? Unit::DotProducts
                                                                       : Unit::None;
  return u;
#else
  return Unit::None;
#endif
}

}  // namespace

bool bf16_kernels_available() { return unit() != Unit::None; }

namespace {

constexpr int64_t kCb = 32;  // values of a reduction step (an A tile's row): 16 pairs

// Reduction steps per kernel row: a channel block per tap, or blocks of the row's strip.
int64_t strip_blocks(const Geometry& g) {
  return (g.kernel_w * g.in_channels + kCb - 1) / kCb;
}

// Strip mode (see the top of this file): where one kernel row's taps cost fewer steps as a strip
// of kernel_w x in_channels contiguous values than as channel blocks tap by tap (narrow layers:
// LeNet's 6 -> 16 5x5 is 5 steps instead of 25). Its columns must be contiguous: dilation_w 1.
// Tiles only: the dot products have no strip kernels (their layers keep the float32 ones).
bool strip_mode(const Geometry& g) {
  return unit() == Unit::Tiles && g.dilation_w == 1 &&
         strip_blocks(g) < g.kernel_w * ((g.in_channels + kCb - 1) / kCb);
}

// The tiles' own geometry: one group, 16+ output channels (the C tiles' columns, in pairs of
// 16: at least a quarter of what they multiply is real).
bool tiles_fit(const Geometry& g) {
  return bf16_kernels_available() && g.groups == 1 && g.out_channels >= 16;
}

}  // namespace

bool bf16_forward_fits(const Geometry& g) {
  // 16+ input channels (tap by tap: at least half of each step's values real), or a strip whose
  // steps are at least half real (6 channels x 5 columns: 30 of 32; 1 x 5, LeNet's conv1, 5 of
  // 32 would multiply mostly padding: it keeps the float32 kernels).
  return tiles_fit(g) &&
         (g.in_channels >= 16 ||
          (strip_mode(g) && 2 * g.kernel_w * g.in_channels >= strip_blocks(g) * kCb));
}

// grad_weight: 16+ input channels tap by tap, or the forward's strips (below).
bool bf16_backward_weight_fits(const Geometry& g) { return bf16_forward_fits(g); }

// grad_input wherever the forward runs on tiles (its convolution of dY has the forward's output
// channels as its input: 16+; LeNet's, 6 outputs of a 32-wide C block, still beats the float32
// kernels: 0.66 -> 0.49 ms at batch 256).
bool bf16_backward_input_fits(const Geometry& g) {
  return bf16_forward_fits(g) && (g.stride_h == 1 || g.dilation_h == 1) &&
         (g.stride_w == 1 || g.dilation_w == 1);
}

namespace {

// The span of t's elements from its first: a dense tensor's, in any layout (a channels_last
// weight is not copied).
at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

// Whether any of n bfloat16 values is Inf or NaN (exponent bits all ones), in baseline code.
bool any_non_finite_portable(const uint16_t* v, int64_t n) {
  uint16_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint16_t>((v[i] & 0x7f80u) == 0x7f80u);
  return bad != 0;
}

}  // namespace

#if PE_HAVE_AMX_BF16

// GCC 12 flags its own _mm512_undefined_* inside intrinsics as uninitialized where inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// Whether any of n bfloat16 values is Inf or NaN (exponent bits all ones).
PE_TARGET_AVX512 bool any_non_finite(const uint16_t* v, int64_t n) {
  const __m512i e = _mm512_set1_epi16(0x7f80);
  __mmask32 bad = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    bad |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_loadu_si512(v + i), e), e);
  if (i < n) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (n - i)) - 1);
    bad |= _mm512_mask_cmpeq_epi16_mask(m, _mm512_and_si512(_mm512_maskz_loadu_epi16(m, v + i), e),
                                        e);
  }
  return bad != 0;
}

}  // namespace

// Whether every element of t (bfloat16) is finite. It guards every bfloat16 forward and
// grad_input with padding, on the calling thread while the others wait: in baseline code (eight
// values an instruction) it took 1.1% of a stride-2 3x3 64->128 @56 channels_last forward's
// samples (perf), its weight of 74K values.
bool all_finite_bf16(const at::Tensor& t) {
  const at::Tensor c = dense(t);
  const uint16_t* v = reinterpret_cast<const uint16_t*>(c.const_data_ptr<at::BFloat16>());
  return bf16_kernels_available() ? !any_non_finite(v, c.numel())
                                  : !any_non_finite_portable(v, c.numel());
}

namespace {

constexpr int64_t kSeg = 16;       // output pixels of a segment: the rows of an A / C tile
constexpr int64_t kCoBlock = 16;   // output channels of a B / C tile

// Zeros before the input's first row and column in the padded copy: the convolution's padding,
// or, for grad_input's phases, any offset (negative: the copy starts inside the input).
struct Pads {
  int64_t top, left;
};

// The sizes of the packed operands, shared by the packing and the multiply. The padded copy has
// the rows and columns the output reads: (out - 1) * stride + (kernel - 1) * dilation + 1.
struct Plan {
  bool strip;              // strip mode: a kernel row's taps as one strip of values
  int64_t Hp, Wp, Cp, CB;  // padded input rows, columns, channels; blocks of a step
  int64_t kw_steps;        // steps along a kernel row: kernel_w (tap by tap), 1 (strip)
  int64_t taps;            // kernel_h * kw_steps: the B tiles' (tap) index
  int64_t co_blocks;       // blocks of 16 output channels, a multiple of 2
  int64_t per_row;         // segments per output row
  int64_t segments;        // batch * out_h * per_row
  int64_t image;           // elements of one padded image
  int64_t xp_size;         // elements of xp, its zero tail included
  Plan(const Geometry& g, bool strip_) : strip(strip_) {
    Hp = (g.out_h - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h + 1;
    Wp = (g.out_w - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w + 1;
    Cp = strip ? g.in_channels : round_up(g.in_channels, kCb);
    CB = strip ? strip_blocks(g) : Cp / kCb;
    kw_steps = strip ? 1 : g.kernel_w;
    taps = g.kernel_h * kw_steps;
    co_blocks = round_up(g.out_channels, 2 * kCoBlock) / kCoBlock;
    per_row = (g.out_w + kSeg - 1) / kSeg;
    segments = g.batch * g.out_h * per_row;
    image = Hp * Wp * Cp;
    // A segment's rows run up to 15 pixels (stride_w columns each) past the output row; a
    // strip's last block up to 31 values past the strip.
    xp_size = g.batch * image + (kSeg * g.stride_w + 1) * Cp + (strip ? kCb : 0);
  }
};

// xp from x (channels-last contiguous, [n][h][w][c]), images [n0, n1): padded row hp, column wp
// hold x[hp - top][wp - left] where that lies in x, else zeros.
void pack_input(const Geometry& g, const Plan& p, Pads pads, const uint16_t* x, int64_t n0,
                int64_t n1, uint16_t* xp) {
  const int64_t C = g.in_channels, W = g.in_w;
  // The padded columns [w0, w1) that hold input columns w0 - left ...
  const int64_t w0 = std::clamp<int64_t>(pads.left, 0, p.Wp);
  const int64_t w1 = std::clamp<int64_t>(pads.left + W, w0, p.Wp);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t hp = 0; hp < p.Hp; ++hp) {
      uint16_t* row = xp + n * p.image + hp * p.Wp * p.Cp;
      const int64_t h = hp - pads.top;
      if (h < 0 || h >= g.in_h || w0 == w1) {
        std::memset(row, 0, sizeof(uint16_t) * p.Wp * p.Cp);
        continue;
      }
      std::memset(row, 0, sizeof(uint16_t) * w0 * p.Cp);
      std::memset(row + w1 * p.Cp, 0, sizeof(uint16_t) * (p.Wp - w1) * p.Cp);
      const uint16_t* src = x + ((n * g.in_h + h) * W + (w0 - pads.left)) * C;
      uint16_t* dst = row + w0 * p.Cp;
      if (p.Cp == C) {
        std::memcpy(dst, src, sizeof(uint16_t) * (w1 - w0) * C);
      } else {
        for (int64_t w = 0; w < w1 - w0; ++w) {
          std::memcpy(dst + w * p.Cp, src + w * C, sizeof(uint16_t) * C);
          std::memset(dst + w * p.Cp + C, 0, sizeof(uint16_t) * (p.Cp - C));
        }
      }
    }
  }
}

// pack_input from x in NCHW ([n][c][h][w] contiguous): per padded row, 16 columns x 32 channels
// at a time, channel pairs merged into words (16 rows of 16 words) and transposed so each
// column's 32 channels are contiguous. (torch's NCHW -> channels-last copy took ~0.9 ms for a
// 64-channel 56 x 56 batch of 8, a third of the forward.)
PE_TARGET_AVX512 void pack_input_nchw(const Geometry& g, const Plan& p, Pads pads,
                                      const uint16_t* x, int64_t n0, int64_t n1, uint16_t* xp) {
  const int64_t C = g.in_channels, H = g.in_h, W = g.in_w;
  const int64_t w0 = std::clamp<int64_t>(pads.left, 0, p.Wp);
  const int64_t w1 = std::clamp<int64_t>(pads.left + W, w0, p.Wp);
  alignas(64) uint32_t words[16 * 16];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t hp = 0; hp < p.Hp; ++hp) {
      uint16_t* row = xp + n * p.image + hp * p.Wp * p.Cp;
      const int64_t h = hp - pads.top;
      if (h < 0 || h >= H || w0 == w1) {
        std::memset(row, 0, sizeof(uint16_t) * p.Wp * p.Cp);
        continue;
      }
      std::memset(row, 0, sizeof(uint16_t) * w0 * p.Cp);
      std::memset(row + w1 * p.Cp, 0, sizeof(uint16_t) * (p.Wp - w1) * p.Cp);
      const uint16_t* src = x + (n * C * H + h) * W + (w0 - pads.left);  // channel 0
      if (p.Cp % 2 != 0) {  // strip mode, odd channels: a word would hold two pixels' values
        for (int64_t w = 0; w < w1 - w0; ++w)
          for (int64_t ci = 0; ci < C; ++ci) row[(w0 + w) * C + ci] = src[ci * H * W + w];
        continue;
      }
      const int64_t blocks = (p.Cp + kCb - 1) / kCb;  // of 32 channels, the last one partial
      for (int64_t cb = 0; cb < blocks; ++cb) {
        const int64_t pairs = std::min<int64_t>(16, (p.Cp - cb * kCb) / 2);
        for (int64_t c0 = 0; c0 < w1 - w0; c0 += 16) {
          const int64_t nw = std::min<int64_t>(16, w1 - w0 - c0);
          const __mmask16 m = static_cast<__mmask16>(nw == 16 ? 0xffffu : (1u << nw) - 1u);
          for (int64_t q = 0; q < pairs; ++q) {
            const int64_t ci = cb * kCb + 2 * q;
            const uint16_t* lo = ci < C ? src + ci * H * W + c0 : nullptr;
            const uint16_t* hi = ci + 1 < C ? lo + H * W : nullptr;
            _mm512_store_si512(words + q * 16, lo ? merge_rows(lo, hi, m) : _mm512_setzero_si512());
          }
          transpose16(reinterpret_cast<const float*>(words), 16, pairs, nw,
                      reinterpret_cast<float*>(row + (w0 + c0) * p.Cp + cb * kCb), p.Cp / 2,
                      nullptr);
        }
      }
    }
}

// Where the packed weight's (co, ci, tap) comes from. Forward: w[co][ci][kh][kw] itself.
// Transposed (grad_input): w is the forward convolution's weight [ci][co][KH][KW] (this
// convolution's output channels are its input channels), and this kernel's tap (kh, kw) reads
// the forward tap (first_h + step_h * (kernel_h - 1 - kh), likewise w): flipped, and for a
// strided convolution's phase, every step-th tap from the phase's first. w is read through its
// strides (a channels_last weight as it is: its contiguous copy and the finiteness check's were
// ~6% of a 64 -> 128 stride-2 channels_last forward, perf, one thread).
struct WeightMap {
  bool transposed = false;
  int64_t first_h = 0, first_w = 0, step_h = 1, step_w = 1;
  int64_t kernel_h = 0, kernel_w = 0;  // the forward weight's (transposed only)
  std::array<int64_t, 4> strides{};    // w's, in elements
};

std::array<int64_t, 4> strides_of(const at::Tensor& w) {
  return {w.stride(0), w.stride(1), w.stride(2), w.stride(3)};
}

// wp from w, co blocks [j0, j1).
// A step's value i (of 32) is channel cb * 32 + i of tap (kh, kw) in tap-by-tap mode; in strip
// mode value cb * 32 + i of the kernel row's strip, [kw][channel] (zero past the strip).
void pack_weight(const Geometry& g, const Plan& p, const uint16_t* w, const WeightMap& m,
                 int64_t j0, int64_t j1, uint16_t* wp) {
  const int64_t Cin = g.in_channels, Cout = g.out_channels;
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t t = 0; t < p.taps; ++t) {
      const int64_t kh = t / p.kw_steps;
      for (int64_t cb = 0; cb < p.CB; ++cb) {
        uint16_t* tile = wp + ((j * p.taps + t) * p.CB + cb) * (kCb * kCoBlock);
        for (int64_t q = 0; q < kCb / 2; ++q)
          for (int64_t e = 0; e < 2; ++e) {
            const int64_t i = cb * kCb + 2 * q + e;
            const int64_t kw = p.strip ? i / Cin : t % p.kw_steps;
            const int64_t ci = p.strip ? i % Cin : i;
            const bool tap = kw < g.kernel_w && ci < Cin;
            const int64_t src_kh = m.transposed ? m.first_h + m.step_h * (g.kernel_h - 1 - kh) : kh;
            const int64_t src_kw = m.transposed ? m.first_w + m.step_w * (g.kernel_w - 1 - kw) : kw;
            // w[co][ci] (forward), w[ci][co] (transposed), at the source tap
            const int64_t co_stride = m.strides[m.transposed ? 1 : 0];
            const uint16_t* src = w + (tap ? ci * m.strides[m.transposed ? 0 : 1] +
                                                 src_kh * m.strides[2] + src_kw * m.strides[3]
                                           : 0);
            for (int64_t c = 0; c < kCoBlock; ++c) {
              const int64_t co = j * kCoBlock + c;
              tile[(q * kCoBlock + c) * 2 + e] = co < Cout && tap ? src[co * co_stride] : 0;
            }
          }
      }
    }
}

struct Segment {
  int64_t n, oh, ow0, count;
};

Segment segment(const Geometry& g, const Plan& p, int64_t s) {
  const int64_t row = s / p.per_row, ow0 = (s % p.per_row) * kSeg;
  return {row / g.out_h, row % g.out_h, ow0, std::min(kSeg, g.out_w - ow0)};
}

// The output's strides (n, c, h, w) in elements.
struct OutStrides {
  int64_t n, c, h, w;
};

// 16 float32 lanes stored under mask m into y: bfloat16 (uint16_t: rounded to nearest even) or
// float32 (as they are: the fused block pools them before its one rounding).
PE_TARGET_AVX512_BF16 PE_INLINE void store_lanes(uint16_t* y, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(v));
}
PE_TARGET_AVX512_BF16 PE_INLINE void store_lanes(float* y, __mmask16 m, __m512 v) {
  _mm512_mask_storeu_ps(y, m, v);
}

// buf's 16 x 16 block (rows: the segment's pixels, columns: output channels co0 ..), plus bias,
// stored into y (see store_lanes).
template <typename Y>
PE_TARGET_AVX512_BF16 void store_block(const float* blk, int64_t ld, const Segment& sg,
                                       int64_t co0, int64_t nco, const float* bias,
                                       const OutStrides& o, Y* y) {
  const __mmask16 cm = static_cast<__mmask16>(nco == 16 ? 0xffffu : (1u << nco) - 1u);
  Y* base = y + sg.n * o.n + co0 * o.c + sg.oh * o.h + sg.ow0 * o.w;
  if (o.c == 1) {  // channels last: a pixel's 16 channels are contiguous
    const __m512 b = _mm512_maskz_loadu_ps(cm, bias + co0);
    for (int64_t r = 0; r < sg.count; ++r)
      store_lanes(base + r * o.w, cm, _mm512_add_ps(_mm512_loadu_ps(blk + r * ld), b));
    return;
  }
  alignas(64) float t[16 * 16];
  transpose16(blk, ld, sg.count, nco, t, 16, nullptr, bias + co0);  // t[c][r]
  const __mmask16 rm =
      static_cast<__mmask16>(sg.count == 16 ? 0xffffu : (1u << sg.count) - 1u);
  if (o.w == 1) {
    for (int64_t c = 0; c < nco; ++c) store_lanes(base + c * o.c, rm, _mm512_load_ps(t + c * 16));
    return;
  }
  if constexpr (std::is_same_v<Y, uint16_t>) {
    if (o.w == 2) {
      // Every other element of a row (an NCHW grad_input's stride-2 phase): each rounded value
      // widened to the low half of a 32-bit lane, the even halves stored under mask. Element by
      // element (below), a stride-2 3x3 64 -> 128 @56 NCHW grad_input took 0.81-0.82x torch's
      // time, 0.70-0.75x with this (in-process, builds alternating).
      const __mmask32 even = static_cast<__mmask32>(
          (sg.count == 16 ? 0xffffffffu : (1u << (2 * sg.count)) - 1u) & 0x55555555u);
      for (int64_t c = 0; c < nco; ++c) {
        const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(t + c * 16));
        _mm512_mask_storeu_epi16(base + c * o.c, even, _mm512_cvtepu16_epi32(rounded));
      }
      return;
    }
  }
  alignas(64) Y stored[16];
  for (int64_t c = 0; c < nco; ++c) {
    store_lanes(stored, 0xffff, _mm512_load_ps(t + c * 16));
    for (int64_t r = 0; r < sg.count; ++r) base[c * o.c + r * o.w] = stored[r];
  }
}

// Segment pairs [s0, s1) times every pair of output-channel blocks, on this thread (the tile
// configuration is per thread).
template <typename Y>
PE_TARGET_AMX_BF16 void multiply(const Geometry& g, const Plan& p, const uint16_t* xp,
                                 const uint16_t* wp, const float* bias, const OutStrides& o,
                                 int64_t s0, int64_t s1, Y* y) {
  amx::configure();
  alignas(64) float buf[2 * kSeg * 2 * kCoBlock];  // [pixel of the 2 segments][32 channels]
  const int64_t a_stride = g.stride_w * p.Cp * 2;  // bytes between a tile's rows
  const int64_t b_tile = kCb * kCoBlock;           // elements of a B tile
  // Groups of kPairGroup segment pairs take each pair of co blocks in turn: its B tiles (36 KB
  // for 64 channels, 3x3) stay in L1 across the group (with every pair of blocks per segment
  // pair, all of w's tiles passed through L1 for each; a 64 -> 128 stride-2 channels_last
  // forward took 5-7% longer, one thread).
  constexpr int64_t kPairGroup = 8;
  for (int64_t sp0 = s0; sp0 < s1; sp0 += kPairGroup)
    for (int64_t j = 0; j < p.co_blocks; j += 2)
      for (int64_t sp = sp0; sp < std::min(s1, sp0 + kPairGroup); ++sp) {
        const Segment sg[2] = {segment(g, p, 2 * sp),
                               segment(g, p, std::min(2 * sp + 1, p.segments - 1))};
        const bool second = 2 * sp + 1 < p.segments;
        const uint16_t* a[2];
        for (int k = 0; k < 2; ++k)
          a[k] = xp + sg[k].n * p.image +
                 (sg[k].oh * g.stride_h * p.Wp + sg[k].ow0 * g.stride_w) * p.Cp;
        amx::zero_c();
        const uint16_t* b0 = wp + j * p.taps * p.CB * b_tile;
        const uint16_t* b1 = b0 + p.taps * p.CB * b_tile;
        for (int64_t kh = 0; kh < g.kernel_h; ++kh)
          for (int64_t kw = 0; kw < p.kw_steps; ++kw) {  // strip mode: one step, kw = 0
            const int64_t shift = (kh * g.dilation_h * p.Wp + kw * g.dilation_w) * p.Cp;
            const int64_t t = kh * p.kw_steps + kw;
            for (int64_t cb = 0; cb < p.CB; ++cb) {
              const int64_t bo = (t * p.CB + cb) * b_tile;
              amx::step(a[0] + shift + cb * kCb, a[1] + shift + cb * kCb, a_stride, b0 + bo,
                        b1 + bo, 64);
            }
          }
        amx::store_c(buf);
        for (int k = 0; k < (second ? 2 : 1); ++k)
          for (int64_t jj = 0; jj < 2; ++jj) {
            const int64_t co0 = (j + jj) * kCoBlock;
            if (co0 >= g.out_channels) continue;
            store_block(buf + k * kSeg * 32 + jj * kCoBlock, 32, sg[k], co0,
                        std::min(kCoBlock, g.out_channels - co0), bias, o, y);
          }
      }
  _tile_release();
}

// 16 output channels or fewer (LeNet's conv2; grad_input of a layer of 16 or fewer inputs):
// multiply's second block of output channels would be zeros. Quads of segments [q0, q1) x the
// one block: amx::step_quad, a C tile per segment. Each result is summed over the same steps in
// the same order as in multiply: the same bits, half the tile multiplies.
template <typename Y>
PE_TARGET_AMX_BF16 void multiply_quads(const Geometry& g, const Plan& p, const uint16_t* xp,
                                       const uint16_t* wp, const float* bias,
                                       const OutStrides& o, int64_t q0, int64_t q1, Y* y) {
  amx::configure();
  alignas(64) float buf[4 * kSeg * kCoBlock];  // [segment][pixel][16 channels]
  const int64_t a_stride = g.stride_w * p.Cp * 2;
  const int64_t b_tile = kCb * kCoBlock;
  for (int64_t sq = q0; sq < q1; ++sq) {
    Segment sg[4];
    const uint16_t* a[4];
    const int64_t valid = std::min<int64_t>(4, p.segments - 4 * sq);
    for (int k = 0; k < 4; ++k) {  // (past the last segment: its repeat, results dropped)
      sg[k] = segment(g, p, std::min(4 * sq + k, p.segments - 1));
      a[k] = xp + sg[k].n * p.image +
             (sg[k].oh * g.stride_h * p.Wp + sg[k].ow0 * g.stride_w) * p.Cp;
    }
    amx::zero_c();
    for (int64_t kh = 0; kh < g.kernel_h; ++kh)
      for (int64_t kw = 0; kw < p.kw_steps; ++kw) {
        const int64_t shift = (kh * g.dilation_h * p.Wp + kw * g.dilation_w) * p.Cp;
        const int64_t t = kh * p.kw_steps + kw;
        for (int64_t cb = 0; cb < p.CB; ++cb) {
          const int64_t off = shift + cb * kCb;
          amx::step_quad(a[0] + off, a[1] + off, a[2] + off, a[3] + off, a_stride,
                         wp + (t * p.CB + cb) * b_tile, 64);
        }
      }
    amx::store_c_quad(buf);
    for (int64_t k = 0; k < valid; ++k)
      store_block(buf + k * kSeg * kCoBlock, kCoBlock, sg[k], 0, g.out_channels, bias, o, y);
  }
  _tile_release();
}

// ---- The same products on AVX512_BF16's dot products (level avx512_bf16, no AMX) -----------
//
// A tile step, C[rows][32 channels] += A[rows][16 pairs] B[16 pairs][32 channels], is 16
// VDPBF16PS per row and 16 channels: per pair q, B's row q of each channel block (one 64-byte
// vector, the tile's layout as it is) against the row's pair q broadcast (a 32-bit word). C
// stays in registers for the whole reduction, 8 rows x 2 channel blocks at a time (16
// accumulators; per pair 2 vector loads and 8 broadcasts for 16 dot products; the forward
// also 6 x 4: multiply_dp), so the C blocks of the tile kernels are computed a chunk of rows
// after another, each over every step. Each result is summed over the same steps in the same
// order as on tiles, pair by pair; VDPBF16PS rounds differently from TDPBF16PS, so the two
// levels' bits differ (as every level's do).
//
// Napkin math, 3x3 64 -> 64 at 56 x 56, batch 8 (1.85 GFLOP): 2 VDPBF16PS a cycle (the FMA
// pipes; 64 FLOP each) is ~1050 GFLOP/s on the reference machine's 2 cores: ~1.8 ms at peak,
// against ~3.5 for float32 FMAs.
constexpr int kDpRows = 8;

// acc[r][j] += sum over pairs q < 16 of A[r][q] * Bj[q] for r < R: A's row r at a + r * a_stride
// (16 words of pairs), Bj's row q at b[j] + 32 q (16 channels x 2). Only the first `pairs`
// (the rest are zero rows of B: grad_weight's pairs past the output row).
template <int ROWS, int NB, int R = ROWS>
PE_TARGET_AVX512_BF16 PE_INLINE void dp_step(__m512 (&acc)[ROWS][NB], const uint16_t* a,
                                             int64_t a_stride, const uint16_t* const (&b)[NB],
                                             int pairs = 16) {
  static_assert(R <= ROWS && ROWS <= 8, "dp_step: up to 8 rows");
  // The rows' addresses from 3 base registers and the stride (row r at base + stride * 1, 2
  // or 4): GCC otherwise kept a pointer per row on the stack and reloaded it for each
  // broadcast (perf annotate: one extra load per dot product pair; the asm hides the bases'
  // relation so that it cannot).
  const char* r0 = reinterpret_cast<const char*>(a);
  int64_t st = a_stride * int64_t(sizeof(uint16_t));
  const char* r3 = r0 + 3 * st;
  const char* r6 = r0 + 6 * st;
  asm("" : "+r"(r0), "+r"(r3), "+r"(r6), "+r"(st));
  const char* rows[8] = {r0, r0 + st, r0 + 2 * st, r3, r0 + 4 * st, r3 + 2 * st, r6, r6 + st};
  #pragma GCC unroll 16
  for (int q = 0; q < 16; ++q) {
    if (q == pairs) break;
    __m512bh w[NB];
    #pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_loadu_si512(b[j] + 32 * q);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, rows[r] + 4 * q, sizeof word);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(word);
      #pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, w[j]);
    }
  }
}

// One segment's block of C (its `count` pixels x NB blocks of 16 output channels, the weight's
// blocks at b) into buf's rows, ld floats apart: chunks of ROWS pixels (a last one of 4 or fewer
// as a 4-row chunk), each summed over every (tap, channel block) step in order, C in registers.
template <int ROWS, int NB>
PE_TARGET_AVX512_BF16 PE_INLINE void segment_dp(const Geometry& g, const Plan& p,
                                                const uint16_t* a, int64_t a_stride,
                                                int64_t count, const uint16_t* const (&b)[NB],
                                                float* buf, int64_t ld) {
  const int64_t b_tile = kCb * kCoBlock;
  for (int64_t r0 = 0; r0 < count; r0 += ROWS) {
    __m512 acc[ROWS][NB];
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t kh = 0; kh < g.kernel_h; ++kh)
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t shift = (kh * g.dilation_h * p.Wp + kw * g.dilation_w) * p.Cp;
        const int64_t t = kh * g.kernel_w + kw;
        for (int64_t cb = 0; cb < p.CB; ++cb) {
          const int64_t bo = (t * p.CB + cb) * b_tile;
          const uint16_t* ar = a + r0 * a_stride + shift + cb * kCb;
          const uint16_t* bt[NB];
          for (int j = 0; j < NB; ++j) bt[j] = b[j] + bo;
          if (count - r0 > 4)
            dp_step<ROWS, NB>(acc, ar, a_stride, bt);
          else
            dp_step<ROWS, NB, 4>(acc, ar, a_stride, bt);
        }
      }
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < NB; ++j) _mm512_store_ps(buf + (r0 + r) * ld + j * kCoBlock, acc[r][j]);
  }
}

// multiply's segment pairs [s0, s1) x blocks of output channels, on dot products; each
// segment's C block into a float32 buffer, stored by multiply's store_block. Chunks of 8 pixels
// x 2 channel blocks (16 accumulators: per pair 2 vector loads, 8 broadcasts, 16 dot products),
// or, where the output rows end in a segment of 9-12 pixels (28-wide rows: 16 + 12), 6 pixels x
// 4 blocks (24: 4 loads, 6 broadcasts, 24 dot products) while 4 blocks are left: 8 x 2 ran such
// a segment as 8 + 4 (the 4-row chunk: 8 dot products for 6 loads). 6 x 4 took 0.93-0.98x the
// time of 8 x 2 on 28-wide outputs (3x3, 64 and 128 channels, stride 1 and 2) and 1.02-1.09x on
// 56-wide ones (16 + 16 + 16 + 8: 8-row chunks with no tail), one build against the other,
// in-process against torch. (A 12-row chunk for the 12-pixel segments instead ran 1.6x slower.)
template <typename Y>
PE_TARGET_AVX512_BF16 void multiply_dp(const Geometry& g, const Plan& p, const uint16_t* xp,
                                       const uint16_t* wp, const float* bias,
                                       const OutStrides& o, int64_t s0, int64_t s1, Y* y) {
  constexpr int64_t kLd = 4 * kCoBlock;
  // [pixel of 2 segments][64 channels], + 2 rows: a 6-row chunk's rows past 16 (its results
  // dropped; the second segment, computed after, overwrites the first's)
  alignas(64) float buf[(2 * kSeg + 2) * kLd];
  const int64_t a_stride = g.stride_w * p.Cp;  // elements between a segment's pixels
  const int64_t b_block = p.taps * p.CB * kCb * kCoBlock;  // elements of one co block's tiles
  const int64_t tail = g.out_w % kSeg;  // the last segment of each output row (0: whole)
  const bool wide_chunks = tail > 8 && tail <= 12;
  constexpr int64_t kPairGroup = 8;  // (multiply's grouping: the B tiles stay in L1)
  for (int64_t sp0 = s0; sp0 < s1; sp0 += kPairGroup)
    for (int64_t j = 0; j < p.co_blocks;) {
      const int64_t nb = wide_chunks && p.co_blocks - j >= 4 ? 4 : 2;  // (co_blocks is even)
      for (int64_t sp = sp0; sp < std::min(s1, sp0 + kPairGroup); ++sp) {
        const bool second = 2 * sp + 1 < p.segments;
        const Segment sg[2] = {segment(g, p, 2 * sp),
                               segment(g, p, std::min(2 * sp + 1, p.segments - 1))};
        for (int k = 0; k < (second ? 2 : 1); ++k) {
          const uint16_t* a = xp + sg[k].n * p.image +
                              (sg[k].oh * g.stride_h * p.Wp + sg[k].ow0 * g.stride_w) * p.Cp;
          float* rows = buf + k * kSeg * kLd;
          if (nb == 4) {
            const uint16_t* const b[4] = {wp + j * b_block, wp + (j + 1) * b_block,
                                          wp + (j + 2) * b_block, wp + (j + 3) * b_block};
            segment_dp<6, 4>(g, p, a, a_stride, sg[k].count, b, rows, kLd);
          } else {
            const uint16_t* const b[2] = {wp + j * b_block, wp + (j + 1) * b_block};
            segment_dp<8, 2>(g, p, a, a_stride, sg[k].count, b, rows, kLd);
          }
        }
        for (int k = 0; k < (second ? 2 : 1); ++k)
          for (int64_t jj = 0; jj < nb; ++jj) {
            const int64_t co0 = (j + jj) * kCoBlock;
            if (co0 >= g.out_channels) continue;
            store_block(buf + k * kSeg * kLd + jj * kCoBlock, kLd, sg[k], co0,
                        std::min(kCoBlock, g.out_channels - co0), bias, o, y);
          }
      }
      j += nb;
    }
}

}  // namespace

namespace {

const uint16_t* bf16_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}

// x4's zero-padded copy (padding given by pads) in plan p's layout, images in parallel.
void pack_images(const Geometry& g, const Plan& p, Pads pads, const at::Tensor& x4,
                 uint16_t* xp) {
  // Channels-last input: rows copy as they are; anything else packs from NCHW.
  const bool channels_last = x4.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xl = channels_last ? x4 : x4.contiguous();
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xl.const_data_ptr<at::BFloat16>());
  std::memset(xp + g.batch * p.image, 0, sizeof(uint16_t) * (p.xp_size - g.batch * p.image));
  at::parallel_for(0, g.batch, 1, [&](int64_t n0, int64_t n1) {
    if (channels_last)
      pack_input(g, p, pads, x, n0, n1, xp);
    else
      pack_input_nchw(g, p, pads, x, n0, n1, xp);
  });
}

// The convolution of the packed input xp (plan p) by w (see WeightMap) in geometry g, plus
// bias32 (float32, zero-padded to the co blocks; null: none), into y at strides o.
template <typename Y>
void multiply_packed(const Geometry& g, const Plan& p, const uint16_t* xp, const uint16_t* w,
                     const WeightMap& m, const float* bias32, Y* y, const OutStrides& o) {
  CachedBuffer<uint16_t> wp(static_cast<size_t>(p.co_blocks * p.taps * p.CB * kCb * kCoBlock),
                            false);
  at::parallel_for(0, p.co_blocks, 1, [&](int64_t j0, int64_t j1) {
    pack_weight(g, p, w, m, j0, j1, wp.data());
  });
  CachedBuffer<float> zeros(static_cast<size_t>(p.co_blocks * kCoBlock), 0.0f);
  const float* bias = bias32 ? bias32 : zeros.data();
  if (unit() == Unit::DotProducts) {
    at::parallel_for(0, (p.segments + 1) / 2, 4, [&](int64_t s0, int64_t s1) {
      multiply_dp<Y>(g, p, xp, wp.data(), bias, o, s0, s1, y);
    });
    return;
  }
  if (g.out_channels <= kCoBlock) {
    at::parallel_for(0, (p.segments + 3) / 4, 2, [&](int64_t q0, int64_t q1) {
      multiply_quads<Y>(g, p, xp, wp.data(), bias, o, q0, q1, y);
    });
    return;
  }
  const int64_t pairs = (p.segments + 1) / 2;
  at::parallel_for(0, pairs, 4, [&](int64_t s0, int64_t s1) {
    multiply<Y>(g, p, xp, wp.data(), bias, o, s0, s1, y);
  });
}

// The convolution of x4 (4-D, bfloat16) by w (see WeightMap) in geometry g (its padding given by
// pads), plus bias32 (float32, zero-padded to the co blocks; null: none), into y at strides o.
template <typename Y>
void convolve(const Geometry& g, Pads pads, const at::Tensor& x4, const uint16_t* w,
              const WeightMap& m, const float* bias32, Y* y, const OutStrides& o) {
  if (g.batch == 0 || g.out_h <= 0 || g.out_w <= 0 || g.out_channels == 0) return;
  // A strip's last step reads real values past the strip (the next pixels') against zero
  // weights: 0 x Inf would be a NaN where torch has none. An input with an Inf or NaN takes the
  // tap-by-tap steps, whose padding channels are zeros.
  const at::Tensor xl = x4.is_contiguous(at::MemoryFormat::ChannelsLast) ? x4 : x4.contiguous();
  const Plan p(g, strip_mode(g) && !any_non_finite(bf16_bits(xl), xl.numel()));
  CachedBuffer<uint16_t> xp(static_cast<size_t>(p.xp_size), false);
  pack_images(g, p, pads, xl, xp.data());
  multiply_packed<Y>(g, p, xp.data(), w, m, bias32, y, o);
}

OutStrides strides4(const at::Tensor& t4) {
  return {t4.stride(0), t4.stride(1), t4.stride(2), t4.stride(3)};
}

// One dimension of a grad_input phase: the outputs a, a + s, ... of a convolution with stride s
// (dilation 1 where s > 1), read from dY through the taps first, first + s, ... of the kernel.
struct Phase {
  int64_t outputs;  // of the phase
  int64_t taps;     // forward taps that reach it
  int64_t first;    // the first of them
  int64_t pad;      // zeros before dY's first row / column (negative: starts inside dY)
};

Phase phase_of(int64_t a, int64_t in, int64_t kernel, int64_t stride, int64_t padding,
               int64_t dilation) {
  Phase ph;
  ph.outputs = a < in ? (in - a + stride - 1) / stride : 0;
  if (stride == 1) {  // every tap, dilated: dY rows a + padding - kh * dilation
    ph.taps = kernel;
    ph.first = 0;
    ph.pad = (kernel - 1) * dilation - padding;
    return ph;
  }
  // taps kh = first + stride * m reach output a + stride * i from dY row
  // i + (a + padding - kh) / stride (dilation 1)
  ph.first = (a + padding) % stride;
  ph.taps = ph.first < kernel ? (kernel - 1 - ph.first) / stride + 1 : 0;
  const int64_t top = (a + padding - ph.first) / stride;  // offset of the first tap
  ph.pad = (ph.taps - 1) - top;
  return ph;
}

}  // namespace

at::Tensor forward_bf16(const Geometry& g, const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& bias, bool channels_last, bool float_output) {
  at::Tensor out = empty_image<int64_t>(
      at::IntArrayRef(g.output_sizes()), channels_last,
      input.options().dtype(float_output ? at::kFloat : at::kBFloat16));
  if (out.numel() == 0) return out;
  WeightMap m;
  m.strides = strides_of(weight);
  // The bias in float32, zero-padded to the co blocks (added before the one rounding).
  CachedBuffer<float> b32(static_cast<size_t>(round_up(g.out_channels, 2 * kCoBlock)), 0.0f);
  if (bias.defined()) {
    const at::Tensor bc = bias.contiguous();
    const at::BFloat16* pb = bc.const_data_ptr<at::BFloat16>();
    for (int64_t c = 0; c < g.out_channels; ++c) b32[c] = static_cast<float>(pb[c]);
  }
  const at::Tensor y4 = g.batched ? out : out.unsqueeze(0);
  Geometry g4 = g;
  g4.batched = true;
  const at::Tensor x4 = g.batched ? input : input.unsqueeze(0);
  const float* b = bias.defined() ? b32.data() : nullptr;
  if (float_output)
    convolve(g4, {g.padding_h, g.padding_w}, x4, bf16_bits(weight), m, b,
             out.mutable_data_ptr<float>(), strides4(y4));
  else
    convolve(g4, {g.padding_h, g.padding_w}, x4, bf16_bits(weight), m, b,
             reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>()), strides4(y4));
  return out;
}

// grad_input: for each phase (a, b) of the stride, the outputs (a + s_h i, b + s_w j) are a
// stride-1 convolution of dY by the phase's taps of the weight, flipped, in and out channels
// swapped (stride 1: one phase, every tap). Each phase writes its pixels in place.
at::Tensor backward_input_bf16(const Geometry& g, const at::Tensor& grad_output,
                              const at::Tensor& weight, bool channels_last) {
  const std::vector<int64_t> sizes = g.batched
      ? std::vector<int64_t>{g.batch, g.in_channels, g.in_h, g.in_w}
      : std::vector<int64_t>{g.in_channels, g.in_h, g.in_w};
  at::Tensor grad_input = empty_image<int64_t>(at::IntArrayRef(sizes), channels_last,
                                               grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  // one layout for every phase: channels-last as it is, else NCHW (convolve packs either)
  const at::Tensor dy = g.batched ? grad_output : grad_output.unsqueeze(0);
  const at::Tensor dy4 =
      dy.is_contiguous(at::MemoryFormat::ChannelsLast) ? dy : dy.contiguous();
  const at::Tensor dx4 = g.batched ? grad_input : grad_input.unsqueeze(0);
  const OutStrides all = strides4(dx4);
  uint16_t* dx = reinterpret_cast<uint16_t*>(grad_input.mutable_data_ptr<at::BFloat16>());
  // The phases' convolutions (t: the phase's geometry, pads: its zero rows and columns before
  // dY's first), and the pixels no tap reaches (zeros).
  struct PhaseConv {
    Geometry t;
    Pads pads;
    WeightMap m;
    uint16_t* base;
    OutStrides o;
  };
  std::vector<PhaseConv> convs;
  for (int64_t a = 0; a < g.stride_h; ++a)
    for (int64_t b = 0; b < g.stride_w; ++b) {
      const Phase r = phase_of(a, g.in_h, g.kernel_h, g.stride_h, g.padding_h, g.dilation_h);
      const Phase c = phase_of(b, g.in_w, g.kernel_w, g.stride_w, g.padding_w, g.dilation_w);
      if (r.outputs == 0 || c.outputs == 0) continue;
      const OutStrides o{all.n, all.c, all.h * g.stride_h, all.w * g.stride_w};
      uint16_t* base = dx + a * all.h + b * all.w;
      if (r.taps == 0 || c.taps == 0) {  // no tap reaches these pixels: zeros
        for (int64_t n = 0; n < g.batch; ++n)
          for (int64_t ci = 0; ci < g.in_channels; ++ci)
            for (int64_t i = 0; i < r.outputs; ++i)
              for (int64_t j = 0; j < c.outputs; ++j)
                base[n * o.n + ci * o.c + i * o.h + j * o.w] = 0;
        continue;
      }
      Geometry t = g;
      t.batched = true;
      t.in_channels = g.out_channels;
      t.in_h = g.out_h;
      t.in_w = g.out_w;
      t.out_channels = g.in_channels;
      t.out_h = r.outputs;
      t.out_w = c.outputs;
      t.kernel_h = r.taps;
      t.kernel_w = c.taps;
      t.stride_h = t.stride_w = 1;
      t.dilation_h = g.stride_h == 1 ? g.dilation_h : 1;
      t.dilation_w = g.stride_w == 1 ? g.dilation_w : 1;
      t.padding_h = r.pad;  // (informational: the pads below are what is read)
      t.padding_w = c.pad;
      convs.push_back({t, {r.pad, c.pad},
                       WeightMap{true, r.first, c.first, g.stride_h, g.stride_w, g.kernel_h,
                                 g.kernel_w, strides_of(weight)},
                       base, o});
    }
  bool strips = false;
  for (const PhaseConv& pc : convs) strips = strips || strip_mode(pc.t);
  if (convs.size() < 2 || strips) {  // one convolution (stride 1), or strips: as they come
    for (const PhaseConv& pc : convs)
      convolve(pc.t, pc.pads, dy4, bf16_bits(weight), pc.m, nullptr, pc.base, pc.o);
    return grad_input;
  }
  // Tap by tap, every phase reads one zero-padded copy of dY, with the most padding any phase
  // has before its first row and column; each phase's own copy starts inside it. (A copy per
  // phase packed dY four times at stride 2: 12% of a 64 -> 128 @56 grad_input, perf, one
  // thread.) The same values at the same places of each phase's view: the same bits.
  Pads most{convs[0].pads.top, convs[0].pads.left};
  for (const PhaseConv& pc : convs)
    most = {std::max(most.top, pc.pads.top), std::max(most.left, pc.pads.left)};
  Plan shared(convs[0].t, false);
  const int64_t overrun = shared.xp_size - g.batch * shared.image;  // (a last segment's reads)
  shared.Hp = shared.Wp = 0;
  for (const PhaseConv& pc : convs) {
    const Plan p(pc.t, false);
    shared.Hp = std::max(shared.Hp, most.top - pc.pads.top + p.Hp);
    shared.Wp = std::max(shared.Wp, most.left - pc.pads.left + p.Wp);
  }
  shared.image = shared.Hp * shared.Wp * shared.Cp;
  shared.xp_size = g.batch * shared.image + overrun;
  CachedBuffer<uint16_t> xp(static_cast<size_t>(shared.xp_size), false);
  pack_images(convs[0].t, shared, most, dy4, xp.data());
  for (const PhaseConv& pc : convs) {
    Plan p(pc.t, false);
    p.Wp = shared.Wp;
    p.image = shared.image;
    const uint16_t* view =
        xp.data() +
        ((most.top - pc.pads.top) * shared.Wp + most.left - pc.pads.left) * shared.Cp;
    multiply_packed<uint16_t>(pc.t, p, view, bf16_bits(weight), pc.m, nullptr, pc.base, pc.o);
  }
  return grad_input;
}

// ---- grad_weight ------------------------------------------------------------------------------
//
//   dW[co, ci, kh, kw] = sum_(n, oh, ow) dY[n, co, oh, ow] * x[n, ci, ih, iw]   (one GEMM per tap)
//
// with the pixels as the reduction: C[ci][co] (per tap) = sum_k A[ci][k] B[k][co]. 32 consecutive
// output pixels of a row read 32 input columns of each channel, stride_w apart: in a padded copy
// of x, each padded row's channels one after another ([n][row][channel][column]), the columns
// split into stride_w phases (column c at phase c % stride_w, index c / stride_w), they are
// contiguous, and an A tile (16 channels x 32 pixels) loads in place (row stride: one channel's
// row). B is dY packed once as pairs of pixels (16 pairs x 16 output channels per tile), shared
// by all taps. Reduction blocks are 32 columns of a phase, from a cache line on (phases and rows
// are whole lines): a tap whose columns are shifted by s within its phase pairs block kb with
// output columns kb * 32 - s ..., so dY is packed in pairs from before column 0 on, in both
// parities where some tap's s is odd (an A tile starting mid-line reads 32 lines for its 16
// rows). A block's columns outside the output row read x (zeros or real columns) against zero
// rows of B, so every term there is 0 unless x holds an Inf or NaN: the packing checks x, and a
// non-finite value sends the call to the float32 kernels (whose placement of Inf and NaN is
// torch's). An Inf in dY meets only the x values (padding zeros included) an im2col GEMM would:
// the same placement as the float32 kernels (tested).
//
// Work items: (tap, 32 input channels, 32 output channels), each a 32 x 32 block of C summed
// over all images in order by one thread; images outer (an image's x and dY, ~1 MB at 64
// channels @56, stay in L2 while every item of the thread passes over them), C kept in a float32
// buffer between images. Results depend on the shapes only, never on the thread count.

namespace {

struct WeightPlan {
  int64_t Hp, Wph, Wr, Cp, Op, taps, x_image;
  // dY's packing: pairs of output columns, NP a row per block of 16 channels, P0 of them (all
  // zeros) before column 0; one copy per parity of the pairs' first column (parities: 2 where a
  // tap's shift is odd; see weight_items). On dot products (weight_items_dp), the pairs
  // (0, 1), (2, 3), ... only: P0 0, one parity, NP the row's pairs.
  int64_t P0, NP, dy_row, parities;
  WeightPlan(const Geometry& g, bool dot_products) {
    const int64_t s = g.stride_w, last_shift = (g.kernel_w - 1) * g.dilation_w / s;
    Hp = g.in_h + 2 * g.padding_h;
    // A phase's length: the padded row's columns, and what a row's blocks read (up to index
    // blocks(last_shift) * 32 - 1), in whole 64-byte lines.
    Wph = round_up(std::max<int64_t>((g.in_w + 2 * g.padding_w + s - 1) / s,
                                     blocks(g, last_shift) * 32),
                   32);
    Wr = s * Wph;  // a row: its stride_w phases one after another
    Cp = round_up(g.in_channels, 32);
    Op = round_up(g.out_channels, 32);
    taps = g.kernel_h * g.kernel_w;
    x_image = Cp * Hp * Wr;
    P0 = dot_products ? 0 : last_shift / 2;
    NP = dot_products ? (g.out_w + 1) / 2 : P0 + blocks(g, last_shift) * 16;
    dy_row = (Op / kCoBlock) * NP * 32;  // elements of one output row of packed dY
    parities = 1;
    for (int64_t kw = 0; kw < g.kernel_w; ++kw)
      if (!dot_products && kw * g.dilation_w / s % 2 == 1) parities = 2;
  }
  // Blocks of 32 phase columns a tap of this shift reads: its output columns sit at phase
  // columns shift .. shift + out_w - 1.
  static int64_t blocks(const Geometry& g, int64_t shift) { return (g.out_w + shift + 31) / 32; }
};

// A row of W values into the two column phases of stride 2 (phase0 = row, phase1 = row + Wph),
// starting at padded column pw: one permute splits 32 values into even and odd columns; the last
// (partial) 32 through masks. (Element by element, the 24 values past a 56-wide row's first 32
// made this split 19% of a stride-2 64 -> 128 @56 grad_weight, perf, one thread.)
PE_TARGET_AVX512 void split_columns_2(const uint16_t* src, int64_t W, int64_t pw, int64_t Wph,
                                      uint16_t* row) {
  alignas(64) static constexpr uint16_t kEvenOdd[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                        22, 24, 26, 28, 30, 1,  3,  5,  7,  9,  11,
                                                        13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i idx = _mm512_load_si512(kEvenOdd);
  uint16_t* phase[2] = {row, row + Wph};
  for (int64_t w = 0; w < W; w += 32) {
    const int64_t n = std::min<int64_t>(32, W - w);  // values; (n + 1) / 2 even, n / 2 odd
    const __m512i v = _mm512_permutexvar_epi16(
        idx, _mm512_maskz_loadu_epi16(static_cast<__mmask32>(n == 32 ? ~0u : (1u << n) - 1u),
                                      src + w));
    const int64_t col = pw + w;  // element w's padded column; w + 1's is col + 1
    _mm256_mask_storeu_epi16(phase[col % 2] + col / 2,
                             static_cast<__mmask16>((1u << ((n + 1) / 2)) - 1u),
                             _mm512_castsi512_si256(v));
    _mm256_mask_storeu_epi16(phase[(col + 1) % 2] + (col + 1) / 2,
                             static_cast<__mmask16>((1u << (n / 2)) - 1u),
                             _mm512_extracti64x4_epi64(v, 1));
  }
}

// xq[n][hp][ci][phase][index]: x (NCHW contiguous) zero-padded, channels to Cp, padded column c
// at phase c % stride_w, index c / stride_w; images [n0, n1). Returns false if a value is not
// finite. (A padded row's channels one after another: an A tile's 16 rows are 16 adjacent
// channel rows. With each channel a plane of its own, [n][ci][hp], they were 16 planes (6.7 KB)
// apart, and the A tile loads took ~70% of weight_items' time, perf.)
bool pack_x_planes(const Geometry& g, const WeightPlan& p, const uint16_t* x, int64_t n0,
                   int64_t n1, uint16_t* xq) {
  bool finite = true;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t c = 0; c < p.Cp; ++c) {
      for (int64_t hp = 0; hp < p.Hp; ++hp) {
        uint16_t* row = xq + n * p.x_image + (hp * p.Cp + c) * p.Wr;
        const int64_t h = c < g.in_channels ? hp - g.padding_h : -1;
        if (h < 0 || h >= g.in_h) {
          std::memset(row, 0, sizeof(uint16_t) * p.Wr);
          continue;
        }
        const uint16_t* src = x + ((n * g.in_channels + c) * g.in_h + h) * g.in_w;
        if (g.stride_w == 1) {
          std::memset(row, 0, sizeof(uint16_t) * g.padding_w);
          std::memcpy(row + g.padding_w, src, sizeof(uint16_t) * g.in_w);
          std::memset(row + g.padding_w + g.in_w, 0,
                      sizeof(uint16_t) * (p.Wr - g.padding_w - g.in_w));
        } else {
          std::memset(row, 0, sizeof(uint16_t) * p.Wr);
          if (g.stride_w == 2) {
            split_columns_2(src, g.in_w, g.padding_w, p.Wph, row);
          } else {
            for (int64_t w = 0; w < g.in_w; ++w) {
              const int64_t col = g.padding_w + w;
              row[(col % g.stride_w) * p.Wph + col / g.stride_w] = src[w];
            }
          }
        }
        finite = finite && !any_non_finite(src, g.in_w);
      }
    }
  return finite;
}

// pack_x_planes from x channels-last ([n][h][w][c] contiguous; c even, stride_w 1 or 2), in one
// pass instead of a contiguous copy first (torch's channels_last -> NCHW copy of x and dY took
// a third of this grad_weight, 64 -> 128 @56 stride 2, perf, one thread): per input row, 32
// columns x 32 channels at a time, channel pairs as 32-bit words transposed (16 columns x 16
// pairs, twice) into [pair][column]; a two-source permute per channel then takes its halves of
// the pair's words, in column order (stride 2: even columns, then odd). The same xq.
PE_TARGET_AVX512 bool pack_x_planes_cl(const Geometry& g, const WeightPlan& p, const uint16_t* x,
                                       int64_t n0, int64_t n1, uint16_t* xq) {
  const int64_t C = g.in_channels, W = g.in_w, pairs_all = C / 2, pw = g.padding_w;
  const bool split = g.stride_w == 2;
  // Column c's pair is 16-bit element 2c of the two transposed rows (columns 0-15, then 16-31)
  // taken as one 64-element table; + 1 for the pair's second channel.
  alignas(64) uint16_t order[2][32];
  for (int e = 0; e < 2; ++e)
    for (int i = 0; i < 32; ++i) {
      const int c = !split ? i : i < 16 ? 2 * i : 2 * (i - 16) + 1;
      order[e][i] = static_cast<uint16_t>(2 * c + e);
    }
  const __m512i first = _mm512_load_si512(order[0]), second = _mm512_load_si512(order[1]);
  alignas(64) uint32_t lo[16 * 16] = {}, hi[16 * 16] = {};  // [pair][column] words
  bool finite = true;
  for (int64_t n = n0; n < n1; ++n) {
    uint16_t* image = xq + n * p.x_image;
    for (int64_t hp = 0; hp < p.Hp; ++hp) {
      std::memset(image + hp * p.Cp * p.Wr, 0, sizeof(uint16_t) * p.Cp * p.Wr);
      const int64_t h = hp - g.padding_h;
      if (h < 0 || h >= g.in_h) continue;
      const uint16_t* src = x + (n * g.in_h + h) * W * C;
      finite = finite && !any_non_finite(src, W * C);
      for (int64_t w0 = 0; w0 < W; w0 += 32) {
        const int64_t nw = std::min<int64_t>(32, W - w0);
        const __mmask32 cols = static_cast<__mmask32>(nw == 32 ? ~0u : (1u << nw) - 1u);
        for (int64_t q0 = 0; q0 < pairs_all; q0 += 16) {
          const int64_t pairs = std::min<int64_t>(16, pairs_all - q0);
          const float* words = reinterpret_cast<const float*>(src + w0 * C) + q0;
          transpose16(words, pairs_all, std::min<int64_t>(16, nw), pairs,
                      reinterpret_cast<float*>(lo), 16, nullptr);
          if (nw > 16)
            transpose16(words + 16 * pairs_all, pairs_all, nw - 16, pairs,
                        reinterpret_cast<float*>(hi), 16, nullptr);
          for (int64_t q = 0; q < pairs; ++q) {
            const __m512i a = _mm512_load_si512(lo + q * 16), b = _mm512_load_si512(hi + q * 16);
            const __m512i v[2] = {_mm512_permutex2var_epi16(a, first, b),
                                  _mm512_permutex2var_epi16(a, second, b)};
            for (int e = 0; e < 2; ++e) {
              uint16_t* row = image + (hp * p.Cp + 2 * (q0 + q) + e) * p.Wr;
              if (!split) {
                _mm512_mask_storeu_epi16(row + pw + w0, cols, v[e]);
                continue;
              }
              const int64_t col = pw + w0;  // column w0's padded column (w0 even)
              _mm256_mask_storeu_epi16(row + (col % 2) * p.Wph + col / 2,
                                       static_cast<__mmask16>((1u << ((nw + 1) / 2)) - 1u),
                                       _mm512_castsi512_si256(v[e]));
              _mm256_mask_storeu_epi16(row + ((col + 1) % 2) * p.Wph + (col + 1) / 2,
                                       static_cast<__mmask16>((1u << (nw / 2)) - 1u),
                                       _mm512_extracti64x4_epi64(v[e], 1));
            }
          }
        }
      }
    }
  }
  return finite;
}

// grad_bias's sums ride on dY's packing, which reads every value of dY anyway (a pass of their
// own, 2.7% of a 64 -> 64 @56 channels_last bf16 forward+backward, perf, read dY again from L3
// or memory): per output row and block of 16 channels, the packed pair vectors of parity 0 in
// order, each one's first column, then its second (zeros outside the row add nothing: a sum
// from +0 is never -0), into row_sums[row][co] (float32; bias_from_rows sums the rows in
// order). Both layouts' packings make the same vectors: the same sums, the same bits.
PE_TARGET_AVX512 PE_INLINE __m512 add_pair_columns(__m512 acc, __m512i pair) {
  acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)));
  return _mm512_add_ps(
      acc, _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(int32_t(0xffff0000u)))));
}

// dyq[parity][n][oh][co block][pair][co][2] from dY in NCHW ([n][co][oh][ow] contiguous): pair
// i of parity e holds output columns (2 (i - P0) - e, + 1) of the block's 16 channels, zero
// outside the row and past the channels; rows [r0, r1) of n * out_h. A pair of columns is one
// 32-bit word of dY's row: 16 channels' rows of 16 words (the pairs of a tile), transposed into
// the tile's [pair][channel] order. row_sums (null: no bias): see add_pair_columns.
PE_TARGET_AVX512 void pack_dy_pairs(const Geometry& g, const WeightPlan& p, const uint16_t* dy,
                                    int64_t r0, int64_t r1, uint16_t* dyq, float* row_sums) {
  const int64_t O = g.out_channels, OH = g.out_h, OW = g.out_w;
  const int64_t per_parity = g.batch * OH * p.dy_row;
  alignas(64) uint32_t words[16 * 16];
  for (int64_t r = r0; r < r1; ++r)  // (the second parity's loads find the row in L1)
    for (int64_t e = 0; e < p.parities; ++e) {
      const int64_t n = r / OH, oh = r % OH;
      uint16_t* dst = dyq + e * per_parity + r * p.dy_row;
      for (int64_t j = 0; j < p.Op / kCoBlock; ++j) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i0 = 0; i0 < p.NP; i0 += 16) {
          const int64_t pairs = std::min<int64_t>(16, p.NP - i0);
          const int64_t ow0 = 2 * (i0 - p.P0) - e;  // the first pair's first column
          // the columns ow0 + l (l < 2 * pairs) inside the row
          const int64_t lo = std::clamp<int64_t>(-ow0, 0, 2 * pairs);
          const int64_t hi = std::clamp<int64_t>(OW - ow0, lo, 2 * pairs);
          const __mmask32 pm = static_cast<__mmask32>(
              ((hi == 32 ? ~0u : (1u << hi) - 1u) >> lo) << lo);
          for (int64_t c = 0; c < kCoBlock; ++c) {
            const int64_t co = j * kCoBlock + c;
            _mm512_store_si512(
                words + c * 16,
                co < O && pm ? _mm512_maskz_loadu_epi16(
                                   pm, dy + ((n * O + co) * OH + oh) * OW + ow0)
                             : _mm512_setzero_si512());
          }
          uint16_t* packed = dst + (j * p.NP + i0) * 32;
          transpose16(reinterpret_cast<const float*>(words), 16, 16, pairs,
                      reinterpret_cast<float*>(packed), 16, nullptr);
          if (row_sums && e == 0)
            for (int64_t q = 0; q < pairs; ++q)
              sum = add_pair_columns(sum, _mm512_loadu_si512(packed + q * 32));
        }
        if (row_sums && e == 0) _mm512_storeu_ps(row_sums + r * p.Op + j * kCoBlock, sum);
      }
    }
}

// pack_dy_pairs from dY channels-last ([n][oh][ow][co] contiguous): a pair of columns' 16
// channels are two 32-byte runs, interleaved into the tile's [co][2] words by one permute.
PE_TARGET_AVX512 void pack_dy_pairs_cl(const Geometry& g, const WeightPlan& p,
                                       const uint16_t* dy, int64_t r0, int64_t r1,
                                       uint16_t* dyq, float* row_sums) {
  const int64_t O = g.out_channels, OW = g.out_w;
  const int64_t per_parity = g.batch * g.out_h * p.dy_row;
  // element 2c: the first column's channel c; 2c + 1: the second column's
  alignas(64) uint16_t interleave[32];
  for (int i = 0; i < 32; ++i) interleave[i] = static_cast<uint16_t>(i % 2 * 16 + i / 2);
  const __m512i idx = _mm512_load_si512(interleave);
  for (int64_t r = r0; r < r1; ++r)  // (the second parity's loads find the row in L1)
    for (int64_t e = 0; e < p.parities; ++e) {
      const uint16_t* src = dy + r * OW * O;  // output row r of n * out_h
      uint16_t* dst = dyq + e * per_parity + r * p.dy_row;
      for (int64_t j = 0; j < p.Op / kCoBlock; ++j) {
        const int64_t co0 = j * kCoBlock, nco = std::clamp<int64_t>(O - co0, 0, kCoBlock);
        const __mmask16 m = static_cast<__mmask16>((1u << nco) - 1u);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < p.NP; ++i) {
          const int64_t ow = 2 * (i - p.P0) - e;
          const __m256i a = ow >= 0 && ow < OW ? _mm256_maskz_loadu_epi16(m, src + ow * O + co0)
                                               : _mm256_setzero_si256();
          const __m256i b = ow + 1 >= 0 && ow + 1 < OW
                                ? _mm256_maskz_loadu_epi16(m, src + (ow + 1) * O + co0)
                                : _mm256_setzero_si256();
          const __m512i pair =
              _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
          _mm512_storeu_si512(dst + (j * p.NP + i) * 32, pair);
          if (row_sums && e == 0) sum = add_pair_columns(sum, pair);
        }
        if (row_sums && e == 0) _mm512_storeu_ps(row_sums + r * p.Op + co0, sum);
      }
    }
}

// Items [i0, i1) over all images, on this thread; cacc: their 32 x 32 float32 blocks.
PE_TARGET_AMX_BF16 void weight_items(const Geometry& g, const WeightPlan& p, const uint16_t* xq,
                                     const uint16_t* dyq, int64_t i0, int64_t i1, float* cacc) {
  amx::configure();
  const int64_t ci_pairs = p.Cp / 32, co_pairs = p.Op / 32;
  const int64_t a_stride = p.Wr * 2;  // bytes between channels
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t t = it / (ci_pairs * co_pairs);
      const int64_t cib = (it / co_pairs) % ci_pairs, cob = it % co_pairs;
      const int64_t kh = t / g.kernel_w, kw = t % g.kernel_w;
      float* c = cacc + (it - i0) * 32 * 32;
      if (n == 0) {
        amx::zero_c();
      } else {
        amx::load_c(c);
      }
      // The tap reads output column ow at phase column ow + shift: block kb's A tile, phase
      // columns kb * 32 ..., starts on a cache line, and its B tile holds the output columns
      // kb * 32 - shift ... (shift's parity: the pairs' parity; pairs before column 0 and past
      // the row are zeros).
      const int64_t col = kw * g.dilation_w, shift = col / g.stride_w;
      const uint16_t* a_base = xq + n * p.x_image + cib * 32 * p.Wr + (col % g.stride_w) * p.Wph;
      const uint16_t* b_base = dyq + (shift % 2) * g.batch * g.out_h * p.dy_row +
                               n * g.out_h * p.dy_row + (cob * 2 * p.NP + p.P0 - shift / 2) * 32;
      const int64_t kbs = WeightPlan::blocks(g, shift);
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const uint16_t* a_row = a_base + (oh * g.stride_h + kh * g.dilation_h) * p.Cp * p.Wr;
        const uint16_t* b_row = b_base + oh * p.dy_row;
        for (int64_t kb = 0; kb < kbs; ++kb) {
          const uint16_t* a0 = a_row + kb * 32;
          const uint16_t* b0 = b_row + kb * 16 * 32;
          amx::step(a0, a0 + 16 * p.Wr, a_stride, b0, b0 + p.NP * 32, 64);
        }
      }
      amx::store_c(c);
    }
  _tile_release();
}

// weight_items on dot products (see multiply_dp): an item's 32 x 32 block of C (32 input
// channels: A's rows, 2 blocks of 16 output channels) in chunks of 8 channels, each summed over
// the image's output rows and blocks in weight_items' order, C kept in cacc between images.
// A's pair words are broadcast from any 4 bytes, so a tap shifted by s reads its row from phase
// column s on, against dY's pairs (0, 1), (2, 3), ... of one parity (the plan's dot_products
// layout): no second parity of dY, no pairs before column 0 or past the row's last, which the
// tiles' aligned A loads need (for a 3x3 at stride 1 or 2, half of the packed dY's bytes: its
// packing was 13% of a 64 -> 64 @56 channels_last grad_weight, perf, two threads). An odd row's
// last pair reads one x value past the row (a padding zero, the next phase's or row's value, or
// xq's zeroed tail: finite, packing checks x) against a zero of dY.
PE_TARGET_AVX512_BF16 void weight_items_dp(const Geometry& g, const WeightPlan& p,
                                           const uint16_t* xq, const uint16_t* dyq, int64_t i0,
                                           int64_t i1, float* cacc) {
  const int64_t ci_pairs = p.Cp / 32, co_pairs = p.Op / 32;
  for (int64_t n = 0; n < g.batch; ++n)
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t t = it / (ci_pairs * co_pairs);
      const int64_t cib = (it / co_pairs) % ci_pairs, cob = it % co_pairs;
      const int64_t kh = t / g.kernel_w, kw = t % g.kernel_w;
      const int64_t col = kw * g.dilation_w, shift = col / g.stride_w;
      const uint16_t* a_base =
          xq + n * p.x_image + cib * 32 * p.Wr + (col % g.stride_w) * p.Wph + shift;
      const uint16_t* b_base = dyq + n * g.out_h * p.dy_row + cob * 2 * p.NP * 32;
      const int64_t kbs = (p.NP + 15) / 16;
      for (int64_t r0 = 0; r0 < 32; r0 += kDpRows) {
        float* c = cacc + (it - i0) * 32 * 32 + r0 * 32;
        __m512 acc[kDpRows][2];
        for (int r = 0; r < kDpRows; ++r) {
          acc[r][0] = n == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * 32);
          acc[r][1] = n == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * 32 + 16);
        }
        for (int64_t oh = 0; oh < g.out_h; ++oh) {
          const uint16_t* a_row =
              a_base + (oh * g.stride_h + kh * g.dilation_h) * p.Cp * p.Wr + r0 * p.Wr;
          const uint16_t* b_row = b_base + oh * p.dy_row;
          for (int64_t kb = 0; kb < kbs; ++kb) {
            const uint16_t* b0 = b_row + kb * 16 * 32;
            const uint16_t* const b[2] = {b0, b0 + p.NP * 32};
            const int64_t pairs = std::min<int64_t>(16, p.NP - kb * 16);
            dp_step<kDpRows, 2>(acc, a_row + kb * 32, p.Wr, b, static_cast<int>(pairs));
          }
        }
        for (int r = 0; r < kDpRows; ++r) {
          _mm512_storeu_ps(c + r * 32, acc[r][0]);
          _mm512_storeu_ps(c + r * 32 + 16, acc[r][1]);
        }
      }
    }
}

// grad_bias[co] in strip mode = sum over (n, oh, ow) of dY (NCHW) in 16 float32 lanes, pixel i
// of each image's plane into lane i % 16, images and pixels in order, then the lanes summed in a
// fixed tree (lane l + lane l + 8, then + 4, + 2, + 1); output channels [c0, c1). (The blocks'
// grad_weight sums as it packs dY: add_pair_columns, bias_from_rows.)
template <typename V>
PE_INLINE V lane_tree_sum(V* lanes) {
  for (int half = 8; half >= 1; half /= 2)
    for (int l = 0; l < half; ++l) lanes[l] = lanes[l] + lanes[l + half];
  return lanes[0];
}
PE_TARGET_AVX512 PE_INLINE __m512 widen_bf16(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
PE_TARGET_AVX512 void bias_sums(const Geometry& g, const uint16_t* dy, int64_t c0, int64_t c1,
                                float* db) {
  const int64_t O = g.out_channels, plane = g.out_h * g.out_w;
  for (int64_t co = c0; co < c1; ++co) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t n = 0; n < g.batch; ++n) {
      const uint16_t* src = dy + (n * O + co) * plane;
      for (int64_t i = 0; i < plane; i += 16) {
        const int64_t k = std::min<int64_t>(16, plane - i);
        const __mmask16 m = static_cast<__mmask16>(k == 16 ? 0xffffu : (1u << k) - 1u);
        acc = _mm512_add_ps(acc, widen_bf16(_mm256_maskz_loadu_epi16(m, src + i)));
      }
    }
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc);
    db[co] = lane_tree_sum(lanes);
  }
}
// grad_bias in bfloat16 from db (float32, out_channels values).
at::Tensor bias_of(const Geometry& g, const float* db, const at::TensorOptions& options) {
  at::Tensor grad_bias = empty_of(at::IntArrayRef{g.out_channels}, options);
  at::BFloat16* b = grad_bias.mutable_data_ptr<at::BFloat16>();
  for (int64_t co = 0; co < g.out_channels; ++co) b[co] = at::BFloat16(db[co]);
  return grad_bias;
}

// grad_bias in bfloat16 from dY (NCHW contiguous), by bias_sums (strip mode).
at::Tensor bias_grad(const Geometry& g, const uint16_t* dy, const at::TensorOptions& options) {
  CachedBuffer<float> db(static_cast<size_t>(g.out_channels), false);
  at::parallel_for(0, g.out_channels, 1, [&](int64_t c0, int64_t c1) {
    bias_sums(g, dy, c0, c1, db.data());
  });
  return bias_of(g, db.data(), options);
}

// grad_bias in bfloat16 from the packing's row_sums ([rows][co], `ld` apart; see
// add_pair_columns): the rows summed in order, float32, blocks of 16 channels in parallel.
PE_TARGET_AVX512 void sum_rows(const float* row_sums, int64_t rows, int64_t ld, int64_t b0,
                               int64_t b1, float* db) {
  for (int64_t b = b0; b < b1; ++b) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r)
      sum = _mm512_add_ps(sum, _mm512_loadu_ps(row_sums + r * ld + b * 16));
    _mm512_storeu_ps(db + b * 16, sum);
  }
}
at::Tensor bias_from_rows(const Geometry& g, const float* row_sums, int64_t ld,
                          const at::TensorOptions& options) {
  CachedBuffer<float> db(static_cast<size_t>(ld), false);
  at::parallel_for(0, ld / 16, 1, [&](int64_t b0, int64_t b1) {
    sum_rows(row_sums, g.batch * g.out_h, ld, b0, b1, db.data());
  });
  return bias_of(g, db.data(), options);
}

}  // namespace

namespace {

// ---- grad_weight in strip mode ------------------------------------------------------------------
//
// Narrow layers (fewer than 16 input channels, where the blocks above would multiply mostly
// padding channels) in strip mode: per kernel row kh, with S(k) the strip of pixel k (the
// kernel_w x C values from its first tap on, as in the forward),
//
//   D_kh[co][v] = sum_k dY[co][k] * S(k)[v],   dW[co][ci][kh][kw] = D_kh[co][kw * C + ci]
//
// with the reduction over pairs of images: the image pair (n, n + 1) interleaved value by value
// (x as xq[pair][padded row][padded column][C][2], dY as dyq[pair][co][oh][16 * segments][2]),
// so a tile's pair of reduction values is the two images' values at one pixel. Then an A tile
// (16 output channels x 16 pixels of an output row, both images) and a B tile (the same 16
// pixels' strips, 16 strip values, both images) load in place at constant strides, no packing
// per step. Pixels past the output row are zeros in dyq (their B rows: real, finite x values);
// an odd batch's last pair has a zero image. An Inf or NaN in x would meet those zeros: such a
// call returns undefined tensors (the caller takes the float32 kernels).
//
// Work items: (16 output channels, kernel row, up to 6 blocks of 16 strip values), each up to
// 6 C tiles held in tile registers over every image pair and output row in order by one thread
// (with one A and one B tile: the 8 registers): results depend on the shapes only.
//
// Napkin math, LeNet's 6 -> 16 5x5 at 14 x 14, batch 256: 128 pairs x 10 rows x 5 kernel rows x
// 2 value blocks = 12800 tile multiplies of 16 cycles, ~0.1 ms of one core; the packing moves
// ~1.4 MB.

struct StripWeightPlan {
  int64_t Hp, Wp, C, CB, VB, cob, per_row, OWp, pairs, x_pair, x_size, dy_pair;
  explicit StripWeightPlan(const Geometry& g) {
    const Plan f(g, true);  // the forward's strip geometry: rows, columns, steps
    Hp = f.Hp;
    Wp = f.Wp;
    C = g.in_channels;
    CB = f.CB;
    VB = 2 * CB;  // blocks of 16 strip values
    cob = (g.out_channels + kCoBlock - 1) / kCoBlock;
    per_row = f.per_row;
    OWp = per_row * kSeg;
    pairs = (g.batch + 1) / 2;
    x_pair = Hp * Wp * C * 2;
    // A B tile's rows run up to 15 pixels past the output row, its values up to the strip's
    // last block: a zero tail past the last pair.
    x_size = pairs * x_pair + (kSeg * g.stride_w * C + VB * 16) * 2;
    dy_pair = cob * kCoBlock * g.out_h * OWp * 2;
  }
};

// xq for image pairs [p0, p1) from x (NCHW contiguous): per padded row, each channel's 16
// columns of the two images merged into words, transposed to [column][channel]. Returns false
// if a value is not finite.
PE_TARGET_AVX512 bool pack_x_pairs(const Geometry& g, const StripWeightPlan& p,
                                   const uint16_t* x, int64_t p0, int64_t p1, uint16_t* xq) {
  const int64_t C = p.C, H = g.in_h, W = g.in_w, image = C * H * W;
  const int64_t w0 = std::clamp<int64_t>(g.padding_w, 0, p.Wp);
  const int64_t w1 = std::clamp<int64_t>(g.padding_w + W, w0, p.Wp);
  alignas(64) uint32_t words[16 * 16];
  bool finite = true;
  for (int64_t q = p0; q < p1; ++q) {
    const int64_t n = 2 * q;
    const bool second = n + 1 < g.batch;
    for (int64_t hp = 0; hp < p.Hp; ++hp) {
      uint16_t* row = xq + q * p.x_pair + hp * p.Wp * C * 2;
      const int64_t h = hp - g.padding_h;
      if (h < 0 || h >= H || w0 == w1) {
        std::memset(row, 0, sizeof(uint16_t) * p.Wp * C * 2);
        continue;
      }
      std::memset(row, 0, sizeof(uint16_t) * w0 * C * 2);
      std::memset(row + w1 * C * 2, 0, sizeof(uint16_t) * (p.Wp - w1) * C * 2);
      const uint16_t* lo = x + n * image + h * W + (w0 - g.padding_w);
      for (int64_t c0 = 0; c0 < w1 - w0; c0 += 16) {
        const int64_t nw = std::min<int64_t>(16, w1 - w0 - c0);
        const __mmask16 m = static_cast<__mmask16>(nw == 16 ? 0xffffu : (1u << nw) - 1u);
        for (int64_t c = 0; c < C; ++c) {
          const uint16_t* a = lo + c * H * W + c0;
          finite = finite && !any_non_finite(a, nw) && !(second && any_non_finite(a + image, nw));
          _mm512_store_si512(words + c * 16, merge_rows(a, second ? a + image : nullptr, m));
        }
        transpose16(reinterpret_cast<const float*>(words), 16, C, nw,
                    reinterpret_cast<float*>(row + (w0 + c0) * C * 2), C, nullptr);
      }
    }
  }
  return finite;
}

// dyq for image pairs [p0, p1) from dY (NCHW contiguous): each output row's pixels of the two
// images merged into words, zeros past the row and past the output channels.
PE_TARGET_AVX512 void pack_dy_image_pairs(const Geometry& g, const StripWeightPlan& p,
                                          const uint16_t* dy, int64_t p0, int64_t p1,
                                          uint16_t* dyq) {
  const int64_t O = g.out_channels, OH = g.out_h, OW = g.out_w, image = O * OH * OW;
  for (int64_t q = p0; q < p1; ++q) {
    const int64_t n = 2 * q;
    const bool second = n + 1 < g.batch;
    uint16_t* dst = dyq + q * p.dy_pair;
    for (int64_t co = 0; co < p.cob * kCoBlock; ++co)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t s = 0; s < p.per_row; ++s) {
          uint16_t* out = dst + ((co * OH + oh) * p.OWp + s * kSeg) * 2;
          const int64_t nw = std::min<int64_t>(kSeg, OW - s * kSeg);
          if (co >= O) {
            _mm512_storeu_si512(out, _mm512_setzero_si512());
            continue;
          }
          const __mmask16 m = static_cast<__mmask16>(nw == 16 ? 0xffffu : (1u << nw) - 1u);
          const uint16_t* a = dy + n * image + (co * OH + oh) * OW + s * kSeg;
          _mm512_storeu_si512(out, merge_rows(a, second ? a + image : nullptr, m));
        }
  }
}

// Items [i0, i1) (see above), each over every image pair; c: their C tiles, item-major, each
// [co][16 values] float32.
PE_TARGET_AMX_BF16 void strip_weight_items(const Geometry& g, const StripWeightPlan& p,
                                           const uint16_t* xq, const uint16_t* dyq,
                                           int64_t chunks, int64_t i0, int64_t i1, float* c) {
  amx::configure();
  const int64_t a_stride = g.out_h * p.OWp * 2 * 2;     // bytes between output channels
  const int64_t b_stride = g.stride_w * p.C * 2 * 2;    // bytes between pixels
  for (int64_t it = i0; it < i1; ++it) {
    const int64_t cob = it / (g.kernel_h * chunks);
    const int64_t kh = (it / chunks) % g.kernel_h, vb0 = (it % chunks) * 6;
    const int64_t nv = std::min<int64_t>(6, p.VB - vb0);
    _tile_zero(0);  // (the ones past nv stay zero)
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
    for (int64_t q = 0; q < p.pairs; ++q) {
      const uint16_t* a_pair = dyq + q * p.dy_pair + cob * kCoBlock * g.out_h * p.OWp * 2;
      const uint16_t* b_pair = xq + q * p.x_pair + vb0 * 32;
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        const uint16_t* b_row =
            b_pair + (oh * g.stride_h + kh * g.dilation_h) * p.Wp * p.C * 2;
        for (int64_t s = 0; s < p.per_row; ++s) {
          _tile_loadd(6, a_pair + (oh * p.OWp + s * kSeg) * 2, a_stride);
          const uint16_t* b = b_row + s * kSeg * g.stride_w * p.C * 2;
          // Tile numbers are immediates: one branch per C tile.
#define PE_STRIP_STEP(T)                      \
  if (T < nv) {                               \
    _tile_loadd(7, b + (T) * 32, b_stride);   \
    _tile_dpbf16ps(T, 6, 7);                  \
  }
          PE_STRIP_STEP(0) PE_STRIP_STEP(1) PE_STRIP_STEP(2)
          PE_STRIP_STEP(3) PE_STRIP_STEP(4) PE_STRIP_STEP(5)
#undef PE_STRIP_STEP
        }
      }
    }
    float* out = c + (it - i0) * 6 * 256;
    _tile_stored(0, out, 64);
    _tile_stored(1, out + 256, 64);
    _tile_stored(2, out + 512, 64);
    _tile_stored(3, out + 768, 64);
    _tile_stored(4, out + 1024, 64);
    _tile_stored(5, out + 1280, 64);
  }
  _tile_release();
}

// grad_weight in bfloat16 (undefined if x holds an Inf or NaN).
at::Tensor backward_weight_strips(const Geometry& g, const uint16_t* x, const uint16_t* dy,
                                  const at::TensorOptions& options) {
  const StripWeightPlan p(g);
  CachedBuffer<uint16_t> xq(static_cast<size_t>(p.x_size), false);
  std::memset(xq.data() + p.pairs * p.x_pair, 0,
              sizeof(uint16_t) * (p.x_size - p.pairs * p.x_pair));
  std::atomic<bool> finite{true};
  at::parallel_for(0, p.pairs, 1, [&](int64_t p0, int64_t p1) {
    if (!pack_x_pairs(g, p, x, p0, p1, xq.data())) finite = false;
  });
  if (!finite) return {};
  CachedBuffer<uint16_t> dyq(static_cast<size_t>(p.pairs * p.dy_pair), false);
  at::parallel_for(0, p.pairs, 1, [&](int64_t p0, int64_t p1) {
    pack_dy_image_pairs(g, p, dy, p0, p1, dyq.data());
  });
  const int64_t chunks = (p.VB + 5) / 6;
  const int64_t items = p.cob * g.kernel_h * chunks;
  CachedBuffer<float> c(static_cast<size_t>(items * 6 * 256), false);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    strip_weight_items(g, p, xq.data(), dyq.data(), chunks, i0, i1, c.data() + i0 * 6 * 256);
  });
  at::Tensor grad_weight = empty_of(
      at::IntArrayRef{g.out_channels, g.in_channels, g.kernel_h, g.kernel_w}, options);
  at::BFloat16* dw = grad_weight.mutable_data_ptr<at::BFloat16>();
  const int64_t strip = g.kernel_w * p.C;
  for (int64_t it = 0; it < items; ++it) {
    const int64_t cob = it / (g.kernel_h * chunks);
    const int64_t kh = (it / chunks) % g.kernel_h, vb0 = (it % chunks) * 6;
    for (int64_t t = 0; t < 6 && vb0 + t < p.VB; ++t)
      for (int64_t r = 0; r < kCoBlock; ++r) {
        const int64_t co = cob * kCoBlock + r;
        if (co >= g.out_channels) break;
        for (int64_t j = 0; j < 16; ++j) {
          const int64_t v = (vb0 + t) * 16 + j;
          if (v >= strip) break;
          const int64_t kw = v / p.C, ci = v % p.C;
          dw[((co * p.C + ci) * g.kernel_h + kh) * g.kernel_w + kw] =
              at::BFloat16(c[((it * 6 + t) * kCoBlock + r) * 16 + j]);
        }
      }
  }
  return grad_weight;
}

// grad_weight[co][ci][t] (bfloat16, OIHW contiguous) from cacc's items (t, ci block, co block),
// each [ci % 32][co % 32] float32, for the co blocks [b0, b1): per (co block, ci block), each
// output channel's run of (ci, t) values is contiguous in dW; its values are gathered 16 at a
// time from the taps' items (3x3: 9 x 4 KB, in L1 across the block's 32 channels) into a run
// of float32, which narrow_range rounds into dW. (Element by element with dW's taps outermost,
// each store landed 1152 bytes from the last: 12% of a 64 -> 128 stride-2 @56 grad_weight,
// perf, two threads.)
PE_TARGET_AVX512 void store_weight(const Geometry& g, const WeightPlan& p, const float* cacc,
                                   int64_t b0, int64_t b1, uint16_t* dw) {
  const int64_t ci_pairs = p.Cp / 32, co_pairs = p.Op / 32, C = g.in_channels;
  const int64_t item_step = ci_pairs * co_pairs * 32 * 32;  // floats between a block's taps
  // Value j = (ci % 32, t) of a run: its float's offset from the run's tap 0, row 0 (64-bit:
  // the offsets reach taps * item_step).
  const int64_t most = round_up(32 * p.taps, 16);
  std::vector<int64_t> offsets(static_cast<size_t>(most), 0);
  for (int64_t j = 0; j < 32 * p.taps; ++j)
    offsets[j] = (j % p.taps) * item_step + (j / p.taps) * 32;
  LineVector<float> values(static_cast<size_t>(most));
  for (int64_t cob = b0; cob < b1; ++cob)
    for (int64_t cib = 0; cib < ci_pairs; ++cib) {
      const int64_t ci0 = cib * 32, run = std::min<int64_t>(32, C - ci0) * p.taps;
      for (int64_t k = 0; k < 32; ++k) {
        const int64_t co = cob * 32 + k;
        if (co >= g.out_channels) break;
        const float* base = cacc + (cib * co_pairs + cob) * 32 * 32 + k;
        for (int64_t j = 0; j < run; j += 16) {
          const int64_t n = std::min<int64_t>(16, run - j);
          const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
          const __m256 lo = _mm512_mask_i64gather_ps(
              _mm256_setzero_ps(), static_cast<__mmask8>(m),
              _mm512_loadu_si512(offsets.data() + j), base, 4);
          const __m256 hi = _mm512_mask_i64gather_ps(
              _mm256_setzero_ps(), static_cast<__mmask8>(m >> 8),
              _mm512_loadu_si512(offsets.data() + j + 8), base, 4);
          _mm512_store_ps(values.data() + j,
                          _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1));
        }
        narrow_range(values.data(), reinterpret_cast<c10::BFloat16*>(dw + (co * C + ci0) * p.taps),
                     run);
      }
    }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> backward_weight_bf16(const Geometry& g,
                                                       const at::Tensor& grad_output,
                                                       const at::Tensor& input, bool bias) {
  if (g.in_channels < 16) {  // strip mode (bf16_backward_weight_fits)
    const at::Tensor x4 = (g.batched ? input : input.unsqueeze(0)).contiguous();
    const at::Tensor dy4 = (g.batched ? grad_output : grad_output.unsqueeze(0)).contiguous();
    const uint16_t* dy = reinterpret_cast<const uint16_t*>(dy4.const_data_ptr<at::BFloat16>());
    const at::Tensor grad_weight = backward_weight_strips(
        g, reinterpret_cast<const uint16_t*>(x4.const_data_ptr<at::BFloat16>()), dy,
        input.options());
    if (!grad_weight.defined()) return {};
    return {grad_weight, bias ? bias_grad(g, dy, input.options()) : at::Tensor()};
  }
  const WeightPlan p(g, unit() == Unit::DotProducts);
  // Channels-last x and dY are packed as they are (x: an even channel count and stride_w 1 or
  // 2, pack_x_planes_cl's); other layouts through contiguous copies.
  auto channels_last = [](const at::Tensor& t) {
    return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
  };
  at::Tensor x4 = g.batched ? input : input.unsqueeze(0);
  at::Tensor dy4 = g.batched ? grad_output : grad_output.unsqueeze(0);
  const bool x_cl = channels_last(x4) && g.in_channels % 2 == 0 && g.stride_w <= 2;
  const bool dy_cl = channels_last(dy4);
  if (!x_cl) x4 = x4.contiguous();
  if (!dy_cl) dy4 = dy4.contiguous();
  const uint16_t* x = reinterpret_cast<const uint16_t*>(x4.const_data_ptr<at::BFloat16>());
  const uint16_t* dy = reinterpret_cast<const uint16_t*>(dy4.const_data_ptr<at::BFloat16>());

  // xq plus a tail: the last channel block's rows run up to 31 columns past the last row.
  CachedBuffer<uint16_t> xq(static_cast<size_t>(g.batch * p.x_image + 64), false);
  std::memset(xq.data() + g.batch * p.x_image, 0, sizeof(uint16_t) * 64);
  std::atomic<bool> finite{true};
  at::parallel_for(0, g.batch, 1, [&](int64_t n0, int64_t n1) {
    if (!(x_cl ? pack_x_planes_cl : pack_x_planes)(g, p, x, n0, n1, xq.data())) finite = false;
  });
  CachedBuffer<uint16_t> dyq(static_cast<size_t>(p.parities * g.batch * g.out_h * p.dy_row),
                            false);
  CachedBuffer<float> row_sums(static_cast<size_t>(bias ? g.batch * g.out_h * p.Op : 0), false);
  at::parallel_for(0, g.batch * g.out_h, 8, [&](int64_t r0, int64_t r1) {
    (dy_cl ? pack_dy_pairs_cl : pack_dy_pairs)(g, p, dy, r0, r1, dyq.data(),
                                               bias ? row_sums.data() : nullptr);
  });
  if (!finite) return {};

  const int64_t ci_pairs = p.Cp / 32, co_pairs = p.Op / 32;
  const int64_t items = p.taps * ci_pairs * co_pairs;
  CachedBuffer<float> cacc(static_cast<size_t>(items * 32 * 32), false);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    if (unit() == Unit::DotProducts)
      weight_items_dp(g, p, xq.data(), dyq.data(), i0, i1, cacc.data() + i0 * 32 * 32);
    else
      weight_items(g, p, xq.data(), dyq.data(), i0, i1, cacc.data() + i0 * 32 * 32);
  });

  at::Tensor grad_weight =
      empty_of(at::IntArrayRef{g.out_channels, g.in_channels, g.kernel_h, g.kernel_w},
               input.options());
  uint16_t* dw = reinterpret_cast<uint16_t*>(grad_weight.mutable_data_ptr<at::BFloat16>());
  at::parallel_for(0, co_pairs, 1, [&](int64_t b0, int64_t b1) {
    store_weight(g, p, cacc.data(), b0, b1, dw);
  });
  return {grad_weight,
          bias ? bias_from_rows(g, row_sums.data(), p.Op, input.options()) : at::Tensor()};
}

#pragma GCC diagnostic pop

#else  // !PE_HAVE_AMX_BF16

bool all_finite_bf16(const at::Tensor& t) {
  const at::Tensor c = dense(t);
  return !any_non_finite_portable(
      reinterpret_cast<const uint16_t*>(c.const_data_ptr<at::BFloat16>()), c.numel());
}

at::Tensor forward_bf16(const Geometry&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       bool, bool) {
  TORCH_CHECK(false, "pyengine: conv2d's bfloat16 kernels are not compiled in this build");
}
at::Tensor backward_input_bf16(const Geometry&, const at::Tensor&, const at::Tensor&, bool) {
  TORCH_CHECK(false, "pyengine: conv2d's bfloat16 kernels are not compiled in this build");
}
std::tuple<at::Tensor, at::Tensor> backward_weight_bf16(const Geometry&, const at::Tensor&,
                                                       const at::Tensor&, bool) {
  TORCH_CHECK(false, "pyengine: conv2d's bfloat16 kernels are not compiled in this build");
}

#endif  // PE_HAVE_AMX_BF16

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
