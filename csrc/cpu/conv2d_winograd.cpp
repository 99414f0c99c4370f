// The Winograd algorithm F(2x2, 3x3) of the CPU conv2d forward, grad_input and grad_weight
// (interface: cpu/conv2d.h; when it is chosen: cpu/conv2d.cpp): 3x3, stride 1, dilation 1, one
// group, wide layers. Each 2x2 block of output pixels (a tile) is
//
//   Y_tile = A^T [ sum_ci (G g[co, ci] G^T) .* (B^T d[ci] B) ] A
//
// with d[ci] the tile's 4x4 input window of channel ci and g the 3x3 kernel (Lavin & Gray, "Fast
// Algorithms for Convolutional Neural Networks", 2015). Written per element xi of the 4x4
// transformed tile, the sum is 16 independent GEMMs over the channels:
//
//   M[xi][t][co] = sum_ci V[xi][ci][t] U[xi][ci][co]       U = G g G^T, V = B^T d B, t a tile
//
// 16 multiplies per tile and channel pair instead of the direct method's 36: 2.25x fewer FLOPs
// in the GEMMs, paid for by the input and output transforms (adds only, O(channels x tiles)).
//
// Layout: the work goes in blocks of whole tile rows (of one image or several), each run start
// to end by one thread: input transform, the 16 GEMMs, output transform, with the block's V and
// M (~half of L2) in its own scratch. V[xi][ci][t] has the tiles contiguous, so the input
// transform makes 16 tiles of a tile row at a time from 4 zero-padded input rows (two loads and
// an even / odd split per window column); M[xi][t][co] has the output channels contiguous, so
// each GEMM is tiles x output channels on gemm_indirect's widest tiles (6 x 64), reading V and
// U in place; the output transform writes the block's outputs channels-last and one transpose
// per image puts them in NCHW. U is transformed once per call, into column panels (u_panel).
// channels_last images (Order, cpu/conv2d.h) stay so: a channels_last output takes the staged
// rows as they are (plus the bias), and the rows of a channels_last input that a block reads are
// transposed into per-channel rows in the block's scratch (ChannelsLastRows), in cache. Before,
// conv2d.cpp copied the whole input into NCHW and the output back, two more passes over memory
// each (64->64 @56, batch 8: the forward 1.2-1.3x torch's channels_last time,
// benchmarks/results). The transforms and GEMMs are the same either way: the NCHW call's bits.
//
// Napkin math (conv2d 64->64, 3x3, 56x56, batch 8; reference machine: csrc/cpu/README.md):
// 925 M multiply-adds directly; here 16 x 6272 tiles x 64 x 64 = 411 M in the GEMMs, ~1.9 ms on
// 2 cores at ~220 GFLOP/s each, against ~4.2 ms for the implicit GEMM at the same rate. Measured
// (perf, one thread): the GEMMs ~45% of the time; reading the input (prefetched a channel
// ahead), the transforms and the NCHW transpose the rest. Blocks of whole images instead sent V
// and M (4x the input and output) to memory and back and lost to the implicit GEMM.
//
// Accuracy: the transforms' coefficients are 0, +-1 and +-1/2 (exact); each output sums the
// same products regrouped, so the rounding error grows by a small factor over the direct sum
// (float32, 60 random shapes against float64: at most 5.5e-7 of the largest output, torch's own
// 2.9e-7; grad_input 1.8e-7). Non-finite values would turn into NaNs where the direct
// sum has an Inf (Inf - Inf in a transform): an output that is not finite makes the call return
// false, and the caller computes the convolution on another path.
//
// Deterministic: every output's arithmetic depends on the shapes only (the blocks, gemm's
// plan), never on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/conv2d.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/transpose.h"

namespace pyengine {
namespace cpu {
namespace conv2d {
namespace {

constexpr int64_t kXi = 16;  // elements of a transformed tile

// The problem as the kernels see it: a stride-1 3x3 convolution of `in_c` channels of in_h x
// in_w into `out_c` channels of out_h x out_w, padded by pad_h / pad_w.
struct Problem {
  int64_t batch, in_c, in_h, in_w, out_c, out_h, out_w, pad_h, pad_w;
  int64_t th, tw;      // tile rows and columns per image
  int64_t tw_vec;      // tw rounded up to whole vectors
  int64_t cols;        // of a zero-padded input row
  Order in_order = Order::Nchw, out_order = Order::Nchw;
};

template <typename T>
constexpr int64_t lanes() {
  return 64 / static_cast<int64_t>(sizeof(T));
}

// U[xi] (in_c x out_c) is stored as column panels of the GEMM's widest tile (4 vectors), each
// panel's rows contiguous (in_c x width, the last panel narrower where out_c is not a multiple):
// a tile's B micro-panel is then one sequential run that the hardware prefetchers stream, where
// rows out_c apart were a page-crossing stride they missed (4 MB of U at 256 -> 256, read from
// L3 by every block: forward and grad_input @14, batch 8, 2 threads, 0.92x the time with rows,
// 128 -> 128 @28 0.95x, 64 -> 64 the same; both layouts in one build, alternating in-process).
template <typename T>
constexpr int64_t u_panel() {
  return 4 * lanes<T>();
}
// The offset in U[xi] of element (ci, co).
template <typename T>
PE_INLINE int64_t u_offset(int64_t in_c, int64_t out_c, int64_t ci, int64_t co) {
  const int64_t start = co / u_panel<T>() * u_panel<T>();
  const int64_t width = std::min(u_panel<T>(), out_c - start);
  return start * in_c + ci * width + (co - start);
}

template <typename T>
Problem make_problem(int64_t batch, int64_t in_c, int64_t in_h, int64_t in_w, int64_t out_c,
                     int64_t out_h, int64_t out_w, int64_t pad_h, int64_t pad_w) {
  constexpr int64_t L = lanes<T>();
  Problem p{batch, in_c, in_h, in_w, out_c, out_h, out_w, pad_h, pad_w, 0, 0, 0, 0};
  p.th = ceil_div(out_h, 2);
  p.tw = ceil_div(out_w, 2);
  p.tw_vec = round_up(p.tw, L);
  // Tile row r reads padded rows 2r .. 2r + 3 (rows past the input: zeros); a vector of tiles
  // from column 2 * tw0 reads columns up to 2 * tw0 + 2L + 1 < 2 * tw_vec + 2, zeros past the
  // input.
  p.cols = round_up(std::max(2 * p.tw_vec + 2, in_w + pad_w), L);
  return p;
}

// ---- Transforms (compiled per ISA level: cpu/isa.h) --------------------------------------------

// The helpers below pass 64-byte vectors by value; they are always inlined, so GCC's note that
// such a call's ABI differs without AVX-512 concerns no call that exists.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename T>
struct Vec {
  typedef T v __attribute__((vector_size(64)));
  typedef T uv __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  typedef decltype(v{} < v{}) i;  // lane masks / shuffle indices of the same width
};

// Whether every value a transform produced is finite, as a sum: x - x is 0 for a finite x and
// NaN for an Inf or NaN, so the sum stays 0 unless one is not. (A vector compare per output,
// masked to the real channels, compiled to a scalar compare per lane: ~half of output_tiles'
// time, perf.) A vector with fewer than L real lanes (the last, part one of the channels:
// the lanes past them were never written) is checked lane by lane.
template <typename T>
struct FiniteCheck {
  typename Vec<T>::v sum{};
  bool part_ok = true;

  PE_INLINE void add(typename Vec<T>::v x, int64_t lanes_real) {
    if (lanes_real == lanes<T>()) {
      sum += x - x;
    } else {
      for (int64_t l = 0; l < lanes_real; ++l) part_ok &= std::isfinite(x[l]);
    }
  }
  PE_INLINE bool ok() const {
    bool ok = part_ok;
    for (int64_t l = 0; l < lanes<T>(); ++l) ok &= sum[l] == T(0);
    return ok;
  }
};

template <typename T>
PE_INLINE typename Vec<T>::v load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::uv*>(p);
}
template <typename T>
PE_INLINE void store(T* p, typename Vec<T>::v v) {
  *reinterpret_cast<typename Vec<T>::uv*>(p) = v;
}

// V[xi][l] (xi's rows xi_ld apart) for the tiles tw0 + l of one tile row, whose four
// zero-padded input rows start at `r` (`cols` apart).
template <typename T>
PE_INLINE void input_tiles(const T* r, int64_t cols, int64_t tw0, T* v, int64_t xi_ld) {
  using V = typename Vec<T>::v;
  using I = typename Vec<T>::i;
  constexpr int64_t L = lanes<T>();
  I even, odd;
  for (int64_t l = 0; l < L; ++l) even[l] = 2 * l, odd[l] = 2 * l + 1;
  V d[4][4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const T* row = r + i * cols + 2 * tw0;
    const V lo = load(row), hi = load(row + L), lo2 = load(row + 2), hi2 = load(row + 2 + L);
    d[i][0] = __builtin_shuffle(lo, hi, even);
    d[i][1] = __builtin_shuffle(lo, hi, odd);
    d[i][2] = __builtin_shuffle(lo2, hi2, even);
    d[i][3] = __builtin_shuffle(lo2, hi2, odd);
  }
  // B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3); then the same on the columns.
  V e[4][4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    e[0][j] = d[0][j] - d[2][j];
    e[1][j] = d[1][j] + d[2][j];
    e[2][j] = d[2][j] - d[1][j];
    e[3][j] = d[1][j] - d[3][j];
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    store(v + (4 * i + 0) * xi_ld, e[i][0] - e[i][2]);
    store(v + (4 * i + 1) * xi_ld, e[i][1] + e[i][2]);
    store(v + (4 * i + 2) * xi_ld, e[i][2] - e[i][1]);
    store(v + (4 * i + 3) * xi_ld, e[i][1] - e[i][3]);
  }
}

// The tiles of one tile row into V (tile c at v[c], xi's rows xi_ld apart), from its four input
// rows src[i] (null: a padding row), copied zero-padded into rows4 (4 rows `cols` apart, whose
// padding columns are zero). Written as whole vectors: the last one runs into the next tile
// row's tiles (written next) or the block's spare columns.
template <typename T>
PE_INLINE void input_row_impl(const Problem& p, const T* const* src, T* rows4, T* v,
                              int64_t xi_ld) {
  using V = typename Vec<T>::v;
  constexpr int64_t L = lanes<T>();
  for (int i = 0; i < 4; ++i) {  // inline copies: a memcpy call per 56-float row cost more
    T* dst = rows4 + i * p.cols + p.pad_w;
    int64_t j = 0;
    if (src[i]) {
      for (; j + L <= p.in_w; j += L) store(dst + j, load(src[i] + j));
      for (; j < p.in_w; ++j) dst[j] = src[i][j];
    } else {
      for (; j + L <= p.in_w; j += L) store(dst + j, V{});
      for (; j < p.in_w; ++j) dst[j] = T(0);
    }
  }
  for (int64_t c0 = 0; c0 < p.tw; c0 += L) input_tiles<T>(rows4, p.cols, c0, v + c0, xi_ld);
}

// U[xi][ci][co0 + l] = (G g G^T)[xi] for the L kernels g of a block of output channels, given
// lane by lane in wl ([ci][9][L]; lanes past nco zero). G's rows: (1, 0, 0), (1/2, 1/2, 1/2),
// (1/2, -1/2, 1/2), (0, 0, 1).
template <typename T>
PE_INLINE void weights_block_impl(int64_t in_c, int64_t out_c, const T* wl, int64_t co0,
                                  int64_t nco, T* u) {
  using V = typename Vec<T>::v;
  constexpr int64_t L = lanes<T>();
  for (int64_t ci = 0; ci < in_c; ++ci) {
    V g[3][3];
    for (int k = 0; k < 9; ++k) g[k / 3][k % 3] = load(wl + (ci * 9 + k) * L);
    V gg[4][3];  // G g
    for (int j = 0; j < 3; ++j) {
      gg[0][j] = g[0][j];
      gg[1][j] = T(0.5) * (g[0][j] + g[1][j] + g[2][j]);
      gg[2][j] = T(0.5) * (g[0][j] - g[1][j] + g[2][j]);
      gg[3][j] = g[2][j];
    }
    for (int i = 0; i < 4; ++i) {  // (G g) G^T
      const V r[4] = {gg[i][0], T(0.5) * (gg[i][0] + gg[i][1] + gg[i][2]),
                      T(0.5) * (gg[i][0] - gg[i][1] + gg[i][2]), gg[i][2]};
      for (int j = 0; j < 4; ++j) {
        T* dst = u + (4 * i + j) * in_c * out_c + u_offset<T>(in_c, out_c, ci, co0);
        if (nco == L) {
          store(dst, r[j]);
        } else {  // the last block: its row ends where another thread's block begins
          for (int64_t l = 0; l < nco; ++l) dst[l] = r[j][l];
        }
      }
    }
  }
}

// The 2x2 outputs of one tile row's tiles, channels-last, into stage (tile c's output pixel
// (a, 2c + b) at stage[(a * out_w + 2c + b) * stage_ld + co]; an odd out_w's last column, which
// came from the padding, not stored: it would land on the next row), from M (tile c's channels
// at m[c * out_ld], xi's blocks xi_ld apart). Returns whether every output of a real channel is
// finite.
template <typename T>
PE_INLINE bool output_tiles_impl(const Problem& p, const T* m, int64_t xi_ld, int64_t out_ld,
                                 T* stage, int64_t stage_ld) {
  using V = typename Vec<T>::v;
  constexpr int64_t L = lanes<T>();
  FiniteCheck<T> finite;
  for (int64_t co0 = 0; co0 < p.out_c; co0 += L) {
    const int64_t nco = std::min(L, p.out_c - co0);
    for (int64_t c = 0; c < p.tw; ++c) {
      const T* mt = m + c * out_ld + co0;
      V s[2][4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {  // A^T M: rows (m0 + m1 + m2, m1 - m2 - m3)
        const V m0 = load(mt + (0 + j) * xi_ld), m1 = load(mt + (4 + j) * xi_ld);
        const V m2 = load(mt + (8 + j) * xi_ld), m3 = load(mt + (12 + j) * xi_ld);
        s[0][j] = m0 + m1 + m2;
        s[1][j] = m1 - m2 - m3;
      }
      const bool second = 2 * c + 1 < p.out_w;
#pragma GCC unroll 2
      for (int a = 0; a < 2; ++a) {  // then the columns
        const V u0 = s[a][0] + s[a][1] + s[a][2], u1 = s[a][1] - s[a][2] - s[a][3];
        finite.add(u0, nco);
        finite.add(u1, nco);
        T* dst = stage + (a * p.out_w + 2 * c) * stage_ld + co0;
        store(dst, u0);
        if (second) store(dst + stage_ld, u1);
      }
    }
  }
  return finite.ok();
}

// grad_weight is the forward's adjoint in g: dW = G^T [ sum_t (A dy_t A^T) .* (B^T d_t B) ] G,
// dy_t a tile's 2x2 of dY and d_t its 4x4 input window (the forward's V): 16 GEMMs summing over
// the tiles, then a 4x4 -> 3x3 transform per (co, ci).
//
// DY[xi][t0 + l] (xi's rows xi_ld apart) = (A dy A^T)[xi] for the tiles t0 + l of one tile row,
// from its two dY rows in rows2 (`cols` apart, zero past out_w and in a row past out_h).
// A's rows: (1, 0), (1, 1), (1, -1), (0, -1).
template <typename T>
PE_INLINE void dy_tiles(const T* rows2, int64_t cols, int64_t c0, T* dyt, int64_t xi_ld) {
  using V = typename Vec<T>::v;
  using I = typename Vec<T>::i;
  constexpr int64_t L = lanes<T>();
  I even, odd;
  for (int64_t l = 0; l < L; ++l) even[l] = 2 * l, odd[l] = 2 * l + 1;
  V p[2], q[2];  // the tiles' columns 0 and 1, rows 0 and 1
#pragma GCC unroll 2
  for (int a = 0; a < 2; ++a) {
    const T* row = rows2 + a * cols + 2 * c0;
    const V lo = load(row), hi = load(row + L);
    p[a] = __builtin_shuffle(lo, hi, even);
    q[a] = __builtin_shuffle(lo, hi, odd);
  }
  const V rp[4] = {p[0], p[0] + p[1], p[0] - p[1], -p[1]};  // A dy, column 0
  const V rq[4] = {q[0], q[0] + q[1], q[0] - q[1], -q[1]};  // column 1
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // then (A dy) A^T along the rows
    store(dyt + (4 * i + 0) * xi_ld, rp[i]);
    store(dyt + (4 * i + 1) * xi_ld, rp[i] + rq[i]);
    store(dyt + (4 * i + 2) * xi_ld, rp[i] - rq[i]);
    store(dyt + (4 * i + 3) * xi_ld, -rq[i]);
  }
}

// One tile row of DY from dY rows y0 and y1 (y1 null past an odd out_h), through rows2 (2 rows
// `cols` apart; zero from out_w on, never written there).
template <typename T>
PE_INLINE void dy_row_impl(const Problem& p, const T* y0, const T* y1, T* rows2, int64_t cols,
                           T* dyt, int64_t xi_ld) {
  constexpr int64_t L = lanes<T>();
  const T* src[2] = {y0, y1};
  for (int a = 0; a < 2; ++a) {
    T* dst = rows2 + a * cols;
    int64_t j = 0;
    if (src[a]) {
      for (; j + L <= p.out_w; j += L) store(dst + j, load(src[a] + j));
      for (; j < p.out_w; ++j) dst[j] = src[a][j];
    } else {
      for (; j < p.out_w; ++j) dst[j] = T(0);
    }
  }
  for (int64_t c0 = 0; c0 < p.tw; c0 += L) dy_tiles<T>(rows2, cols, c0, dyt + c0, xi_ld);
}

// dW[co][ci][.][.] = G^T S[.][co][ci] G for one output channel (S's xi blocks xi_ld apart, ci
// contiguous), through stage (9 x L). G^T's rows: (1, 1/2, 1/2, 0), (0, 1/2, -1/2, 0),
// (0, 1/2, 1/2, 1). Returns whether every value is finite.
template <typename T>
PE_INLINE bool weight_grad_row_impl(int64_t in_c, const T* s, int64_t xi_ld, T* dw, T* stage) {
  using V = typename Vec<T>::v;
  constexpr int64_t L = lanes<T>();
  FiniteCheck<T> finite;
  for (int64_t c0 = 0; c0 < in_c; c0 += L) {
    const int64_t n = std::min(L, in_c - c0);
    V t[3][4];  // G^T S
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const V s0 = load(s + (0 + j) * xi_ld + c0), s1 = load(s + (4 + j) * xi_ld + c0);
      const V s2 = load(s + (8 + j) * xi_ld + c0), s3 = load(s + (12 + j) * xi_ld + c0);
      t[0][j] = s0 + T(0.5) * (s1 + s2);
      t[1][j] = T(0.5) * (s1 - s2);
      t[2][j] = T(0.5) * (s1 + s2) + s3;
    }
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) {  // then (G^T S) G
      const V k0 = t[i][0] + T(0.5) * (t[i][1] + t[i][2]);
      const V k1 = T(0.5) * (t[i][1] - t[i][2]);
      const V k2 = T(0.5) * (t[i][1] + t[i][2]) + t[i][3];
      finite.add(k0, n);
      finite.add(k1, n);
      finite.add(k2, n);
      store(stage + (3 * i + 0) * L, k0);
      store(stage + (3 * i + 1) * L, k1);
      store(stage + (3 * i + 2) * L, k2);
    }
    for (int64_t l = 0; l < n; ++l)
      for (int64_t k = 0; k < 9; ++k) dw[(c0 + l) * 9 + k] = stage[k * L + l];
  }
  return finite.ok();
}

#define PE_DEFINE_WINOGRAD(T)                                                                  \
  PE_ISA_FUNCTION(Family::Conv2d, void, input_row,                                             \
                  (const Problem& p, const T* const* src, T* rows4, T* v, int64_t xi_ld),      \
                  (p, src, rows4, v, xi_ld), input_row_impl<T>)                                \
  PE_ISA_FUNCTION(Family::Conv2d, bool, output_tiles,                                          \
                  (const Problem& p, const T* m, int64_t xi_ld, int64_t out_ld, T* stage,      \
                   int64_t stage_ld),                                                          \
                  (p, m, xi_ld, out_ld, stage, stage_ld), output_tiles_impl<T>)                \
  PE_ISA_FUNCTION(Family::Conv2d, void, weights_block,                                         \
                  (int64_t in_c, int64_t out_c, const T* wl, int64_t co0, int64_t nco, T* u),  \
                  (in_c, out_c, wl, co0, nco, u), weights_block_impl<T>)                       \
  PE_ISA_FUNCTION(Family::Conv2d, void, dy_row,                                                \
                  (const Problem& p, const T* y0, const T* y1, T* rows2, int64_t cols, T* dyt,  \
                   int64_t xi_ld),                                                             \
                  (p, y0, y1, rows2, cols, dyt, xi_ld), dy_row_impl<T>)                        \
  PE_ISA_FUNCTION(Family::Conv2d, bool, weight_grad_row,                                       \
                  (int64_t in_c, const T* s, int64_t xi_ld, T* dw, T* stage),                  \
                  (in_c, s, xi_ld, dw, stage), weight_grad_row_impl<T>)
PE_DEFINE_WINOGRAD(float)
PE_DEFINE_WINOGRAD(double)
#undef PE_DEFINE_WINOGRAD

// U[xi][ci][co] = (G g G^T)[xi] for the kernel g of output channel co and input channel ci, in
// U's panels (u_offset), in blocks of a vector of output channels (weights_block). w is the
// forward's weight (out_c, in_c, 3, 3), or with `flip` the grad_input's: the forward weight
// (in_c, out_c, 3, 3) of the layer whose grad_input this is, each kernel flipped in both axes.
// A block's kernels are first gathered channel-minor (wl[(ci * 9 + j) * L + l]): from the
// forward's weight, one blocked transpose of its rows; from the flipped one, where a block's L
// channels are adjacent, a L x 9 transpose per input channel with its 9 rows reversed. (An
// element-by-element gather, strided on one side, took 5% of a 256 -> 256 forward @14: perf,
// one thread.)
template <typename T>
void transform_weights(int64_t in_c, int64_t out_c, const T* w, bool flip, T* u) {
  constexpr int64_t L = lanes<T>();
  at::parallel_for(0, ceil_div(out_c, L), 1, [&](int64_t b0, int64_t b1) {
    CachedBuffer<T> wl(static_cast<size_t>(in_c * 9 * L));  // zeros: lanes past out_c
    T unflipped[9 * L] = {};
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t co0 = blk * L, nco = std::min(L, out_c - co0);
      if (!flip) {
        transpose(nco, in_c * 9, w + co0 * in_c * 9, in_c * 9, wl.data(), L,
                  static_cast<const T*>(nullptr));
        weights_block(in_c, out_c, wl.data(), co0, nco, u);
        continue;
      }
      for (int64_t ci = 0; ci < in_c; ++ci) {
        transpose(nco, int64_t(9), w + (ci * out_c + co0) * 9, int64_t(9), unflipped, L,
                  static_cast<const T*>(nullptr));
        for (int64_t j = 0; j < 9; ++j)
          std::memcpy(wl.data() + (ci * 9 + j) * L, unflipped + (8 - j) * L, L * sizeof(T));
      }
      weights_block(in_c, out_c, wl.data(), co0, nco, u);
    }
  });
}

// The four input rows of tile row `row` (image row / th, tile row row % th) of channel c of x
// (NCHW), null for a padding row; with prefetch_next, the next channel's same rows are fetched
// ahead: a channel's few rows in a block are too short a run for the hardware prefetchers (the
// forward's input reads stalled a quarter of its time without).
template <typename T>
void window_rows(const Problem& p, const T* x, int64_t row, int64_t c, bool prefetch_next,
                 const T* src[4]) {
  const int64_t n = row / p.th, ih0 = 2 * (row % p.th) - p.pad_h, plane = p.in_h * p.in_w;
  const T* xc = x + (n * p.in_c + c) * plane;
  for (int64_t i = 0; i < 4; ++i) {
    const int64_t ih = ih0 + i;
    src[i] = ih >= 0 && ih < p.in_h ? xc + ih * p.in_w : nullptr;
    if (src[i] && prefetch_next && c + 1 < p.in_c)
      for (int64_t j = 0; j < p.in_w; j += 64 / int64_t(sizeof(T)))
        __builtin_prefetch(src[i] + plane + j);
  }
}

// A block's input rows from a channels-last x, as window_rows gives them from an NCHW one: each
// image row that the block's tile rows read (consecutive tile rows share two) is transposed
// once into `planes` (slot s of channel c at planes[c * ld + s * in_w]), which stay in cache for
// the block's transforms.
template <typename T>
struct ChannelsLastRows {
  int64_t in_w, ld;
  std::vector<int64_t> slot;  // per tile row of the block and window row: its slot, -1 padding
  CachedBuffer<T> planes;

  ChannelsLastRows(const Problem& p, int64_t rows_per_block)
      : in_w(p.in_w),
        ld(4 * rows_per_block * p.in_w),
        slot(static_cast<size_t>(4 * rows_per_block)),
        planes(static_cast<size_t>(p.in_c * ld), /*zero=*/false) {}

  // For tile rows [r0, r0 + nrows) of the batch (tile row / th: its image).
  void fill(const Problem& p, const T* x, int64_t r0, int64_t nrows) {
    int64_t slots = 0, last_n = -1, last_ih = 0;
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t n = (r0 + r) / p.th, ih0 = 2 * ((r0 + r) % p.th) - p.pad_h;
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t ih = ih0 + i;
        int64_t& s = slot[static_cast<size_t>(4 * r + i)];
        if (ih < 0 || ih >= p.in_h) {
          s = -1;
        } else if (n == last_n && ih <= last_ih) {  // the tile row before read it too
          s = slots - 1 - (last_ih - ih);
        } else {
          s = slots++;
          last_n = n;
          last_ih = ih;
          transpose(p.in_w, p.in_c, x + (n * p.in_h + ih) * p.in_w * p.in_c, p.in_c,
                    planes.data() + s * p.in_w, ld, static_cast<const T*>(nullptr));
        }
      }
    }
  }
  // window_rows' src for tile row r of the block, channel c.
  void window(int64_t r, int64_t c, const T* src[4]) const {
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t s = slot[static_cast<size_t>(4 * r + i)];
      src[i] = s < 0 ? nullptr : planes.data() + c * ld + s * in_w;
    }
  }
};

// The convolution of x into y (each NCHW or channels-last: p.in_order, p.out_order) with
// transformed weights u, plus bias (or none), in blocks of tile rows (the file's header says
// why). False where an output is not finite (y then partly written).
template <typename T>
bool convolve(const Problem& p, const T* x, const T* u, const T* bias, T* y) {
  constexpr int64_t L = lanes<T>();
  // Blocks of ~512 KB of V and M; ~1.6 MB where U exceeds 1 MB. Every block reads all of U
  // (16 in_c x out_c matrices) once, from L3 when U is larger than L2 can keep beside V and M:
  // at 256 -> 256 (4 MB of U) blocks of 14 tiles spent more time waiting for U than multiplying
  // (forward @14, batch 8: one thread 12.5 -> 10.8 ms with blocks of 49 tiles, one image; two
  // threads 6.5 -> 5.9, 6.05 with blocks of 42). Wider layers still wait: 512 -> 512 has 16 MB
  // of U for blocks of 25 tiles (splitting U by output channels would be the next step).
  const int64_t per_tile = kXi * (p.in_c + p.out_c) * int64_t(sizeof(T));
  const int64_t u_bytes = kXi * p.in_c * p.out_c * int64_t(sizeof(T));
  const int64_t budget = (u_bytes > (int64_t(1) << 20) ? 1600 : 512) << 10;
  const int64_t rows_per_block = std::clamp<int64_t>(budget / per_tile / p.tw, 1, p.batch * p.th);
  const int64_t blocks = ceil_div(p.batch * p.th, rows_per_block);
  // V[xi][ci][t]: a block's tiles, then room for the last vector's spill (never read).
  // M[xi][t][co]: the GEMMs' rows are the tiles, their vectors the output channels (whole
  // 4-vector panels at 64 channels; along the tiles, a block's 56 made ragged ones).
  const int64_t ld = round_up(rows_per_block * p.tw + L, L);
  const int64_t out_ld = round_up(p.out_c, L), m_xi = rows_per_block * p.tw * out_ld;
  const int64_t out_plane = p.out_h * p.out_w;
  std::atomic<bool> finite{true};
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    CachedBuffer<T> v(static_cast<size_t>(kXi * p.in_c * ld), /*zero=*/false);
    CachedBuffer<T> m(static_cast<size_t>(kXi * m_xi), /*zero=*/false);
    CachedBuffer<T> rows4(static_cast<size_t>(4 * p.cols));  // zeros: the padding columns
    // The block's outputs channels-last: output row 2r + a of its tile row r at stage row
    // (2r + a) * out_w (an odd out_h's last tile row has a second row from the padding: never
    // stored to y), so that an image's rows are one run per channel in NCHW.
    CachedBuffer<T> stage(static_cast<size_t>(2 * rows_per_block * p.out_w * out_ld),
                          /*zero=*/false);
    std::vector<const T*> a(static_cast<size_t>(p.in_c)), b(static_cast<size_t>(p.in_c));
    std::optional<ChannelsLastRows<T>> cl_rows;
    if (p.in_order == Order::ChannelsLast) cl_rows.emplace(p, rows_per_block);
    bool ok = true;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows_per_block;
      const int64_t nrows = std::min(rows_per_block, p.batch * p.th - r0), count = nrows * p.tw;
      if (cl_rows) cl_rows->fill(p, x, r0, nrows);
      for (int64_t ci = 0; ci < p.in_c; ++ci)
        for (int64_t r = 0; r < nrows; ++r) {
          const T* src[4];
          if (cl_rows)
            cl_rows->window(r, ci, src);
          else
            window_rows(p, x, r0 + r, ci, /*prefetch_next=*/true, src);
          input_row(p, src, rows4.data(), v.data() + ci * ld + r * p.tw, p.in_c * ld);
        }
      // M[xi] (count x out_c) = V[xi]^T (count x in_c) U[xi] (in_c x out_c), read in place,
      // a panel of U at a time.
      for (int64_t xi = 0; xi < kXi; ++xi) {
        for (int64_t k = 0; k < p.in_c; ++k) a[k] = v.data() + (xi * p.in_c + k) * ld;
        for (int64_t co = 0; co < p.out_c; co += u_panel<T>()) {
          const T* panel = u + xi * p.in_c * p.out_c + u_offset<T>(p.in_c, p.out_c, 0, co);
          const int64_t width = std::min(u_panel<T>(), p.out_c - co);
          for (int64_t k = 0; k < p.in_c; ++k) b[k] = panel + k * width;
          gemm_indirect<T>(count, width, p.in_c, a.data(), b.data(), m.data() + xi * m_xi + co,
                           out_ld, 1, /*accumulate=*/false);
        }
      }
      for (int64_t r = 0; r < nrows; ++r)
        ok &= output_tiles(p, m.data() + r * p.tw * out_ld, m_xi, out_ld,
                           stage.data() + 2 * r * p.out_w * out_ld, out_ld);
      // Into y, plus the bias: per image in the block, one transpose into NCHW or the rows as
      // they are into channels-last.
      for (int64_t r = 0; r < nrows;) {
        const int64_t n = (r0 + r) / p.th, th0 = (r0 + r) % p.th;
        const int64_t run = std::min(nrows - r, p.th - th0);  // tile rows of image n
        const int64_t oh0 = 2 * th0, oh1 = std::min(p.out_h, 2 * (th0 + run));
        const T* staged = stage.data() + 2 * r * p.out_w * out_ld;
        if (p.out_order == Order::ChannelsLast)
          store_pixel_rows(staged, out_ld, (oh1 - oh0) * p.out_w, p.out_c, bias,
                           y + (n * out_plane + oh0 * p.out_w) * p.out_c, p.out_c);
        else
          transpose((oh1 - oh0) * p.out_w, p.out_c, staged, out_ld,
                    y + n * p.out_c * out_plane + oh0 * p.out_w, out_plane, bias);
        r += run;
      }
    }
    if (!ok) finite = false;
  });
  return finite;
}

// Blocks of tile rows as in convolve (here ~4 MB of V and DY, as the GEMMs only read them), in
// order; per block the transforms (a task per channel), then the 16 GEMMs (a task per xi, each
// adding the block to its own S[xi]: every sum in block order, whatever the threads).
template <typename T>
bool weight_grad(const Problem& p, const T* x, const T* dy, T* dw) {
  constexpr int64_t L = lanes<T>();
  const int64_t per_tile = kXi * (p.in_c + p.out_c) * int64_t(sizeof(T));
  const int64_t rows_per_block =
      std::clamp<int64_t>((int64_t(4) << 20) / per_tile / p.tw, 1, p.batch * p.th);
  const int64_t ld = round_up(rows_per_block * p.tw + L, L);
  const int64_t dy_cols = 2 * p.tw_vec;
  CachedBuffer<T> v(static_cast<size_t>(kXi * p.in_c * ld), /*zero=*/false);
  CachedBuffer<T> dyt(static_cast<size_t>(kXi * p.out_c * ld), /*zero=*/false);
  CachedBuffer<T> sums(static_cast<size_t>(kXi * p.out_c * p.in_c), /*zero=*/false);
  const int64_t out_plane = p.out_h * p.out_w;
  for (int64_t r0 = 0; r0 < p.batch * p.th; r0 += rows_per_block) {
    const int64_t nrows = std::min(rows_per_block, p.batch * p.th - r0), count = nrows * p.tw;
    at::parallel_for(0, p.in_c + p.out_c, 1, [&](int64_t c0, int64_t c1) {
      CachedBuffer<T> rows4(static_cast<size_t>(4 * p.cols));      // zeros: the padding
      CachedBuffer<T> rows2(static_cast<size_t>(2 * dy_cols));     // zeros: past out_w
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t n = (r0 + r) / p.th, th = (r0 + r) % p.th;
          if (c < p.in_c) {
            const T* src[4];
            window_rows(p, x, r0 + r, c, /*prefetch_next=*/false, src);
            input_row(p, src, rows4.data(), v.data() + c * ld + r * p.tw, p.in_c * ld);
          } else {
            const int64_t co = c - p.in_c;
            const T* y0 = dy + (n * p.out_c + co) * out_plane + 2 * th * p.out_w;
            dy_row(p, y0, 2 * th + 1 < p.out_h ? y0 + p.out_w : nullptr, rows2.data(), dy_cols,
                   dyt.data() + co * ld + r * p.tw, p.out_c * ld);
          }
        }
    });
    // S[xi] (out_c x in_c) += DY[xi] (out_c x count) V[xi]^T (count x in_c).
    at::parallel_for(0, kXi, 1, [&](int64_t x0, int64_t x1) {
      for (int64_t xi = x0; xi < x1; ++xi)
        gemm<T>(p.out_c, p.in_c, count, dyt.data() + xi * p.out_c * ld, ld, 1,
                v.data() + xi * p.in_c * ld, 1, ld, sums.data() + xi * p.out_c * p.in_c, p.in_c,
                1, /*accumulate=*/r0 > 0);
    });
  }
  std::atomic<bool> finite{true};
  at::parallel_for(0, p.out_c, 1, [&](int64_t c0, int64_t c1) {
    CachedBuffer<T> stage(static_cast<size_t>(9 * L), /*zero=*/false);
    bool ok = true;
    for (int64_t co = c0; co < c1; ++co)
      ok &= weight_grad_row(p.in_c, sums.data() + co * p.in_c, p.out_c * p.in_c,
                            dw + co * p.in_c * 9, stage.data());
    if (!ok) finite = false;
  });
  return finite;
}

// The forward's problem (grad_weight's too).
template <typename T>
Problem forward_problem(const Geometry& g) {
  return make_problem<T>(g.batch, g.in_channels, g.in_h, g.in_w, g.out_channels, g.out_h,
                         g.out_w, g.padding_h, g.padding_w);
}

// convolve() with the weights w of transform_weights (flipped or not): the forward's and
// grad_input's one path.
template <typename T>
bool convolve_with(const Problem& p, const T* w, bool flip, const T* x, const T* bias, T* y) {
  CachedBuffer<T> u(static_cast<size_t>(kXi * p.in_c * p.out_c), /*zero=*/false);
  transform_weights<T>(p.in_c, p.out_c, w, flip, u.data());
  return convolve<T>(p, x, u.data(), bias, y);
}

}  // namespace

bool winograd_fits(const Geometry& g) {
  // 3x3, stride 1, undilated, one group; padding at most 2 (grad_input's is then 2 - padding);
  // both channel counts wide enough for the GEMMs' panels (below 32 the implicit GEMM's fewer
  // passes over memory win).
  return g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 && g.stride_w == 1 &&
         g.dilation_h == 1 && g.dilation_w == 1 && g.groups == 1 && g.padding_h <= 2 &&
         g.padding_w <= 2 && g.in_channels >= 32 && g.out_channels >= 32 && g.out_h >= 2 &&
         g.out_w >= 2 && g.in_h >= 2 && g.in_w >= 2;
}

bool winograd_fits_backward_weight(const Geometry& g) {
  // The GEMMs' work per tile grows with in x out channels, the transforms' with in + out: at
  // 64 -> 64 the transforms (through L3) cost more than the multiplies saved (grad_weight 64->64
  // @32 b16, 2 threads: 4.0 ms implicit, 5.0 Winograd), at 128 -> 128 and above they do not
  // (@28 b8: 6.0 -> 4.9 ms; 256 @14: 6.1 -> 4.5).
  return winograd_fits(g) &&
         g.in_channels * g.out_channels >= 64 * (g.in_channels + g.out_channels);
}

template <typename T>
bool forward_winograd(const Geometry& g, const T* x, const T* w, const T* bias, T* y,
                      Order x_order, Order y_order) {
  Problem p = forward_problem<T>(g);
  p.in_order = x_order;
  p.out_order = y_order;
  return convolve_with<T>(p, w, /*flip=*/false, x, bias, y);
}

template <typename T>
bool backward_input_winograd(const Geometry& g, const T* dy, const T* w, T* dx, Order dy_order,
                             Order dx_order) {
  // dX = conv(dY, W'), stride 1, padding 2 - p, W'[ci][co] = W[co][ci] flipped in both axes.
  Problem p = make_problem<T>(g.batch, g.out_channels, g.out_h, g.out_w, g.in_channels, g.in_h,
                              g.in_w, 2 - g.padding_h, 2 - g.padding_w);
  p.in_order = dy_order;
  p.out_order = dx_order;
  return convolve_with<T>(p, w, /*flip=*/true, dy, nullptr, dx);
}

template <typename T>
bool backward_weight_winograd(const Geometry& g, const T* dy, const T* x, T* dw) {
  return weight_grad<T>(forward_problem<T>(g), x, dy, dw);
}

template bool forward_winograd<float>(const Geometry&, const float*, const float*, const float*,
                                      float*, Order, Order);
template bool forward_winograd<double>(const Geometry&, const double*, const double*,
                                       const double*, double*, Order, Order);
template bool backward_input_winograd<float>(const Geometry&, const float*, const float*,
                                             float*, Order, Order);
template bool backward_input_winograd<double>(const Geometry&, const double*, const double*,
                                              double*, Order, Order);
template bool backward_weight_winograd<float>(const Geometry&, const float*, const float*,
                                              float*);
template bool backward_weight_winograd<double>(const Geometry&, const double*, const double*,
                                               double*);

}  // namespace conv2d
}  // namespace cpu
}  // namespace pyengine
