#pragma once
// pyengine's one CPU matrix multiply, shared by conv2d and linear.
//
//   C[i, j] (+)= sum_k A[i, k] * B[k, j]      0 <= i < M, 0 <= j < N, 0 <= k < K
//
// Every operand is a strided view: element (r, c) of X lives at X[r * rs + c * cs], so transposed
// operands (backward: dX = dY W, dW = dY^T X) cost nothing to describe; the outer-product
// kernels copy both operands into contiguous panels (unless a panel is read only once), the dot
// kernel reads them in place.
//
// Design (gemm.cpp has the details and the napkin math):
//   * Register-tiled micro-kernels written once with GCC vector extensions and compiled three
//     times, for AVX-512, AVX2+FMA and baseline x86-64, in target-attributed functions; the level
//     is cpu/isa.h's run-time choice (isa_for(Family::Gemm)), never -march=native:
//       - "outer product": an MR x NR tile of C in registers (AVX-512 fp32: 24x16, 12x32 or
//         6x64); per k, NR/W vector loads of B's row and MR broadcasts of A's column. Needs unit
//         stride along j in B and along i in A, else that operand is packed first (the 6-row
//         tile broadcasts from a row-major A's rows in place instead).
//       - "dot": RA x RB dot products vectorised along k, for A and B^T both contiguous along k
//         (dW = dY^T X in conv2d, y = x W^T in linear): no packing at all, so it wins where the
//         packing would not pay (few rows: linear below ~64 rows of input).
//     A plan (which kernel, which orientation: C or C^T = B^T A^T, which tile width) is chosen from
//     the shapes and strides alone by a small cost model (calibrated on the reference machine:
//     csrc/cpu/README.md).
//   * Cache blocking over k (KC), rows (MC) and columns (NC). No scalar tails: partial row tiles
//     run as a few kernels from a ladder of compiled row counts, partial column panels as
//     narrower kernels or a zero-padded panel, the k tail of a dot product as a zero-padded vector.
//   * gemm_indirect / gemm_dot_segments: the same kernels with operands found through pointer
//     tables, for conv2d's implicit im2col (batch-innermost layout).
//
// Determinism: the arithmetic for each C element depends only on the shapes, the strides' layout
// and the ISA, never on the number of threads or on how gemm_parallel splits the work: every C
// element is computed by one task, summing over k in a fixed order.
#include <cstdint>

namespace pyengine {
namespace cpu {

// Single-threaded: callers that already run inside at::parallel_for use this one.
// accumulate=false overwrites C (K == 0 then writes zeros); accumulate=true adds to C.
// bias (with accumulate=false only), when not null: C[i, j] = bias[j] + sum_k ..., or bias[i]
// where bias_per_row; the same bits as C filled with the bias and accumulate=true, but added
// to each tile of C as its first k block is stored (a bias per row: the tile set to it just
// before its first products, in cache). Filling a whole C first cost a pass over memory: 1.2 of
// 6.2 ms of a channels_last 64->256 1x1 conv2d's forward; setting each tile, 11% of it.
// gemm_parallel streams a large C written once past the caches (gemm.cpp: kStreamBytes).
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B,
          int64_t rsb, int64_t csb, T* C, int64_t rsc, int64_t csc, bool accumulate,
          const T* bias = nullptr, bool bias_per_row = false);

// The same product, split into tiles of C run with at::parallel_for (one per thread). The plan
// (kernel, orientation) depends on the shapes only and each C element's arithmetic not on its
// tile: the result is bitwise identical for any torch.set_num_threads. Each task packs its own
// panels from the operands' strides; the plan is gemm()'s.
template <typename T>
void gemm_parallel(int64_t M, int64_t N, int64_t K, const T* A, int64_t rsa, int64_t csa,
                   const T* B, int64_t rsb, int64_t csb, T* C, int64_t rsc, int64_t csc,
                   bool accumulate, const T* bias = nullptr, bool bias_per_row = false);

// Outer product over pointer tables (single-threaded): C[i, j] (+)= sum_k a[k][i] * b[k][j], where
// a[k] holds M and b[k] N contiguous elements. conv2d's implicit im2col: with the batch innermost,
// the rows of a convolution tap are contiguous vectors anywhere in the input, so the table lists
// them (and can leave out taps that fall in the padding) instead of copying them.
// a_rows, when not null, gathers A's rows: A element (i, k) is a[k][a_rows[i]] (conv2d's implicit
// GEMM over output pixels skips the padded input's columns past each output row). Gathered tiles
// are the widest kind (4 vectors of columns): worth it where N is at least that wide.
// bias, when not null: C[i, j] = (sum + bias[j]) after the sum over every k, each tile as its
// last k block is stored: the bits of adding the bias to C afterwards, without that pass.
// c_rows, when not null, scatters C's rows: C element (i, j) is C[c_rows[i] + j * csc] (rsc
// unused; conv2d's strided grad_input stores a phase's pixels straight into a channels-last dX).
// tile_vectors (1, 2 or 4; 0: gemm_indirect_tile_vectors' pick for these sizes) is the widest
// tile, which also sets the k block: each C element's bits depend on it, not on N, so callers
// that split the columns of one product over several calls pass one choice to all of them.
template <typename T>
void gemm_indirect(int64_t M, int64_t N, int64_t K, const T* const* a, const T* const* b, T* C,
                   int64_t rsc, int64_t csc, bool accumulate, const int64_t* a_rows = nullptr,
                   const T* bias = nullptr, const int64_t* c_rows = nullptr,
                   int tile_vectors = 0);
// The cost model's widest tile for gemm_indirect of these sizes (without a_rows).
template <typename T>
int gemm_indirect_tile_vectors(int64_t M, int64_t N, int64_t K, int64_t csc);

// Dot products over segments, split over tiles of C with at::parallel_for (by shape only):
// C[i, j] (+)= sum over s < nseg, t < len of A[i * rsa + s * sa + t] * b[s * N + j][t].
// conv2d's grad_weight with the batch innermost: a segment per output pixel, t over the batch.
template <typename T>
void gemm_dot_segments(int64_t M, int64_t N, int64_t nseg, int64_t len, const T* A, int64_t rsa,
                       int64_t sa, const T* const* b, T* C, int64_t rsc, int64_t csc,
                       bool accumulate);

// bfloat16 (as uint16_t bits) operands, float32 accumulation, on AVX512_BF16's dot products
// (cpu/gemm_bf16.cpp), split over column panels with at::parallel_for (by shape only, so
// thread-count independent). C is float32 (accumulate adds to it) or bfloat16 (each result
// rounded once, to nearest even); bias, when not null, is added per column before rounding.
// Only where gemm_bf16_available() (isa_for(Family::GemmBf16) is amx_bf16 or avx512_bf16).
bool gemm_bf16_available();
void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t rsa, int64_t csa,
               const uint16_t* B, int64_t rsb, int64_t csb, float* C, int64_t rsc, int64_t csc,
               bool accumulate, const float* bias = nullptr);
void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t rsa, int64_t csa,
               const uint16_t* B, int64_t rsb, int64_t csb, uint16_t* C, int64_t rsc,
               int64_t csc, const float* bias = nullptr);

// A row stride (in elements) for n-element rows that gemm_indirect reads in place, kept off
// multiples of 512 bytes: L1 (48 KB, 12-way, 64 sets of 64 B lines) maps rows 1 KB apart to 16 of
// its sets, so a 64-wide tile's kc-row panel (256 lines) no longer fitted and was evicted while
// the tiles reused it. One spare line per row spreads the rows over every set: conv2d's 256- and
// 128-channel implicit GEMMs ran 7-12% faster (forward, 3x3, batch 8).
template <typename T>
constexpr int64_t in_place_ld(int64_t n) {
  return (n * int64_t(sizeof(T))) % 512 == 0 ? n + 64 / int64_t(sizeof(T)) : n;
}

// Elements per SIMD vector of the ISA in use (16 floats with AVX-512): lets callers pad their
// scratch rows so that dot-kernel reductions need no tail.
template <typename T>
int64_t simd_width();

// Columns of gemm_indirect's gathered-row tile (a_rows given): 4 vectors with AVX-512, 2 below
// it (rows_tile_nv in gemm.cpp). Output channels that fill it are read without waste.
template <typename T>
int64_t gathered_tile_width();

}  // namespace cpu
}  // namespace pyengine
