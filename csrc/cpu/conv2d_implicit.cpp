// The implicit-GEMM algorithm of the CPU conv2d kernels (interface: cpu/conv2d.h; when it is
// chosen: cpu/conv2d.cpp). For wide layers (16 or more output channels per group) it runs the
// convolution as the transposed product
//
//   Y^T[pixel, co] = sum_k Xtap[pixel, k] W^T[k, co]      k = (ci, ki, kj), a tap
//
// on gemm_indirect's outer-product tiles (cpu/gemm.h): a tile holds a few consecutive output
// pixels by a panel of output channels; per tap it loads a vector of W^T's row and broadcasts
// the tap's input value for each pixel. No im2col is formed: for a fixed tap, consecutive output pixels
// of a row read consecutive input elements of one plane, so the pointer table of gemm_indirect
// lists one pointer per tap into a zero-padded copy of the input, and every tile reads it in place.
//
// The padded copy ("planes"): per image and input channel, the input with its zero padding, split
// into stride_h x stride_w phase planes so that stride > 1 stays contiguous too (output column ow
// of tap kj reads padded column ow * sw + kj * dw, which is column ow + (kj * dw) / sw of phase
// (kj * dw) % sw). A plane's rows are `pw` wide, and output pixel (oh, ow) of a block of output
// rows reads plane offset oh * pw + ow for its taps. The whole block is one GEMM with long
// columns of tiles (the tiles reuse each W^T panel in L1). Its rows are the block's real output
// pixels, gathered through their plane offsets (gemm_indirect's a_rows: a tile may straddle two
// output rows), where the output channels fill the gathered tile (gathered_tile_width: 4 vectors
// with AVX-512, 2 with AVX2); narrower layers take the flattened pixels oh * pw + ow as adjacent
// rows and compute the pw - out_w columns past each row's end too (their taps wrap into the next
// plane row), never stored: a waste of (pw - out_w) / pw, 2 / 16 at 14x14, 3x3, padding 1, 4 / 14
// for LeNet's conv2 (5x5 @14), which gathering saves. With AVX2, 16-31 channels flattened until
// the rule followed the tile: 6 -> 16 5x5 @14 forward 0.72-0.79x the time (batch 1 and 8), 16 ->
// 16 3x3 @28 0.93x, 32 -> 16 3x3 @14 0.88-0.91x; channels_last 0.90-0.95x (one thread,
// alternating).
//
// Napkin math (conv2d 128->128, 3x3, 28x28, batch 8; the reference machine: csrc/cpu/README.md):
// 1.85 GFLOP. The planes copy the input once (0.8 M elements) and the output is transposed into
// NCHW once (0.8 M elements), against 924 M multiply-adds: each element moved pays for ~500 FMAs,
// so the kernels' FMA rate decides, not the data movement; im2col instead wrote every tap of every
// pixel (8.3 M elements) and packed it again for the GEMM.
//
// grad_input of a stride-1 convolution is the same operation (backward_input_implicit): a
// convolution of grad_output, padded by (k - 1) * d - p, with the flipped, transposed weight. A
// strided one splits into one such stride-1 convolution per stride phase of dX
// (backward_input_phases).
// grad_weight (backward_weight_implicit) is a GEMM per kernel position over channels-last copies
// of the input and dY, summed over the real output pixels only.
//
// channels_last images (Order, cpu/conv2d.h): a channels-last input (or dY) is read from a
// zero-padded channels-last copy of its rows where the GEMM's rows are gathered (64+ output
// channels; run()), else its planes are filled through one transpose per row and column phase,
// in cache; the GEMMs' rows, which are pixels, are stored into a channels-last output as they
// are; grad_weight copies a channels-last x without a transpose and reads dY in place. Before,
// conv2d.cpp copied every image into NCHW and back (a stride-2 3x3 64->128 @56, batch 8: 1.4x
// torch's channels_last forward). The GEMMs are the same: the NCHW call's bits.
//
// Deterministic: each output element is summed over its taps in a fixed order (gemm_indirect's
// k blocks in order) that depends on the shapes only, not on how the work is split.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/conv2d.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/transpose.h"

#include <type_traits>

namespace pyengine {
namespace cpu {
namespace conv2d {
namespace {

// The padded, phase-split copy of the input and where each tap reads it.
struct Planes {
  int64_t ph, pw;       // rows and columns of one phase plane
  int64_t plane;        // elements per plane (ph * pw)
  int64_t channel;      // elements per input channel (stride_h * stride_w planes)
  int64_t image;        // elements per image
};

Planes make_planes(const Geometry& g) {
  Planes p;
  const int64_t hp = g.in_h + 2 * g.padding_h, wp = g.in_w + 2 * g.padding_w;
  p.pw = ceil_div(wp, g.stride_w);
  // Rows: the padded input's, and enough that the flattened reads past a row's end (the
  // discarded columns) of the last output row stay inside the plane: the deepest tap reads row
  // out_h - 1 + ((kh - 1) * dh) / sh at columns up to pw - 1 + ((kw - 1) * dw) / sw < 2 * pw.
  const int64_t deepest = g.out_h + ((g.kernel_h - 1) * g.dilation_h) / g.stride_h;
  p.ph = std::max(ceil_div(hp, g.stride_h), deepest) + 1;
  p.plane = p.ph * p.pw;
  p.channel = p.plane * g.stride_h * g.stride_w;
  p.image = p.channel * g.in_channels;
  return p;
}

// Offset of tap k = (ci, ki, kj) of a group inside an image's planes (channel ci of the group).
int64_t tap_offset(const Geometry& g, const Planes& p, int64_t ci, int64_t ki, int64_t kj) {
  const int64_t rh = ki * g.dilation_h, rw = kj * g.dilation_w;
  const int64_t phase = (rh % g.stride_h) * g.stride_w + rw % g.stride_w;
  return ci * p.channel + phase * p.plane + (rh / g.stride_h) * p.pw + rw / g.stride_w;
}

// Column phase q of a padded row holds padded columns j * sw + q, i.e. input columns
// j * sw + off (off = q - padding_w), for the real ones j0 <= j < j1.
struct PhaseColumns {
  int64_t off, j0, j1;
};
PhaseColumns phase_columns(const Geometry& g, int64_t q) {
  const int64_t sw = g.stride_w, off = q - g.padding_w;
  return {off, off >= 0 ? 0 : ceil_div(-off, sw),
          g.in_w - 1 - off < 0 ? 0 : (g.in_w - 1 - off) / sw + 1};
}

// Row ih of channel c of the input (srow: in_w elements) into its planes.
template <typename T>
void place_row(const Geometry& g, const Planes& p, int64_t c, int64_t ih, const T* srow,
               T* planes) {
  const int64_t sh = g.stride_h, sw = g.stride_w;
  static const Isa isa = isa_for(Family::Conv2d);
  const int64_t r = ih + g.padding_h;  // padded row
  T* drows = planes + c * p.channel + (r % sh) * sw * p.plane + (r / sh) * p.pw;
  if (std::is_same_v<T, float> && sw == 2 && (isa == Isa::Avx2 || isa == Isa::Avx512)) {
    // Input column c is padded column c + padding_w: phase (c + padding_w) % 2, column
    // (c + padding_w) / 2 of it.
    const int64_t pad = g.padding_w;
    const float* from = reinterpret_cast<const float*>(srow);
    float* even = reinterpret_cast<float*>(drows + (pad % 2) * p.plane + pad / 2);
    float* odd = reinterpret_cast<float*>(drows + ((pad + 1) % 2) * p.plane + (pad + 1) / 2);
    if (isa == Isa::Avx512)
      deinterleave16(from, g.in_w, even, odd);
    else
      deinterleave(from, g.in_w, even, odd);
    return;
  }
  for (int64_t q = 0; q < sw; ++q) {
    T* drow = drows + q * p.plane;
    const auto [off, j0, j1] = phase_columns(g, q);
    if (sw == 1) {
      if (j1 > j0) std::memcpy(drow + j0, srow + j0 + off, (j1 - j0) * sizeof(T));
    } else {
      for (int64_t j = j0; j < j1; ++j) drow[j] = srow[j * sw + off];
    }
  }
}

// planes of image n (x: that image, NCHW or channels-last as `order` says): its input
// elements, always the same positions; the padding and the extra rows are never written (run()
// zeroes the buffer once). A channels-last row goes straight into its phase planes: per column
// phase, the pixels of that phase (sw * C apart) transposed into the channels' plane rows, in
// cache. (Before: a transpose of the row into per-channel rows, then place_row's column split
// per channel, another pass: with it, 10-15% of a stride-2 3x3 channels_last forward went to
// moving the input, perf, one thread.)
template <typename T>
void fill_planes(const Geometry& g, const Planes& p, const T* x, Order order, T* planes) {
  if (order == Order::ChannelsLast) {
    const int64_t sh = g.stride_h, sw = g.stride_w, C = g.in_channels;
    for (int64_t ih = 0; ih < g.in_h; ++ih) {
      const int64_t r = ih + g.padding_h;  // padded row
      T* drows = planes + (r % sh) * sw * p.plane + (r / sh) * p.pw;
      const T* srow = x + ih * g.in_w * C;
      // The next row, asked for a line at a time: the transposes' loads, sw * C apart, stalled
      // on it (perf, stride-2 3x3 64->128 @56, one thread: transpose16 10.5% of the time without,
      // 5.3% with, the prefetch loop 2%).
      if (ih + 1 < g.in_h) {
        const char* next = reinterpret_cast<const char*>(srow + g.in_w * C);
        for (int64_t byte = 0; byte < g.in_w * C * int64_t(sizeof(T)); byte += 64)
          __builtin_prefetch(next + byte, /*rw=*/0, /*locality=*/2);
      }
      for (int64_t q = 0; q < sw; ++q) {
        const auto [off, j0, j1] = phase_columns(g, q);
        if (j1 > j0)
          transpose(j1 - j0, C, srow + (j0 * sw + off) * C, sw * C, drows + q * p.plane + j0,
                    p.channel, static_cast<const T*>(nullptr));
      }
    }
    return;
  }
  for (int64_t c = 0; c < g.in_channels; ++c)
    for (int64_t ih = 0; ih < g.in_h; ++ih) {
      const T* srow = x + c * g.in_pixels() + ih * g.in_w;
      // The input is read once, from L3 or memory, in rows too short for the hardware
      // prefetcher to run far ahead: ask for the lines ~2 KB on (a stride-2 3x3 forward, one
      // thread: 3-5% faster; 1 KB no different).
      const char* ahead = reinterpret_cast<const char*>(srow) + 2048;
      for (int64_t byte = 0; byte < g.in_w * int64_t(sizeof(T)); byte += 64)
        __builtin_prefetch(ahead + byte, /*rw=*/0, /*locality=*/2);
      place_row(g, p, c, ih, srow, planes);
    }
}

// Tap offsets within a group's channels, in the GEMM's k order (ci, ki, kj).
std::vector<int64_t> tap_offsets(const Geometry& g, const Planes& p) {
  std::vector<int64_t> tap(static_cast<size_t>(g.taps_per_group()));
  for (int64_t ci = 0, k = 0; ci < g.in_channels_per_group(); ++ci)
    for (int64_t ki = 0; ki < g.kernel_h; ++ki)
      for (int64_t kj = 0; kj < g.kernel_w; ++kj) tap[k++] = tap_offset(g, p, ci, ki, kj);
  return tap;
}

// Output rows per block: ~512 flattened pixels, so that a block's Y^T scratch (pixels x cout_g)
// or dY rows stay in L2 across the GEMM's k blocks.
int64_t rows_per_block(const Geometry& g, const Planes& p) {
  return std::clamp<int64_t>(512 / p.pw, 1, g.out_h);
}

// Rows [r0, r1) of a product's operand, in parallel: at least ~64K elements per task.
template <typename F>
void parallel_rows(int64_t rows, int64_t row_elems, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_elems)), f);
}

template <typename T>
std::vector<T>& scratch() {
  thread_local std::vector<T> buf;
  return buf;
}

// The padding of a zero-padded channels-last copy of one image (run()'s pixel rows): the rows
// above and below the input's, and each input row's columns left and right of it.
template <typename T>
void zero_pixel_row_padding(const Geometry& g, T* rows) {
  const int64_t wp = g.in_w + 2 * g.padding_w, C = g.in_channels;
  const int64_t row = wp * C, side = g.padding_w * C;
  std::fill(rows, rows + g.padding_h * row, T(0));
  std::fill(rows + (g.padding_h + g.in_h) * row, rows + (g.in_h + 2 * g.padding_h) * row, T(0));
  for (int64_t ih = 0; ih < g.in_h; ++ih) {
    T* r = rows + (ih + g.padding_h) * row;
    std::fill(r, r + side, T(0));
    std::fill(r + side + g.in_w * C, r + row, T(0));
  }
}

// The shared body: y = conv(x, w) with w given as W^T per group (wt: groups x K rows of cout_g,
// ldw apart: the GEMM's B rows, read in place), bias optional; x and y NCHW or channels-last.
template <typename T>
void run(const Geometry& g, const T* x, const T* wt, int64_t ldw, const T* bias, T* y,
         Order x_order, Order y_order) {
  const Planes p = make_planes(g);
  const int64_t K = g.taps_per_group(), cin_g = g.in_channels_per_group();
  const int64_t cout_g = g.out_channels_per_group(), P = g.out_pixels();
  // A channels-last input is read from a zero-padded channels-last copy ("pixel rows": its rows
  // copied as they are) instead of the planes: tap (ci, ki, kj) of output pixel (oh, ow) is
  // element ((oh * sh + ki * dh) * wp + ow * sw + kj * dw) * C + ci, so the table's pointers
  // and the gathered rows' offsets describe it as they do the planes, in the same k order (the
  // NCHW call's bits). The planes cost per-phase transposes of every input row (5-10% of a
  // stride-2 3x3 64->128 channels_last forward, perf, one thread); with pixel rows the forward
  // took 0.94-0.98x the time (both in one build, alternating in-process, 1 and 2 threads).
  // Gathered rows only: channels that fill the gathered tile.
  const bool pixel_rows = x_order == Order::ChannelsLast && cout_g >= gathered_tile_width<T>();
  const int64_t wp = g.in_w + 2 * g.padding_w, hp = g.in_h + 2 * g.padding_h;
  const int64_t C = g.in_channels;
  std::vector<int64_t> tap = tap_offsets(g, p);
  if (pixel_rows)
    for (int64_t ci = 0, k = 0; ci < cin_g; ++ci)
      for (int64_t ki = 0; ki < g.kernel_h; ++ki)
        for (int64_t kj = 0; kj < g.kernel_w; ++kj)
          tap[k++] = (ki * g.dilation_h * wp + kj * g.dilation_w) * C + ci;
  std::vector<const T*> b_rows(static_cast<size_t>(g.groups * K));
  for (int64_t i = 0; i < g.groups * K; ++i) b_rows[i] = wt + i * ldw;
  // Tasks: (image, group, block of output rows), images outermost. A thread fills the planes of
  // the image its tasks are on, in its own one-image buffer, when it reaches it: the planes are
  // fresh in cache, and no batch-sized buffer is allocated (its page faults cost as much as the
  // copy). An image whose tasks are split between threads is filled by each of them.
  const int64_t rpb = rows_per_block(g, p);
  const int64_t blocks = ceil_div(g.out_h, rpb);
  const int64_t tasks = g.batch * g.groups * blocks;
  const double work = double(rpb) * p.pw * K * cout_g;
  // The GEMM's rows: gathered real pixels (offsets from the block's first row in `gathered`),
  // or flattened ones; `pitch` of them per output row.
  const bool gather = pixel_rows || (g.out_w < p.pw && cout_g >= gathered_tile_width<T>());
  const int64_t pitch = gather ? g.out_w : p.pw;
  std::vector<int64_t> gathered(static_cast<size_t>(gather ? rpb * g.out_w : 0));
  for (size_t q = 0; q < gathered.size(); ++q) {
    const int64_t r = int64_t(q) / g.out_w, c = int64_t(q) % g.out_w;
    gathered[q] = pixel_rows ? (r * g.stride_h * wp + c * g.stride_w) * C : r * p.pw + c;
  }
  at::parallel_for(0, tasks, grain_for(work), [&](int64_t t0, int64_t t1) {
    std::vector<const T*> a_rows(static_cast<size_t>(K));
    // Its padding zeroed once: the fills write the same elements for every image, the padding
    // never. Pixel rows zero just their padding: the whole buffer (832 KB for a 64-channel 56 x
    // 56 image) per thread and call was 0.3% of a stride-2 3x3 64->128 channels_last forward's
    // samples (perf), 0.1% after.
    CachedBuffer<T> planes(static_cast<size_t>(pixel_rows ? hp * wp * C : p.image),
                           /*zero=*/!pixel_rows);
    if (pixel_rows) zero_pixel_row_padding(g, planes.data());
    int64_t filled = -1;  // the image in `planes`
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t % blocks, grp = (t / blocks) % g.groups, n = t / (blocks * g.groups);
      const T* xn = x + n * g.in_image();
      if (n != filled && pixel_rows) {
        for (int64_t ih = 0; ih < g.in_h; ++ih)
          std::memcpy(planes.data() + ((ih + g.padding_h) * wp + g.padding_w) * C,
                      xn + ih * g.in_w * C, g.in_w * C * sizeof(T));
      } else if (n != filled) {
        fill_planes(g, p, xn, x_order, planes.data());
      }
      filled = n;
      const int64_t oh0 = blk * rpb, oh1 = std::min(g.out_h, oh0 + rpb);
      const int64_t m = (oh1 - oh0) * pitch;
      const T* base = pixel_rows
                          ? planes.data() + oh0 * g.stride_h * wp * C + grp * cin_g
                          : planes.data() + grp * cin_g * p.channel + oh0 * p.pw;
      for (int64_t k = 0; k < K; ++k) a_rows[k] = base + tap[k];
      const T* bg = bias ? bias + grp * cout_g : nullptr;
      const int64_t* rows = gather ? gathered.data() : nullptr;
      if (y_order == Order::ChannelsLast && pitch == g.out_w) {
        // Y^T's rows are the block's output pixels, consecutive in a channels-last y: the GEMM
        // stores them there, the bias added as it stores its last k block (the bits of adding it
        // after). Through a scratch Y^T and a copy (store_pixel_rows) the stride-2 3x3 64->128
        // channels_last forward took 1.05-1.07x the time (without bias, in-process, 1-2 threads).
        gemm_indirect<T>(m, cout_g, K, a_rows.data(), b_rows.data() + grp * K,
                         y + n * g.out_image() + oh0 * g.out_w * g.out_channels + grp * cout_g,
                         g.out_channels, 1, /*accumulate=*/false, rows, bg);
        continue;
      }
      std::vector<T>& yt = scratch<T>();
      if (yt.size() < static_cast<size_t>(m * cout_g)) yt.resize(static_cast<size_t>(m * cout_g));
      gemm_indirect<T>(m, cout_g, K, a_rows.data(), b_rows.data() + grp * K, yt.data(), cout_g, 1,
                       /*accumulate=*/false, rows);
      if (y_order == Order::ChannelsLast) {  // Y^T's rows (pitch apart) are y's pixels
        T* yn = y + n * g.out_image() + grp * cout_g;
        for (int64_t oh = oh0; oh < oh1; ++oh)
          store_pixel_rows(yt.data() + (oh - oh0) * pitch * cout_g, cout_g, g.out_w, cout_g, bg,
                           yn + oh * g.out_w * g.out_channels, g.out_channels);
        continue;
      }
      // Y^T block -> NCHW, plus the bias: rows of out_w pixels (gathered, or no discarded
      // columns) are the block's output in NCHW order, one transpose; flattened rows skip their
      // discarded columns, output row by output row.
      T* yg = y + n * g.out_image() + grp * cout_g * P;
      if (pitch == g.out_w) {
        transpose(m, cout_g, yt.data(), cout_g, yg + oh0 * g.out_w, P, bg);
        continue;
      }
      for (int64_t oh = oh0; oh < oh1; ++oh)
        transpose(g.out_w, cout_g, yt.data() + (oh - oh0) * pitch * cout_g, cout_g,
                  yg + oh * g.out_w, P, bg);
    }
  });
}


// grad_input of a strided convolution, by stride phases. Padded input row r = ih + padding_h
// receives dY[oh] W[ki] wherever oh * sh + ki * dh = r: writing r = u * sh + a (a, the row
// phase), the taps are the ki with ki * dh = q * sh + a, and each reads dY row u - q. So every
// phase (a, b) of dX is a stride-1 correlation of dY with that phase's taps (none for some
// phases: zeros), run on the same gathered tiles as the forward: its GEMM rows are the phase's
// dX pixels (u, v), its k the (co, ki, kj) of the phase's taps, its columns the input channels
// of a group. dY goes into zero-padded planes, qh_max rows above and qw_max columns to the left
// (q's largest values), so that tap (ki, kj) reads plane offset (u + qh_max - qi) * pw + v +
// qw_max - qj. A block's result (pixels x channels) is transposed, then its rows scattered with
// the stride into dX. im2col instead formed every tap of every output pixel (K x P per image),
// a GEMM over it, and summed it back into dX tap by tap.
template <typename T>
void backward_input_phases(const Geometry& g, const T* dy, const T* w, T* dx, Order dy_order,
                           Order dx_order) {
  const int64_t sh = g.stride_h, sw = g.stride_w, dh = g.dilation_h, dw = g.dilation_w;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t khw = g.kernel_pixels();
  const int64_t qh_max = (g.kernel_h - 1) * dh / sh, qw_max = (g.kernel_w - 1) * dw / sw;
  // Phase (a, b): its taps, the range of (u, v) that lands in dX, and its rows per task (~512
  // dX pixels, as run()'s blocks).
  struct Phase {
    int64_t a, b, u0, rows, v0, cols, rows_per_task;
    std::vector<int64_t> ki, kj;  // taps in k order, with ki / kj outermost / innermost
  };
  // The last u (v) with u * s + phase inside [padding, padding + size): -1 if none.
  auto last = [](int64_t padding, int64_t size, int64_t phase, int64_t s) {
    const int64_t r = padding + size - 1 - phase;
    return r < 0 ? int64_t(-1) : r / s;
  };
  std::vector<Phase> phases;
  int64_t ph = qh_max + g.out_h, pw = qw_max + g.out_w;  // dY planes: rows, columns
  for (int64_t a = 0; a < sh; ++a)
    for (int64_t b = 0; b < sw; ++b) {
      Phase f{a, b, 0, 0, 0, 0, 0, {}, {}};
      // Padded rows u * sh + a in [padding_h, padding_h + in_h), columns alike.
      f.u0 = a >= g.padding_h ? 0 : ceil_div(g.padding_h - a, sh);
      f.v0 = b >= g.padding_w ? 0 : ceil_div(g.padding_w - b, sw);
      const int64_t u1 = last(g.padding_h, g.in_h, a, sh), v1 = last(g.padding_w, g.in_w, b, sw);
      f.rows = std::max<int64_t>(0, u1 - f.u0 + 1);
      f.cols = std::max<int64_t>(0, v1 - f.v0 + 1);
      for (int64_t i = 0; i < g.kernel_h; ++i)
        for (int64_t j = 0; j < g.kernel_w; ++j)
          if ((i * dh) % sh == a && (j * dw) % sw == b) {
            f.ki.push_back(i);
            f.kj.push_back(j);
          }
      if (f.rows == 0 || f.cols == 0) continue;
      f.rows_per_task = std::clamp<int64_t>(512 / f.cols, 1, f.rows);
      ph = std::max(ph, u1 + qh_max + 1);
      pw = std::max(pw, v1 + qw_max + 1);
      phases.push_back(std::move(f));
    }
  const int64_t plane = ph * pw, image = plane * g.out_channels;
  // A channels-last dY goes into a zero-padded channels-last copy of its rows ("pixel rows", as
  // run()'s input) instead of the planes: element (co, row, column) of the planes is element
  // (row * pw + column) * out_channels + co of the copy, so the tables describe it with the same
  // k order (the NCHW call's bits), and the fill is a copy per row instead of a transpose.
  // Where the input channels fill 4 vectors (run() takes pixel rows from the gathered tile's
  // width, 2 vectors with AVX2; for this grad_input, 2 vs 4 was within this machine's noise).
  const bool pixel_rows = dy_order == Order::ChannelsLast && cin_g >= 4 * simd_width<T>();
  const int64_t elem = pixel_rows ? g.out_channels : 1;  // a plane element's stride
  const int64_t chan = pixel_rows ? 1 : plane;             // a channel's
  // A phase with no taps leaves its dX pixels zero: zero dX first where one exists.
  for (const Phase& f : phases)
    if (f.ki.empty()) {
      std::fill(dx, dx + g.batch * g.in_image(), T(0));
      break;
    }
  // B rows per (group, phase): W'^T[(co, tap)][ci] = w[grp * cout_g + co][ci][ki][kj], ldb apart.
  const int64_t ldb = in_place_ld<T>(cin_g);
  std::vector<int64_t> b_start(phases.size() + 1, 0);  // row offsets of the phases in a group
  for (size_t f = 0; f < phases.size(); ++f)
    b_start[f + 1] = b_start[f] + cout_g * int64_t(phases[f].ki.size());
  const int64_t group_rows = b_start.back();
  CachedBuffer<T> wt(static_cast<size_t>(std::max<int64_t>(1, g.groups * group_rows * ldb)),
                     /*zero=*/false);
  parallel_rows(g.out_channels, cin_g * khw, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = grp * cout_g + co
      const int64_t grp = r / cout_g, co = r % cout_g;
      const T* src = w + r * cin_g * khw;
      for (size_t f = 0; f < phases.size(); ++f) {
        const int64_t taps = int64_t(phases[f].ki.size());
        T* dst = wt.data() + (grp * group_rows + b_start[f] + co * taps) * ldb;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t pos = phases[f].ki[t] * g.kernel_w + phases[f].kj[t];
          for (int64_t ci = 0; ci < cin_g; ++ci) dst[t * ldb + ci] = src[ci * khw + pos];
        }
      }
    }
  });
  // Tasks: (image, group, phase, block of ~512 dX pixels), images outermost; a thread fills the
  // dY planes of the image it is on (as run() does).
  std::vector<int64_t> blocks(phases.size()), first_task(phases.size() + 1, 0);
  for (size_t f = 0; f < phases.size(); ++f) {
    blocks[f] = phases[f].ki.empty() ? 0 : ceil_div(phases[f].rows, phases[f].rows_per_task);
    first_task[f + 1] = first_task[f] + blocks[f];
  }
  const int64_t per_group = first_task.back(), tasks = g.batch * g.groups * per_group;
  if (tasks == 0) return;
  const double work = 512.0 * cout_g * cin_g;  // a task's multiply-adds per tap
  static const bool spread_avx512 = isa_for(Family::Conv2d) == Isa::Avx512;
  at::parallel_for(0, tasks, grain_for(work), [&](int64_t t0, int64_t t1) {
    CachedBuffer<T> planes(static_cast<size_t>(image));
    int64_t filled = -1;
    std::vector<const T*> a_rows, b_rows;
    std::vector<int64_t> gathered, scattered, tap_back;
    std::vector<T> c, ct;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / (g.groups * per_group), grp = (t / per_group) % g.groups;
      const int64_t local = t % per_group;
      const size_t fi = static_cast<size_t>(
          std::upper_bound(first_task.begin(), first_task.end(), local) - first_task.begin() - 1);
      const Phase& f = phases[fi];
      if (n != filled) {  // dY of image n into the planes' interior; the borders stay zero
        const T* src = dy + n * g.out_image();
        if (pixel_rows) {
          for (int64_t oh = 0; oh < g.out_h; ++oh)
            std::memcpy(planes.data() + ((oh + qh_max) * pw + qw_max) * g.out_channels,
                        src + oh * g.out_w * g.out_channels,
                        g.out_w * g.out_channels * sizeof(T));
        } else if (dy_order == Order::ChannelsLast) {
          for (int64_t oh = 0; oh < g.out_h; ++oh)
            transpose(g.out_w, g.out_channels, src + oh * g.out_w * g.out_channels,
                      g.out_channels, planes.data() + (oh + qh_max) * pw + qw_max, plane,
                      static_cast<const T*>(nullptr));
        } else {
          for (int64_t co = 0; co < g.out_channels; ++co)
            for (int64_t oh = 0; oh < g.out_h; ++oh)
              std::memcpy(planes.data() + co * plane + (oh + qh_max) * pw + qw_max,
                          src + (co * g.out_h + oh) * g.out_w, g.out_w * sizeof(T));
        }
        filled = n;
      }
      const int64_t u_begin = f.u0 + (local - first_task[fi]) * f.rows_per_task;
      const int64_t u_end = std::min(f.u0 + f.rows, u_begin + f.rows_per_task);
      const int64_t m = (u_end - u_begin) * f.cols, taps = int64_t(f.ki.size());
      const int64_t K = cout_g * taps;
      a_rows.resize(static_cast<size_t>(K));
      b_rows.resize(static_cast<size_t>(K));
      const T* base = planes.data() + grp * cout_g * chan +
                      ((u_begin + qh_max) * pw + f.v0 + qw_max) * elem;
      const T* wb = wt.data() + (grp * group_rows + b_start[fi]) * ldb;
      tap_back.resize(static_cast<size_t>(taps));
      for (int64_t tp = 0; tp < taps; ++tp)
        tap_back[tp] = (f.ki[tp] * dh / sh * pw + f.kj[tp] * dw / sw) * elem;
      for (int64_t co = 0, k = 0; co < cout_g; ++co)
        for (int64_t tp = 0; tp < taps; ++tp, ++k) {
          a_rows[k] = base + co * chan - tap_back[tp];
          b_rows[k] = wb + k * ldb;
        }
      // The rows' offsets, row by row (a division per pixel cost 5% of a stride-2 3x3 64->128
      // channels_last grad_input, perf, one thread); where dX is channels-last, also where each
      // row goes in it.
      const bool scatter = dx_order == Order::ChannelsLast;
      gathered.resize(static_cast<size_t>(m));
      scattered.resize(static_cast<size_t>(scatter ? m : 0));
      for (int64_t u = u_begin, q = 0; u < u_end; ++u) {
        const int64_t ih = u * sh + f.a - g.padding_h;
        for (int64_t v = f.v0; v < f.v0 + f.cols; ++v, ++q) {
          gathered[q] = ((u - u_begin) * pw + v - f.v0) * elem;
          if (scatter) scattered[q] = (ih * g.in_w + v * sw + f.b - g.padding_w) * g.in_channels;
        }
      }
      if (scatter) {
        // Each pixel's channels straight into dX (its rows scattered: every sw pixels along a
        // row, then the next row of the phase). Through a scratch block and a copy
        // (store_pixel_rows), 7% of a stride-2 3x3 64->128 grad_input went to the copy (perf,
        // one thread).
        gemm_indirect<T>(m, cin_g, K, a_rows.data(), b_rows.data(),
                         dx + n * g.in_image() + grp * cin_g, 0, 1, /*accumulate=*/false,
                         gathered.data(), static_cast<const T*>(nullptr), scattered.data());
        continue;
      }
      if (c.size() < static_cast<size_t>(m * cin_g)) c.resize(static_cast<size_t>(m * cin_g));
      if (ct.size() < static_cast<size_t>(m * cin_g)) ct.resize(static_cast<size_t>(m * cin_g));
      gemm_indirect<T>(m, cin_g, K, a_rows.data(), b_rows.data(), c.data(), cin_g, 1,
                       /*accumulate=*/false, gathered.data());
      // (pixels x channels) -> (channels x pixels), then each row into dX every sw columns.
      transpose(m, cin_g, c.data(), cin_g, ct.data(), m, static_cast<const T*>(nullptr));
      for (int64_t ci = 0; ci < cin_g; ++ci) {
        T* dxc = dx + n * g.in_image() + (grp * cin_g + ci) * g.in_pixels();
        for (int64_t u = u_begin; u < u_end; ++u) {
          const T* row = ct.data() + ci * m + (u - u_begin) * f.cols;
          T* out = dxc + (u * sh + f.a - g.padding_h) * g.in_w + f.v0 * sw + f.b - g.padding_w;
          if constexpr (std::is_same_v<T, float>) {
            if (sw == 2 && spread_avx512) {
              spread2_16(row, f.cols, out);
              continue;
            }
          }
          for (int64_t v = 0; v < f.cols; ++v) out[v * sw] = row[v];
        }
      }
    }
  });
}

}  // namespace

bool implicit_fits(const Geometry& g) {
  // Output-channel panels of a whole vector or more: below that the tiles would be mostly
  // padding (LeNet's 6-channel conv1 stays on im2col). A padding wider than the dilated kernel
  // (possible, if odd) has no stride-1 transposed form for grad_input (the stride phases handle
  // it; implicit_fits_backward_input); forward runs anyway.
  return g.out_channels_per_group() >= 16 && g.out_w >= 4;
}

bool implicit_fits_backward_input(const Geometry& g) {
  // The vector dimension is the input channels of a group, as for the forward's output channels.
  if (g.in_channels_per_group() < 16) return false;
  if (g.stride_h > 1 || g.stride_w > 1) return g.in_w >= 2 * g.stride_w;  // by phases
  return g.in_w >= 4 && g.padding_h <= (g.kernel_h - 1) * g.dilation_h &&
         g.padding_w <= (g.kernel_w - 1) * g.dilation_w;
}

bool implicit_fits_backward_weight(const Geometry& g) {
  // Its GEMMs' vector dimension is the input channels of a group.
  return g.out_channels_per_group() >= 16 && g.in_channels_per_group() >= 16;
}

template <typename T>
void forward_implicit(const Geometry& g, const T* x, const T* w, const T* bias, T* y,
                      Order x_order, Order y_order, Order w_order) {
  const int64_t K = g.taps_per_group(), cout_g = g.out_channels_per_group();
  // W^T per group: wt[grp][k][co] = w[grp * cout_g + co][k], k = (ci, ki, kj).
  const int64_t ldw = in_place_ld<T>(cout_g);
  CachedBuffer<T> wt(static_cast<size_t>(g.groups * K * ldw), /*zero=*/false);
  if (w_order == Order::ChannelsLast) {
    // w[co][ki][kj][ci]: per kernel position t = (ki, kj), its cout_g x cin_g slice (rows K
    // apart) transposed into W^T rows k = ci * khw + t (khw rows apart), the k order of an NCHW
    // weight (so both layouts give the same bits).
    const int64_t cin_g = g.in_channels_per_group(), khw = g.kernel_pixels();
    parallel_rows(g.groups * khw, cin_g * cout_g, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t grp = b / khw, t = b % khw;
        transpose(cout_g, cin_g, w + grp * cout_g * K + t * cin_g, K,
                  wt.data() + (grp * K + t) * ldw, khw * ldw, static_cast<const T*>(nullptr));
      }
    });
    run<T>(g, x, wt.data(), ldw, bias, y, x_order, y_order);
    return;
  }
  // In blocks of 64 taps, so that one group's weight (2.4 MB at 256 -> 256, 3x3) is not
  // transposed by one thread while the other waits.
  constexpr int64_t kTaps = 64;
  const int64_t tap_blocks = ceil_div(K, kTaps);
  parallel_rows(g.groups * tap_blocks, kTaps * cout_g, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t grp = b / tap_blocks, k0 = (b % tap_blocks) * kTaps;
      transpose(cout_g, std::min(kTaps, K - k0), w + grp * cout_g * K + k0, K,
                wt.data() + (grp * K + k0) * ldw, ldw, static_cast<const T*>(nullptr));
    }
  });
  run<T>(g, x, wt.data(), ldw, bias, y, x_order, y_order);
}

template <typename T>
void backward_input_implicit(const Geometry& g, const T* dy, const T* w, T* dx, Order dy_order,
                             Order dx_order) {
  if (g.stride_h > 1 || g.stride_w > 1) {
    backward_input_phases<T>(g, dy, w, dx, dy_order, dx_order);
    return;
  }
  // dX = conv(dY, W'), stride 1, padding (k - 1) * d - p, W'[ci][co][ki][kj] =
  // W[co][ci][kh - 1 - ki][kw - 1 - kj] per group; its GEMM's B rows are W'^T[(co, ki, kj)][ci].
  const Geometry t{g.batched, g.batch, g.out_channels, g.out_h, g.out_w,
                   g.in_channels, g.in_h, g.in_w, g.kernel_h, g.kernel_w, 1, 1,
                   (g.kernel_h - 1) * g.dilation_h - g.padding_h,
                   (g.kernel_w - 1) * g.dilation_w - g.padding_w,
                   g.dilation_h, g.dilation_w, g.groups};
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t kh = g.kernel_h, kw = g.kernel_w, khw = kh * kw;
  const int64_t K = cout_g * khw;  // the transposed convolution's taps per group
  // Flipping both kernel axes reverses the flattened position: (kh-1-ki, kw-1-kj) = khw-1-j.
  const int64_t ldw = in_place_ld<T>(cin_g);
  CachedBuffer<T> wt(static_cast<size_t>(g.groups * K * ldw), /*zero=*/false);
  parallel_rows(g.out_channels, cin_g * khw, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = grp * cout_g + co
      const int64_t grp = r / cout_g, co = r % cout_g;
      const T* src = w + r * cin_g * khw;
      T* dst = wt.data() + (grp * K + co * khw) * ldw;
      for (int64_t j = 0; j < khw; ++j)
        for (int64_t ci = 0; ci < cin_g; ++ci) dst[(khw - 1 - j) * ldw + ci] = src[ci * khw + j];
    }
  });
  run<T>(t, dy, wt.data(), ldw, nullptr, dx, dy_order, dx_order);
}

template <typename T>
void backward_weight_implicit(const Geometry& g, const T* dy, const T* x, T* dw, Order dy_order,
                              Order x_order) {
  // Per kernel position (ki, kj), dW[:, :, ki, kj] is a GEMM over the output pixels q:
  //   dW[co, ci, ki, kj] = sum_q dY^T[q, co] X^T[pixel read by q at (ki, kj), ci]
  // gemm_indirect's outer-product tiles vectorise along ci: the input is copied channels-last
  // (zero-padded, and split into stride phases like the planes, so that consecutive output
  // pixels read consecutive pixel rows: 512 B apart, stride-2 rows used half of L1's sets), so
  // each pixel's channels are one contiguous row, and dY^T's rows are the output pixels'
  // channels. The pointer tables list only real output pixels: nothing is summed for the
  // discarded columns of the forward (an Inf or NaN in the input reaches only the weights whose
  // taps read it, as in torch).
  // A channels_last input (x_order) is copied row by row into the padded copy, no transpose; a
  // channels_last dY is read in place where its pixel rows are coutp apart, else copied by rows.
  // The tasks, blocks and GEMMs do not depend on the orders: the same sums, the same bits.
  const int64_t cin = g.in_channels, cout = g.out_channels, P = g.out_pixels();
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t sh = g.stride_h, sw = g.stride_w, khw = g.kernel_pixels();
  const int64_t hs = ceil_div(g.in_h + 2 * g.padding_h, sh);
  const int64_t ws = ceil_div(g.in_w + 2 * g.padding_w, sw);
  // Pixel rows of the channels-last copies, read in place by the GEMMs: cinp and coutp apart.
  const int64_t cinp = in_place_ld<T>(cin), coutp = in_place_ld<T>(cout);
  const int64_t phase = hs * ws * cinp, image = phase * sh * sw;
  // Tasks: (slice of the batch, group, kernel position, block of output channels), each with its
  // own dW^T block in `acc`. Image by image within each slice: the images' channels-last copies
  // are made (in parallel), then every task runs on its blocks of ~512 output pixels, reading them
  // from cache; each dW element sums its slices' blocks in order, then the slices in order,
  // whatever the split.
  const int64_t positions = g.groups * khw;
  // Blocks of at least 48 channels (or all of them): each B row (a pixel's input channels) loaded
  // is reused by that many rows of the tile column. At least 16 tasks where the channels allow,
  // so that 2, 4 or 8 threads stay evenly busy (9 kernel positions on 2 threads left one idle a
  // ninth of the time); where they do not (64 channels: 9 tasks), the batch is cut into slices
  // that sum apart. From the shapes only, never the thread count: a block's height picks
  // gemm_indirect's tile and so its k blocks, and each dW element must be summed the same way
  // whatever the threads.
  const int64_t co_blocks =
      std::clamp<int64_t>(ceil_div(16, positions), 1, std::max<int64_t>(1, cout_g / 48));
  const int64_t co_block = round_up(ceil_div(cout_g, co_blocks), 8);
  const int64_t tasks = positions * co_blocks;
  // At least two slices, too, where a dW (one slice's accumulators) is smaller than one image's
  // channels-last copies: two threads then each copy and read their own slice's images. In one
  // slice each thread read the half of every copy that the other core wrote (stride-2 64->128
  // 3x3 at 56x56, batch 8, two threads: 4.9 ms, 1.55x its one-thread speed; 4.1 in two slices).
  const int64_t copies = image + P * coutp;
  const int64_t wanted = std::max<int64_t>(ceil_div(16, tasks),
                                           cout * cin_g * khw < copies ? 2 : 1);
  const int64_t per_slice = ceil_div(g.batch, std::min(g.batch, wanted));
  const int64_t slices = ceil_div(g.batch, per_slice);
  const int64_t block_rows = std::clamp<int64_t>(512 / g.out_w, 1, g.out_h);
  const int64_t acc_block = co_block * cin_g, acc_slice = tasks * acc_block;
  CachedBuffer<T> acc(static_cast<size_t>(slices * acc_slice), /*zero=*/false);
  CachedBuffer<T> xt(static_cast<size_t>(slices * image));  // padding: zero once, never written
  const bool dy_in_place = dy_order == Order::ChannelsLast && coutp == cout;
  CachedBuffer<T> dyt(static_cast<size_t>(dy_in_place ? 0 : slices * P * coutp),
                      /*zero=*/false);
  // Image i of slices [s0, s1): its copies, then its share of every task.
  const auto image_step = [&](int64_t i, int64_t s0, int64_t s1) {
    const int64_t live = s1 - s0;
    // Channels-last copies of the images. Blocks of 16 channels outermost: a block reads its 16
    // channel planes as 16 contiguous streams over the task's rows, which the prefetchers
    // follow; row by row it read all cin planes at once (a 224-byte run of each per row).
    const auto copy_x_rows = [&](int64_t r0, int64_t r1) {
      if (r0 >= r1) return;
      std::vector<T> row(static_cast<size_t>(sw > 1 ? g.in_w * 16 : 0));
      for (int64_t l = r0 / g.in_h; l <= (r1 - 1) / g.in_h; ++l) {
        const int64_t sl = s0 + l;
        const int64_t h0 = std::max(r0 - l * g.in_h, int64_t(0));
        const int64_t h1 = std::min(r1 - l * g.in_h, g.in_h);
        const T* xn = x + (sl * per_slice + i) * g.in_image();
        T* xs = xt.data() + sl * image;
        if (x_order == Order::ChannelsLast) {
          for (int64_t ih = h0; ih < h1; ++ih) {
            const int64_t r = ih + g.padding_h;
            T* dst = xs + (r % sh) * sw * phase + (r / sh) * ws * cinp;
            const T* src = xn + ih * g.in_w * cin;
            if (sw == 1 && cinp == cin) {
              std::memcpy(dst + g.padding_w * cin, src,
                          static_cast<size_t>(g.in_w * cin) * sizeof(T));
              continue;
            }
            for (int64_t iw = 0; iw < g.in_w; ++iw) {
              const int64_t col = iw + g.padding_w;
              std::memcpy(dst + (col % sw) * phase + (col / sw) * cinp, src + iw * cin,
                          static_cast<size_t>(cin) * sizeof(T));
            }
          }
          continue;
        }
        for (int64_t c0 = 0; c0 < cin; c0 += 16) {
          const int64_t nc = std::min<int64_t>(16, cin - c0);
          for (int64_t ih = h0; ih < h1; ++ih) {
            const int64_t r = ih + g.padding_h;
            T* dst = xs + (r % sh) * sw * phase + (r / sh) * ws * cinp + c0;
            const T* src = xn + c0 * g.in_pixels() + ih * g.in_w;
            if (sw == 1) {
              transpose(nc, g.in_w, src, g.in_pixels(), dst + g.padding_w * cinp, cinp,
                        static_cast<const T*>(nullptr));
              continue;
            }
            transpose(nc, g.in_w, src, g.in_pixels(), row.data(), int64_t(16),
                      static_cast<const T*>(nullptr));
            // Each column phase's pixels into its rows: copies of a constant 16 channels
            // where the block is whole (a memcpy call per pixel, of a size known at run time
            // only, was 8% of a stride-2 3x3 64->128 @56 grad_weight, perf, two threads).
            for (int64_t q = 0; q < sw; ++q) {
              const auto [off, j0, j1] = phase_columns(g, q);
              T* d = dst + q * phase + j0 * cinp;
              const T* from = row.data() + (j0 * sw + off) * 16;
              if (nc == 16) {
                for (int64_t j = j0; j < j1; ++j, d += cinp, from += sw * 16)
                  std::memcpy(d, from, 16 * sizeof(T));
              } else {
                for (int64_t j = j0; j < j1; ++j, d += cinp, from += sw * 16)
                  std::memcpy(d, from, static_cast<size_t>(nc) * sizeof(T));
              }
            }
          }
        }
      }
    };
    const int64_t qblocks = ceil_div(P, 16);
    const auto copy_dy_blocks = [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t sl = s0 + b / qblocks, q0 = (b % qblocks) * 16;
        const int64_t q1 = std::min(P, q0 + 16);
        const T* dyn = dy + (sl * per_slice + i) * g.out_image();
        T* dst = dyt.data() + (sl * P + q0) * coutp;
        if (dy_order == Order::ChannelsLast) {
          for (int64_t q = q0; q < q1; ++q)
            std::memcpy(dst + (q - q0) * coutp, dyn + q * cout,
                        static_cast<size_t>(cout) * sizeof(T));
          continue;
        }
        transpose(cout, q1 - q0, dyn + q0, P, dst, coutp, static_cast<const T*>(nullptr));
      }
    };
    // Both copies in one parallel region, each thread an equal share of each (a region apiece
    // cost a fork and a join more per image).
    const int64_t x_rows = live * g.in_h, dy_blocks = dy_in_place ? 0 : live * qblocks;
    const int64_t elems = x_rows * g.in_w * cin + dy_blocks * 16 * cout;
    const int64_t parts = std::clamp<int64_t>(elems / 65536, 1, at::get_num_threads());
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      copy_x_rows(p0 * x_rows / parts, p1 * x_rows / parts);
      copy_dy_blocks(p0 * dy_blocks / parts, p1 * dy_blocks / parts);
    });
    // Slice sl's dY pixel rows (its image i), dy_ld apart.
    const int64_t dy_ld = dy_in_place ? cout : coutp;
    const auto dy_rows = [&](int64_t sl) {
      return dy_in_place ? dy + (sl * per_slice + i) * g.out_image() : dyt.data() + sl * P * coutp;
    };
    at::parallel_for(0, live * tasks, 1, [&](int64_t t0, int64_t t1) {
      const int64_t qmax = block_rows * g.out_w;
      std::vector<const T*> a(static_cast<size_t>(qmax)), b(static_cast<size_t>(qmax));
      for (int64_t oh0 = 0; oh0 < g.out_h; oh0 += block_rows) {
        const int64_t oh1 = std::min(g.out_h, oh0 + block_rows);
        const bool first = i == 0 && oh0 == 0;
        for (int64_t st = t0; st < t1; ++st) {
          const int64_t sl = s0 + st / tasks, t = st % tasks;
          const int64_t cb = t % co_blocks, pos = (t / co_blocks) % khw;
          const int64_t grp = t / (co_blocks * khw);
          const int64_t ki = pos / g.kernel_w, kj = pos % g.kernel_w;
          const int64_t co0 = grp * cout_g + cb * co_block;
          const int64_t m = std::min(co_block, cout_g - cb * co_block);
          // Padded row oh * sh + rh is row oh + rh / sh of phase rh % sh (columns alike).
          const int64_t rh = ki * g.dilation_h, rw = kj * g.dilation_w;
          const T* xn = xt.data() + sl * image + ((rh % sh) * sw + rw % sw) * phase +
                        ((rh / sh) * ws + rw / sw) * cinp + grp * cin_g;
          int64_t q = 0;
          for (int64_t oh = oh0; oh < oh1; ++oh) {
            const T* xrow = xn + oh * ws * cinp;
            const T* dyrow = dy_rows(sl) + oh * g.out_w * dy_ld + co0;
            for (int64_t ow = 0; ow < g.out_w; ++ow, ++q) {
              a[q] = dyrow + ow * dy_ld;
              b[q] = xrow + ow * cinp;
            }
          }
          gemm_indirect<T>(m, cin_g, q, a.data(), b.data(),
                           acc.data() + (sl * tasks + t) * acc_block, cin_g, 1,
                           /*accumulate=*/!first);
        }
      }
    });
  };
  // Each dW element is summed over its slice's images in order whatever the order of the
  // slices, so: on one thread slice after slice (one image's copies in cache at a time; two
  // slices side by side ran 6% slower), on more image i of every slice together.
  const auto images_of = [&](int64_t sl) { return std::min(per_slice, g.batch - sl * per_slice); };
  if (at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t sl = 0; sl < slices; ++sl)
      for (int64_t i = 0; i < images_of(sl); ++i) image_step(i, sl, sl + 1);
  } else {
    for (int64_t i = 0; i < per_slice; ++i)  // (the last slices may have run out)
      image_step(i, 0, std::min(slices, ceil_div(g.batch - i, per_slice)));
  }
  parallel_rows(tasks, acc_block, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t cb = t % co_blocks, pos = (t / co_blocks) % khw, grp = t / (co_blocks * khw);
      const int64_t co0 = grp * cout_g + cb * co_block;
      const int64_t m = std::min(co_block, cout_g - cb * co_block);
      const T* c = acc.data() + t * acc_block;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t ci = 0; ci < cin_g; ++ci) {
          T sum = c[i * cin_g + ci];
          for (int64_t sl = 1; sl < slices; ++sl) sum += c[sl * acc_slice + i * cin_g + ci];
          dw[((co0 + i) * cin_g + ci) * khw + pos] = sum;
        }
    }
  });
}

template void forward_implicit<float>(const Geometry&, const float*, const float*, const float*,
                                      float*, Order, Order, Order);
template void forward_implicit<double>(const Geometry&, const double*, const double*,
                                       const double*, double*, Order, Order, Order);
template void backward_input_implicit<float>(const Geometry&, const float*, const float*,
                                             float*, Order, Order);
template void backward_input_implicit<double>(const Geometry&, const double*, const double*,
                                              double*, Order, Order);
template void backward_weight_implicit<float>(const Geometry&, const float*, const float*,
                                              float*, Order, Order);
template void backward_weight_implicit<double>(const Geometry&, const double*, const double*,
                                               double*, Order, Order);

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
