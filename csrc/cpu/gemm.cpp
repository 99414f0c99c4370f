// pyengine's CPU GEMM (interface and contract: gemm.h).
//
// How it is built
// ---------------
// The kernels below are templates over an ISA description (vector width, tile sizes) written with
// GCC vector extensions and forced inline. Each (ISA, dtype) pair gets three out-of-line kernel
// functions compiled with __attribute__((target(...))) (struct Kern below) into which the
// micro-kernel variants are inlined, so one source yields AVX-512, AVX2+FMA and SSE2 machine code;
// drivers and packing are plain code that call them once per tile. The level is cpu/isa.h's
// run-time choice (no -march=native). GCC contracts
// `acc += a * b` into FMA where the target has it (C++ defaults to -ffp-contract=fast).
//
// Micro-kernels
//   op_tile<MR, NV>  C[MR x NV*W] += A[MR x kc] B[kc x NV*W]: per k, NV vector loads of B's row,
//                    MR broadcasts of A's column, MR*NV FMAs. AVX-512 fp32: 24x16, 12x32 or 6x64
//                    tiles, 24 of the 32 zmm registers hold C. The 6-row tile (6x64; 6x16
//                    with AVX2) also broadcasts from a row-major A in place (kRowA: one offset
//                    register per row).
//   op_tile_ind      the same with A's column and B's row found through per-k pointer tables
//                    (conv2d's implicit im2col in its batch-innermost layout).
//   dot_tile<RA, RB> C[RA x RB] += A[RA x K] B^T[RB x K], vectorised along k (A rows and B^T rows
//                    contiguous): RA+RB vector loads per RA*RB FMAs, one horizontal sum per
//                    element at the end. Used where both operands run along k (dW = dY^T X).
//   dot_seg_tile     the same summed over segments whose B rows come from a pointer table.
//
// Napkin math (reference machine, csrc/cpu/README.md: ~240 GFLOP/s fp32 per core, 2 cores):
//   LeNet linear 400->120 at batch 256: 2*256*400*120 = 24.6 MFLOP per GEMM (forward, dX, dW each),
//   operands 0.4 + 0.2 + 0.1 MB: compute-bound, floor ~0.05 ms per GEMM on 2 cores at peak.
//   For the small im2col GEMMs of conv1 (K = 25) im2col costs about as much as the FMAs.
//   Achieved figures: the benchmark suite (python -m benchmarks).
//
// Cache blocking: k blocks of at most KC = 512, equal in size; row blocks of A whose packed copy
// fills half of L2 (512 rows of 512 k with a 2 MB L2); NC = 4096 columns. Both operands are copied
// into contiguous, cache-line-aligned panels (op_driver), so a tile's kc rows never sit a large
// stride apart in the same L1 sets; an operand contiguous along k (row-major A, y = x W^T's W) is
// packed through 16 x 16 register transposes (cpu/transpose.h). Measured on this file's kernels,
// one thread of an AVX-512 Xeon (peak 215 GFLOP/s by an FMA loop in registers): the 6 x 4-vector
// tile runs at ~160 GFLOP/s on panels in cache, as MKL's sgemm does there (162-164).
#include "cpu/gemm.h"

#include "cpu/allocator.h"
#include "cpu/isa.h"
#include "cpu/transpose.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include <unistd.h>

// Vectors are passed only between always-inline functions: the ABI note is irrelevant.
#pragma GCC diagnostic ignored "-Wpsabi"


namespace pyengine {
namespace cpu {
namespace {

// ---- ISA descriptions ---------------------------------------------------------------------
// kMR1 / kMR2 / kMR4: rows of the outer-product tile with 1 / 2 / 4 vectors of columns; kRA x kRB:
// the dot tile. Chosen so that accumulators + operands fit the register file (32 zmm; 16 ymm /
// xmm): e.g. AVX-512 6 x 4 vectors = 24 accumulators + 4 B vectors + 1 broadcast.
struct IsaAvx512 {
  static constexpr int kBytes = 64;
  static constexpr int kMR1 = 24, kMR2 = 12, kMR4 = 6, kRA = 6, kRB = 4;
};
struct IsaAvx2 {
  static constexpr int kBytes = 32;
  static constexpr int kMR1 = 12, kMR2 = 6, kMR4 = 2, kRA = 3, kRB = 3;
};
struct IsaSse {
  static constexpr int kBytes = 16;
  static constexpr int kMR1 = 12, kMR2 = 6, kMR4 = 2, kRA = 3, kRB = 3;
};

template <class Isa>
constexpr int mr_of(int nv) {
  return nv == 1 ? Isa::kMR1 : nv == 2 ? Isa::kMR2 : Isa::kMR4;
}

// Tiles whose A rows are found by offsets held in registers (a row-major A read in place, gathered
// rows) have at most this many rows: each row's offset takes one of the 16 general registers.
constexpr int kGatheredRowsMax = 6;

// Of the tiles of at most kGatheredRowsMax rows, the vectors of columns of the one with the most
// accumulators: 6 x 4 with AVX-512, 6 x 2 with AVX2 or SSE (whose 2 x 4 tile has 8 accumulators,
// just the FMA latency times two pipes, with no slack for a late load: on a Zen 3 it ran 6-15%
// slower than 6 x 2 on conv2d's gathered implicit GEMMs).
template <class Isa>
constexpr int rows_tile_nv() {
  int best = 4, most = 0;
  for (int nv : {4, 2, 1})
    if (mr_of<Isa>(nv) <= kGatheredRowsMax && mr_of<Isa>(nv) * nv > most) {
      most = mr_of<Isa>(nv) * nv;
      best = nv;
    }
  return best;
}

template <typename T, int W>
struct Vec {
  typedef T type __attribute__((vector_size(sizeof(T) * W)));
  typedef T utype __attribute__((vector_size(sizeof(T) * W), aligned(sizeof(T)), may_alias));
};

template <typename T, int W>
PE_INLINE typename Vec<T, W>::type loadu(const T* p) {
  return *reinterpret_cast<const typename Vec<T, W>::utype*>(p);
}
template <typename T, int W>
PE_INLINE void storeu(T* p, const typename Vec<T, W>::type& v) {
  *reinterpret_cast<typename Vec<T, W>::utype*>(p) = v;
}
// A non-temporal store (past the caches, without reading the line first) where p is aligned to
// the vector, of an AVX-512 or AVX2 vector; otherwise an ordinary one. Callers fence
// (stream_fence) before others read what it wrote.
template <typename T, int W>
PE_INLINE void store_stream(T* p, const typename Vec<T, W>::type& v) {
  constexpr int bytes = W * static_cast<int>(sizeof(T));
  if constexpr ((bytes == 64 || bytes == 32) && std::is_floating_point_v<T>) {
    if ((reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0) {
      if constexpr (bytes == 64 && std::is_same_v<T, float>)
        __builtin_ia32_movntps512(p, v);
      else if constexpr (bytes == 64)
        __builtin_ia32_movntpd512(p, v);
      else if constexpr (std::is_same_v<T, float>)
        __builtin_ia32_movntps256(p, v);
      else
        __builtin_ia32_movntpd256(p, v);
      return;
    }
  }
  storeu<T, W>(p, v);
}
PE_INLINE void stream_fence() { __builtin_ia32_sfence(); }

// Horizontal sum by halving (fixed order: deterministic).
template <typename T, int W>
PE_INLINE T hsum(const typename Vec<T, W>::type& v) {
  if constexpr (W == 2) {
    return v[0] + v[1];
  } else {
    typename Vec<T, W / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return hsum<T, W / 2>(lo + hi);
  }
}

// op_driver's k block at most (a B panel of 512 x 64 floats is 128 KB, in L2): 512 ran 3-5% faster
// than 256 on y = x W^T (256 x 4096 -> 4096, 256 x 400 -> 120; one thread), fewer passes over C.
constexpr int64_t kKC = 512;
constexpr int64_t kKCIndirectBytes = 16384;  // ind_driver's k block: see there
// Columns per B block (KC x NC floats: up to 8 MB, in L3, shared by the row blocks). The A block
// (MC x KC) is repacked once per B block, so a wide NC keeps that to one or two passes.
constexpr int64_t kNC = 4096;

// C tile (+)= acc, then + bias[j] where bias is not null: full vectors when C rows are contiguous
// and the tile is whole, else through a stack tile (partial panels, transposed C). Row i of the
// tile starts at c + i * rsc, or at c + crows[i] where crows is not null.
template <class Isa, typename T, int MR, int NV>
PE_INLINE void store_tile(typename Vec<T, Isa::kBytes / sizeof(T)>::type (&acc)[MR][NV], T* c,
                          int64_t rsc, int64_t csc, int64_t nr, bool accum,
                          const T* bias = nullptr, const int64_t* crows = nullptr,
                          bool stream = false) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  constexpr int NR = W * NV;
  using vec = typename Vec<T, W>::type;
  if (csc == 1 && nr == NR) {
    #pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
      #pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) {
        T* p = c + (crows ? crows[i] : i * rsc) + v * W;
        vec r = acc[i][v];
        if (accum) r = loadu<T, W>(p) + r;
        if (bias) r = r + loadu<T, W>(bias + v * W);
        if (stream)
          store_stream<T, W>(p, r);
        else
          storeu<T, W>(p, r);
      }
  } else {
    alignas(64) T tile[MR][NR];
    #pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
      #pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) storeu<T, W>(&tile[i][v * W], acc[i][v]);
    for (int i = 0; i < MR; ++i)
      for (int64_t j = 0; j < nr; ++j) {
        T* p = c + (crows ? crows[i] : i * rsc) + j * csc;
        const T r = accum ? *p + tile[i][j] : tile[i][j];
        *p = bias ? r + bias[j] : r;
      }
  }
}

// The lines of op_driver's next B panel, walked row by row: a tile asks for its share of them,
// spread over its k loop (see op_driver).
struct LineCursor {
  const char* src = nullptr;
  int64_t row_lines = 0, row_bytes = 0, line = 0;
  PE_INLINE void prefetch_next() {
    __builtin_prefetch(src + line * 64, /*rw=*/0, /*locality=*/2);
    if (++line == row_lines) {
      line = 0;
      src += row_bytes;
    }
  }
};

// ---- Outer-product micro-kernel -----------------------------------------------------------
// A element (i, k) at a[k * lda + i]; B element (k, j) at b[k * ldb + j], NV*W columns readable.
// Writes (or adds to) the first nr columns of the MR x NR tile of C.
// The loops over the register tile are unrolled by force (#pragma GCC unroll): past GCC's own
// limit the 24-row tile kept its accumulators on the stack, a load and a store per FMA, and ran
// at about a third of the speed of the tiles that stayed in registers.
// kRowA: A element (i, k) at a[i * lda + k] instead (a row-major A read in place: each row's
// offset stays in a register, so tiles of at most kGatheredRowsMax rows).
template <class Isa, typename T, int MR, int NV, bool kRowA = false>
PE_INLINE void op_tile(int64_t kc, const T* __restrict a, int64_t lda, const T* __restrict b,
                       int64_t ldb, T* __restrict c, int64_t rsc, int64_t csc, int64_t nr,
                       bool accum, LineCursor* pf = nullptr, int64_t pf_lines = 0,
                       const T* bias = nullptr, bool stream = false) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  using vec = typename Vec<T, W>::type;
  vec acc[MR][NV];
  #pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) acc[i][v] = vec{};
  int64_t row[kRowA ? MR : 1];
  if constexpr (kRowA) {
    #pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) row[i] = i * lda;
  }
  // pf_lines prefetches, one before each run of `every` k (a burst of them before the tile
  // stalled on the line fill buffers: y = x W^T at 256 x 4096 -> 4096, one thread, 6% of the
  // time on the prefetch loop, perf). Without any, the k loop runs as one run: no test per k.
  const int64_t every = pf_lines > 0 ? std::max<int64_t>(1, kc / pf_lines) : kc;
  for (int64_t k = 0; k < kc;) {
    if (pf_lines > 0) {
      pf->prefetch_next();
      --pf_lines;
    }
    for (const int64_t end = std::min(kc, k + every); k < end; ++k) {
      vec bv[NV];
      #pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) bv[v] = loadu<T, W>(b + v * W);
      #pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        const T ai = kRowA ? a[row[i]] : a[i];
        #pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
      }
      a += kRowA ? 1 : lda;
      b += ldb;
    }
  }
  for (; pf_lines > 0; --pf_lines) pf->prefetch_next();  // more lines than k
  store_tile<Isa, T, MR, NV>(acc, c, rsc, csc, nr, accum, bias, nullptr, stream);
}

// The same tile with A and B given per k by pointer tables: A element (i, k) at a[k][ai + i], or
// at a[k][rows[i]] when kGather (the tile's rows need not be adjacent), B element (k, j) at
// b[k][bj + j] (conv2d's implicit GEMMs). A gathered row's offset stays in a register: the
// broadcast reads [a[k] + rows[i] * sizeof(T)], one load as before (tiles of up to
// kGatheredRowsMax rows; the 24-row tile's offsets would not fit the 16 general registers).
template <class Isa, typename T, int MR, int NV, bool kGather>
PE_INLINE void op_tile_ind(int64_t kc, const T* const* __restrict a, int64_t ai,
                           const int64_t* __restrict rows, const T* const* __restrict b,
                           int64_t bj, T* __restrict c, int64_t rsc, int64_t csc,
                           const int64_t* crows, int64_t nr, bool accum, const T* bias) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  using vec = typename Vec<T, W>::type;
  vec acc[MR][NV];
  #pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) acc[i][v] = vec{};
  // Adjacent rows: one pointer per k and constant displacements (an array of ai + i here made
  // LeNet's batch-innermost conv2, on the 24-row tiles, run at half speed).
  int64_t off[kGather ? MR : 1];
  if constexpr (kGather) {
    #pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) off[i] = rows[i];
  }
  for (int64_t k = 0; k < kc; ++k) {
    const T* ak = kGather ? a[k] : a[k] + ai;
    const T* bk = b[k] + bj;
    // Hide that bk is b[k] + bj (and ak a[k] + ai) from GCC: it otherwise hoists bj + v * W and
    // ai + i into one index register per load (4 + 6), runs out of general registers and reloads
    // some from the stack every k (perf annotate: a spill reload feeding a B load, ~20% of the
    // gathered 6 x 64 tile's samples on one FMA). Now each pointer is one base register and the
    // loads take constant displacements, one add per k. Stride-2 3x3 64->128 @56 forward and
    // the 3x3 Winograd layers, one thread, builds alternating: ~5-10% less time.
    asm("" : "+r"(ak), "+r"(bk));
    vec bv[NV];
    #pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) bv[v] = loadu<T, W>(bk + v * W);
    #pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      const T ai_k = kGather ? ak[off[i]] : ak[i];
      #pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) acc[i][v] += ai_k * bv[v];
    }
  }
  store_tile<Isa, T, MR, NV>(acc, c, rsc, csc, nr, accum, bias, crows);
}

// Row-count ladder: a tile of mr rows runs as a few kernels of ladder sizes (greedy, largest
// first: 23 = 16 + 6 + 1), so only 9 row counts are compiled instead of 24. Each C element is
// still computed by one kernel, summing over k in order: the split does not change the result.
constexpr int next_ladder(int r) {
  return r > 16 ? 16 : r > 12 ? 12 : r > 8 ? 8 : r > 6 ? 6 : r > 4 ? 4 : r - 1;
}

template <class Isa, typename T, int NV, int R, bool kRowA = false>
PE_INLINE void op_rows(int mr, int64_t kc, const T* a, int64_t lda, const T* b, int64_t ldb,
                       T* c, int64_t rsc, int64_t csc, int64_t nr, bool accum, LineCursor* pf,
                       int64_t pf_lines, const T* bias, bool stream) {
  if constexpr (R >= 1) {
    if (mr >= R) {
      op_tile<Isa, T, R, NV, kRowA>(kc, a, lda, b, ldb, c, rsc, csc, nr, accum, pf, pf_lines,
                                    bias, stream);
      pf_lines = 0;
      a += kRowA ? R * lda : R;
      c += R * rsc;
      mr -= R;
    }
    if (mr > 0)
      op_rows<Isa, T, NV, next_ladder(R), kRowA>(mr, kc, a, lda, b, ldb, c, rsc, csc, nr, accum,
                                                 pf, pf_lines, bias, stream);
  }
}

template <class Isa, typename T, int NV, bool kGather, int R>
PE_INLINE void op_rows_ind(int mr, int64_t kc, const T* const* a, int64_t ai,
                           const int64_t* rows, const T* const* b, int64_t bj, T* c, int64_t rsc,
                           int64_t csc, const int64_t* crows, int64_t nr, bool accum,
                           const T* bias) {
  if constexpr (R >= 1) {
    if (mr >= R) {
      op_tile_ind<Isa, T, R, NV, kGather>(kc, a, ai, rows, b, bj, c, rsc, csc, crows, nr, accum,
                                          bias);
      ai += R;
      if constexpr (kGather) rows += R;
      if (crows)
        crows += R;
      else
        c += R * rsc;
      mr -= R;
    }
    if (mr > 0)
      op_rows_ind<Isa, T, NV, kGather, next_ladder(R)>(mr, kc, a, ai, rows, b, bj, c, rsc, csc,
                                                       crows, nr, accum, bias);
  }
}

// Packed panels start on a cache line (cpu/allocator.h's LineVector): the kernels' full-vector
// loads of B's rows (and A's MR-row k steps) then never straddle two lines.
template <typename T>
using PanelBuffer = LineVector<T>;

template <typename T>
PanelBuffer<T>& scratch_a() {
  thread_local PanelBuffer<T> buf;
  return buf;
}
template <typename T>
PanelBuffer<T>& scratch_b() {
  thread_local PanelBuffer<T> buf;
  return buf;
}

template <typename T>
struct Problem {
  int64_t M, N, K;
  const T* A;
  int64_t rsa, csa;
  const T* B;
  int64_t rsb, csb;
  T* C;
  int64_t rsc, csc;
  bool accumulate;
  const T* bias = nullptr;  // gemm.h's bias (with accumulate false): per row, or per column
  bool bias_per_row = false;
  // C's tiles stored past the caches (store_stream): set by gemm_parallel for a C written
  // once (no accumulation, one k block) and too large to be read back from the caches.
  bool stream_c = false;
};

// C's tile of mr x nr elements (from row i0, column j0) set to the bias, before its first
// products are added to it: the bias in place of C's fill-then-accumulate, in L1 instead of a
// pass over all of C (the same additions: the same bits). For a bias per row only: one per
// column is added as the tile is stored (op_driver).
template <typename T>
void fill_bias(const Problem<T>& p, int64_t i0, int64_t j0, int64_t mr, int64_t nr) {
  T* c = p.C + i0 * p.rsc + j0 * p.csc;
  if (p.csc == 1) {  // rows of C: copies (a 6 x 64 tile's 384 strided stores took as long as
                     // its 64 k of multiply-adds)
    for (int64_t i = 0; i < mr; ++i) {
      T* row = c + i * p.rsc;
      if (p.bias_per_row)
        std::fill(row, row + nr, p.bias[i0 + i]);
      else
        std::memcpy(row, p.bias + j0, static_cast<size_t>(nr) * sizeof(T));
    }
    return;
  }
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j)
      c[i * p.rsc + j * p.csc] = p.bias_per_row ? p.bias[i0 + i] : p.bias[j0 + j];
}

// BLIS-style loops: jc (NC columns) -> pc (KC of k) -> ic (MC rows) -> panels -> tiles.
// Both operands are copied into contiguous panels (A: MR rows interleaved per k; B: NR columns
// per k, zero-padded), whatever their strides, except where a panel would be read only once:
// A when there is a single column panel (N <= NR), its rows are unit stride and it fits in L2
// (reads_a_direct), B when there is a single row tile (M <= MR) and its columns are unit stride.
// Reading in place with a large row stride is what the copy avoids: kc rows of a panel 4 KB or more
// apart fall into the same few L1 sets and TLB pages, so the panel is evicted while the tile still
// reuses it (a 4096-wide W read in place ran at a quarter of the packed speed). The copy costs one
// pass over the operand per (jc, ic) block and is amortised over the NR (A) or MC (B) multiply-adds
// of every element.
template <class Isa, typename T>
struct Kern;  // the ISA-compiled kernels, defined below

// dst[k * LD + r] = src[r * rs + k * cs] for r < n <= LD, k < kc; rows n..LD of dst are zero when
// pad. LD (MR or NR) is a compile-time constant so that a whole unit-stride row is a fixed-size,
// vectorised copy (a libc memcpy call per 6-float row cost more than the multiply-adds it feeds).
template <int LD, typename T>
void pack_panel(int64_t kc, int64_t n, const T* __restrict src, int64_t rs, int64_t cs,
                T* __restrict dst, bool pad) {
  if (rs == 1 && n == LD) {
    for (int64_t k = 0; k < kc; ++k)
      for (int r = 0; r < LD; ++r) dst[k * LD + r] = src[k * cs + r];
    return;
  }
  if (rs == 1) {
    for (int64_t k = 0; k < kc; ++k) {
      for (int64_t r = 0; r < n; ++r) dst[k * LD + r] = src[k * cs + r];
      if (pad)
        for (int64_t r = n; r < LD; ++r) dst[k * LD + r] = T(0);
    }
    return;
  }
  // Strided along the panel's rows but contiguous along k (a row-major A, or y = x W^T's W):
  // a transpose, 16 x 16 floats in registers with AVX-512 (the scalar loop below moves one
  // element per strided access). y = x W^T at 256 x 4096 -> 4096, one thread: 102 ms on the
  // outer-product plan when the whole of W was first transposed by scalar loops, 68 ms packed
  // this way, against 83 ms on the dot kernel.
  if (cs == 1) {
    conv2d::transpose<T>(n, kc, src, rs, dst, LD, nullptr);
    if (pad)
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t r = n; r < LD; ++r) dst[k * LD + r] = T(0);
    return;
  }
  // Strided both ways: read each source row along k, in blocks of k that keep the written lines
  // of dst in L1.
  constexpr int64_t kBlock = 64;
  for (int64_t k0 = 0; k0 < kc; k0 += kBlock) {
    const int64_t k1 = std::min(kc, k0 + kBlock);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t k = k0; k < k1; ++k) dst[k * LD + r] = src[r * rs + k * cs];
    if (pad)
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t r = n; r < LD; ++r) dst[k * LD + r] = T(0);
  }
}

// This core's L2 in bytes, as the C library reports it (sysconf), or the reference machine's 1 MB
// (csrc/cpu/README.md) where it does not.
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? int64_t(reported) : int64_t(1) << 20;
  }();
  return bytes;
}

// Whether op_driver reads A's rows in place (op_tile's kRowA) rather than packing them: the tiles
// of rows_nv vectors (rows_tile_nv: 6 x 4 with AVX-512, 6 x 2 below it), A contiguous along k, its
// rows not a multiple of 512 bytes apart beyond 1 KB (as gemm.h's in_place_ld: the tile's rows then
// share a few L1 sets; W of 4096 x 4096 read this way took 87 ms where its packed panels take 61,
// one thread; rows 512 B or 1 KB apart spread 6 rows over 4 or more sets, and reading them in place
// saves their 16 x 16 transposes, of which a 6-row panel fills 6 rows: a channels_last 256->64 1x1
// conv2d, batch 8 @56, two threads, ran 1.6x torch's time with the rows packed, 1.2-1.25x read in
// place), and C's rows contiguous (with C^T's tiles, stored element by element, W read in place
// made linear 64 x 784 -> 256 pick them: 235 us on one thread where C's own tiles take 182). With
// AVX2 only 4-vector tiles read A in place at first, on 2 rows: y = x W^T then took the 2 x 4 tile
// or packed x by transposes; the 6 x 2 tile in place took linear 784 -> 256's forward from
// 1.33-1.41x torch's time to 0.99-1.00x at batch 256 and 1024 (one thread, Zen 3, builds
// alternating in one session), 400 -> 120 from 1.29-1.31x to 0.97x.
bool reads_a_rows(int rows_nv, int nv, int64_t rsa, int64_t csa, int64_t csc,
                  int64_t elem_bytes) {
  const int64_t row_bytes = rsa * elem_bytes;
  return nv == rows_nv && csa == 1 && rsa != 1 && csc == 1 &&
         (row_bytes % 512 != 0 || row_bytes <= 1024);
}

// Whether op_driver reads A's panels where they are (a single column panel, N <= nr, reads each
// element once; A's rows unit stride): only where A fits in L2. A larger A is read from memory,
// a tile's MR elements per k (a part of a line, each k another line): the tile's broadcasts
// waited on those lines among its FMAs, where packing reads them in a loop of its own. A
// channels_last 64->256 1x1 conv2d's grad_weight (256 x 64, K = 25088 pixels; A = dY^T, 25.7
// MB): 1.33-1.38x torch's time read in place, 1.08-1.10x packed (two threads, two runs each).
bool reads_a_direct(int64_t M, int64_t N, int64_t K, int64_t rsa, int64_t nr,
                    int64_t elem_bytes) {
  return rsa == 1 && N <= nr && double(M) * double(K) * double(elem_bytes) <= double(l2_bytes());
}

template <class Isa, typename T, int NV>
void op_driver(const Problem<T>& p) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  constexpr int NR = W * NV;
  constexpr int MR = mr_of<Isa>(NV);
  constexpr int64_t NC = kNC / NR * NR;
  const bool a_direct = reads_a_direct(p.M, p.N, p.K, p.rsa, NR, sizeof(T));
  // A row-major (y = x W^T's x, dX = dY W's dY): the 6-row tiles broadcast from its rows in
  // place (op_tile's kRowA), no packing: 256 x 784 -> 256 packed A's transposes cost as much as
  // a tenth of its multiply-adds.
  const bool a_rows = reads_a_rows(rows_tile_nv<Isa>(), NV, p.rsa, p.csa, p.csc, sizeof(T));
  const bool b_direct = p.csb == 1 && p.M <= MR;
  // k blocks of equal size, at most kKC (from K alone: each C element's sum order depends on
  // the shapes only).
  const int64_t k_blocks = (p.K + kKC - 1) / kKC;
  const int64_t KC = (p.K + k_blocks - 1) / k_blocks;
  // Row blocks whose packed A (MC x KC) fills at most half of L2, of equal size.
  const int64_t mc_max = std::max<int64_t>(
      MR, l2_bytes() / 2 / (KC * static_cast<int64_t>(sizeof(T))) / MR * MR);
  const int64_t row_blocks = (p.M + mc_max - 1) / mc_max;
  const int64_t MC = ((p.M + row_blocks - 1) / row_blocks + MR - 1) / MR * MR;
  // With a single row block, each B panel is packed just before its tiles and used up by them:
  // one panel of scratch, in L1 / L2. Otherwise the row blocks share the packed NC x KC block
  // (up to 8 MB), packed on the first one's pass. (A whole block packed for one row block went
  // out to L3 and back: y = x W^T at 256 x 4096 -> 4096 took 67 -> 63 ms on one thread with
  // one panel.)
  const bool one_panel = row_blocks == 1;
  const bool b_streams = p.K * p.N * int64_t(sizeof(T)) > l2_bytes();
  PanelBuffer<T>& abuf = scratch_a<T>();
  PanelBuffer<T>& bbuf = scratch_b<T>();
  for (int64_t jc = 0; jc < p.N; jc += NC) {
    const int64_t nc = std::min(NC, p.N - jc);
    const int64_t npanels = (nc + NR - 1) / NR;
    // B is packed in every panel, or (in place) just a partial last one, so no kernel reads past
    // B.
    const int64_t first_packed = b_direct ? nc / NR : 0;
    for (int64_t pc = 0; pc < p.K; pc += KC) {
      const int64_t kc = std::min(KC, p.K - pc);
      const bool accum = p.accumulate || pc > 0;
      if (first_packed < npanels) {
        const int64_t panels = one_panel ? 1 : npanels - first_packed;
        const size_t need = static_cast<size_t>(panels * kc * NR);
        if (bbuf.size() < need) bbuf.resize(need);
      }
      for (int64_t ic = 0; ic < p.M; ic += MC) {
        const int64_t mc = std::min(MC, p.M - ic);
        if (!a_direct && !a_rows) {
          const int64_t mpanels = (mc + MR - 1) / MR;
          const size_t need = static_cast<size_t>(mpanels * kc * MR);
          if (abuf.size() < need) abuf.resize(need);
          for (int64_t ip = 0; ip < mpanels; ++ip) {
            const int64_t i0 = ic + ip * MR;
            pack_panel<MR>(kc, std::min<int64_t>(MR, p.M - i0), p.A + i0 * p.rsa + pc * p.csa,
                           p.rsa, p.csa, abuf.data() + ip * kc * MR, /*pad=*/false);
          }
        }
        for (int64_t jp = 0; jp < npanels; ++jp) {
          const int64_t j0 = jp * NR;
          const int64_t nr = std::min<int64_t>(NR, nc - j0);
          const T* bp;
          int64_t ldb;
          if (jp < first_packed) {
            bp = p.B + pc * p.rsb + (jc + j0);
            ldb = p.rsb;
          } else {
            T* packed = bbuf.data() + (one_panel ? 0 : jp - first_packed) * kc * NR;
            if (ic == 0)
              pack_panel<NR>(kc, std::min<int64_t>(NR, p.N - (jc + j0)),
                             p.B + pc * p.rsb + (jc + j0) * p.csb, p.csb, p.rsb, packed,
                             /*pad=*/true);
            bp = packed;
            ldb = NR;
          }
          // The next panel's source, prefetched into L2 a share per tile while this panel's tiles
          // run, so that its packing reads from L2, not DRAM: NR rows of a few KB where B runs
          // along k (y = x W^T's W), kc rows of NR elements where it runs along j (dW = dY^T X's
          // X, rows KBs apart): streams too short, or strides too long, for the hardware
          // prefetcher. The next panel is this block's next, or the next k block's first. Only
          // where B exceeds L2: a B that fits stays cached between calls (LeNet's and the MLP's
          // weights), and prefetching it only costs the loop.
          const char* next_src = nullptr;
          int64_t next_rows = 0, row_lines = 0, row_bytes = 0;
          const int64_t bytes = int64_t(sizeof(T));
          if (ic == 0 && b_streams && (p.rsb == 1) != (p.csb == 1)) {
            int64_t next_j = -1, next_k = 0, next_kc = 0, next_nr = 0;
            if (jp + 1 < npanels) {
              next_j = jc + j0 + NR, next_k = pc, next_kc = kc;
              next_nr = std::min<int64_t>(NR, nc - (j0 + NR));
            } else if (pc + KC < p.K && first_packed == 0) {
              next_j = jc, next_k = pc + KC, next_kc = std::min(KC, p.K - pc - KC);
              next_nr = std::min<int64_t>(NR, nc);
            }
            if (next_j >= 0) {
              next_src = reinterpret_cast<const char*>(p.B + next_k * p.rsb + next_j * p.csb);
              const bool along_k = p.rsb == 1;
              next_rows = along_k ? next_nr : next_kc;
              row_bytes = (along_k ? p.csb : p.rsb) * bytes;
              // + 1: rows need not start on a line
              row_lines = (along_k ? next_kc : next_nr) * bytes / 64 + 1;
            }
          }
          const int64_t prefetch_lines = next_rows * row_lines;
          const int64_t tiles = (mc + MR - 1) / MR;
          LineCursor cursor{next_src, row_lines, row_bytes, 0};
          int64_t prefetched = 0;
          for (int64_t ir = 0, tile = 1; ir < mc; ir += MR, ++tile) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
            const int64_t upto = prefetch_lines * tile / tiles, pfn = upto - prefetched;
            prefetched = upto;
            const T* ap;
            int64_t lda;
            // A bias per column is added as the tile is stored (its first k block overwrites
            // C): C = sum + bias, the bits of filling C with it first (addition commutes)
            // without the fill's pass over the tile and the reload of C (channels_last 1x1
            // 64 -> 256 @56 forward, batch 1: 0.236 -> 0.209 ms, two threads). A bias per row
            // is filled in (store_tile adds one per column).
            const bool biased = p.bias && pc == 0;
            const T* tile_bias = biased && !p.bias_per_row ? p.bias + jc + j0 : nullptr;
            const bool filled = biased && !tile_bias;
            if (filled) fill_bias(p, ic + ir, jc + j0, mr, nr);
            if (a_rows) {  // (a narrow last panel too: B's panel is zero-padded to NR)
              Kern<Isa, T>::op_a_rows(mr, kc, p.A + (ic + ir) * p.rsa + pc, p.rsa, bp, ldb,
                                      p.C + (ic + ir) * p.rsc + (jc + j0) * p.csc, p.rsc, p.csc,
                                      nr, accum || filled, &cursor, pfn, tile_bias, p.stream_c);
              continue;
            }
            if (a_direct) {
              ap = p.A + (ic + ir) + pc * p.csa;
              lda = p.csa;
            } else {
              ap = abuf.data() + (ir / MR) * kc * MR;
              lda = MR;
            }
            T* cp = p.C + (ic + ir) * p.rsc + (jc + j0) * p.csc;
            // The narrowest kernel that covers the panel (a partial last one may be narrower).
            if (NV == 1 || nr <= W)
              Kern<Isa, T>::op1(mr, kc, ap, lda, bp, ldb, cp, p.rsc, p.csc, nr, accum || filled,
                                &cursor, pfn, tile_bias, p.stream_c);
            else if (NV == 2 || nr <= 2 * W)
              Kern<Isa, T>::op2(mr, kc, ap, lda, bp, ldb, cp, p.rsc, p.csc, nr, accum || filled,
                                &cursor, pfn, tile_bias, p.stream_c);
            else
              Kern<Isa, T>::op4(mr, kc, ap, lda, bp, ldb, cp, p.rsc, p.csc, nr, accum || filled,
                                &cursor, pfn, tile_bias, p.stream_c);
          }
        }
      }
    }
  }
  if (p.stream_c) stream_fence();  // the non-temporal stores visible before the task ends
}

// ---- Dot micro-kernel ---------------------------------------------------------------------
// A row i at a + i * lda, B^T row j (column j of B) at b + j * ldb, both contiguous along k.
// Edge tiles (ra < RA or rb < RB) repeat their last row / column and store only the valid part.
// Tiles of 1 and 2 rows have kernels of their own (Kern::dot): a 1-row product (linear at batch
// 1) on the RA-row tile computed its row RA times (784 -> 256: 18 us, torch 10). Each C element
// is the same sum in every tile shape.
template <class Isa, typename T, int RA, int RB>
PE_INLINE void dot_tile(int ra, int rb, int64_t K, const T* a, int64_t lda, const T* b,
                        int64_t ldb, T* __restrict c, int64_t rsc, int64_t csc, bool accum) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  using vec = typename Vec<T, W>::type;
  const T* ar[RA];
  const T* br[RB];
  for (int i = 0; i < RA; ++i) ar[i] = a + std::min(i, ra - 1) * lda;
  for (int j = 0; j < RB; ++j) br[j] = b + std::min(j, rb - 1) * ldb;
  vec acc[RA][RB];
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) acc[i][j] = vec{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vec bv[RB];
    for (int j = 0; j < RB; ++j) bv[j] = loadu<T, W>(br[j] + k);
    for (int i = 0; i < RA; ++i) {
      const vec av = loadu<T, W>(ar[i] + k);
      for (int j = 0; j < RB; ++j) acc[i][j] += av * bv[j];
    }
  }
  if (k < K) {  // zero-padded tail vector
    const int64_t rem = K - k;
    alignas(64) T ta[RA][W];
    alignas(64) T tb[RB][W];
    for (int i = 0; i < RA; ++i)
      for (int l = 0; l < W; ++l) ta[i][l] = l < rem ? ar[i][k + l] : T(0);
    for (int j = 0; j < RB; ++j)
      for (int l = 0; l < W; ++l) tb[j][l] = l < rem ? br[j][k + l] : T(0);
    for (int i = 0; i < RA; ++i) {
      const vec av = loadu<T, W>(ta[i]);
      for (int j = 0; j < RB; ++j) acc[i][j] += av * loadu<T, W>(tb[j]);
    }
  }
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) {
      if (i >= ra || j >= rb) continue;
      const T s = hsum<T, W>(acc[i][j]);
      T* cp = c + i * rsc + j * csc;
      *cp = accum ? *cp + s : s;
    }
}

// Dot products over segments: C[i, j] (+)= sum_s sum_t A[i * rsa + s * sa + t] * b[s * ldbt + j][t]
// for t < len (conv2d's grad_weight in the batch-innermost layout: a segment per output pixel, t
// over the batch). Edge tiles repeat their last row / column, as dot_tile.
template <class Isa, typename T, int RA, int RB>
PE_INLINE void dot_seg_tile(int ra, int rb, int64_t nseg, int64_t len, const T* a, int64_t rsa,
                            int64_t sa, const T* const* b, int64_t ldbt, T* __restrict c,
                            int64_t rsc, int64_t csc, bool accum) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  using vec = typename Vec<T, W>::type;
  vec acc[RA][RB];
  for (int i = 0; i < RA; ++i)
    for (int j = 0; j < RB; ++j) acc[i][j] = vec{};
  int64_t arow[RA];
  int jcol[RB];
  for (int i = 0; i < RA; ++i) arow[i] = std::min(i, ra - 1) * rsa;
  for (int j = 0; j < RB; ++j) jcol[j] = std::min(j, rb - 1);
  const int64_t full = len / W * W;
  for (int64_t s = 0; s < nseg; ++s) {
    const T* as = a + s * sa;
    const T* const* bs = b + s * ldbt;
    const T* br[RB];
    for (int j = 0; j < RB; ++j) br[j] = bs[jcol[j]];
    for (int64_t t = 0; t < full; t += W) {
      vec bv[RB];
      for (int j = 0; j < RB; ++j) bv[j] = loadu<T, W>(br[j] + t);
      for (int i = 0; i < RA; ++i) {
        const vec av = loadu<T, W>(as + arow[i] + t);
        for (int j = 0; j < RB; ++j) acc[i][j] += av * bv[j];
      }
    }
    if (full < len) {  // zero-padded tail vector
      alignas(64) T ta[RA][W];
      alignas(64) T tb[RB][W];
      for (int i = 0; i < RA; ++i)
        for (int l = 0; l < W; ++l) ta[i][l] = full + l < len ? as[arow[i] + full + l] : T(0);
      for (int j = 0; j < RB; ++j)
        for (int l = 0; l < W; ++l) tb[j][l] = full + l < len ? br[j][full + l] : T(0);
      for (int i = 0; i < RA; ++i) {
        const vec av = loadu<T, W>(ta[i]);
        for (int j = 0; j < RB; ++j) acc[i][j] += av * loadu<T, W>(tb[j]);
      }
    }
  }
  for (int i = 0; i < ra; ++i)
    for (int j = 0; j < rb; ++j) {
      const T sum = hsum<T, W>(acc[i][j]);
      T* cp = c + i * rsc + j * csc;
      *cp = accum ? *cp + sum : sum;
    }
}

// Needs p.csa == 1 and p.rsb == 1. Columns are blocked so that the B^T rows of a block fill half
// of L2 (the A rows and C take the rest). A fixed 512 KB, half of the reference machine's L2, was
// the whole of a Zen 3's 512 KB: there linear 784->256 forward ran 8-9% slower (one thread,
// batch 256 and 1024, interleaved in one process) than with blocks of 256 or 128 KB.
template <class Isa, typename T>
void dot_driver(const Problem<T>& p) {
  constexpr int RA = Isa::kRA, RB = Isa::kRB;
  const int64_t bytes_per_col = std::max<int64_t>(1, p.K) * static_cast<int64_t>(sizeof(T));
  const int64_t nb = std::max<int64_t>(RB, (l2_bytes() / 2 / bytes_per_col) / RB * RB);
  for (int64_t jb = 0; jb < p.N; jb += nb) {
    const int64_t jend = std::min(p.N, jb + nb);
    for (int64_t i0 = 0; i0 < p.M; i0 += RA) {
      const int ra = static_cast<int>(std::min<int64_t>(RA, p.M - i0));
      for (int64_t j0 = jb; j0 < jend; j0 += RB) {
        const int rb = static_cast<int>(std::min<int64_t>(RB, jend - j0));
        if (p.bias) fill_bias(p, i0, j0, ra, rb);
        Kern<Isa, T>::dot(ra, rb, p.K, p.A + i0 * p.rsa, p.rsa, p.B + j0 * p.csb, p.csb,
                          p.C + i0 * p.rsc + j0 * p.csc, p.rsc, p.csc,
                          p.accumulate || p.bias);
      }
    }
  }
}

// ind_driver's k block, in k. AVX-512: the B micro-panel (kc rows of NR, read in place) in
// 16 KB, a third of the reference machine's L1, beside the A rows the tiles broadcast from (as
// many lines as k): at kc = 256 a 64 KB panel of the 6 x 64 tiles was evicted between tiles;
// 16 KB measured a little faster than 24 or 32 KB on conv2d's implicit GEMMs, within the noise
// of that machine. That gives its widest tile 64 k. Below AVX-512, 64 k whatever the tile width:
// on a Zen 3 (AVX2, 32 KB L1) the same 16 KB rule (128 k for 2 x 4 vectors, 256 for 6 x 2)
// measured 5-20% slower on conv2d's implicit GEMMs than 64 (one thread, the two in one process,
// alternating: stride-2 3x3 forward 0.92x, its grad_input 0.81x, grad_weight 0.91-0.96x of the
// time at 64), and 32, 96 or 128 were no faster than 64.
template <class Isa, typename T, int NV>
constexpr int64_t indirect_kc() {
  constexpr int64_t W = Isa::kBytes / static_cast<int64_t>(sizeof(T));
  if constexpr (Isa::kBytes == 64)
    return std::clamp<int64_t>(kKCIndirectBytes / (W * NV * int64_t(sizeof(T))), 64, kKC);
  else
    return 64;
}

// Outer-product tiles over pointer-table operands. Panels are whole vectors (NR, 2W or W wide,
// greedily), so B rows are never read past N rounded down to W; the last < W columns go through
// a zero-padded copy. rows: gemm_indirect's a_rows (null: adjacent rows).
template <class Isa, typename T, int NV>
void ind_driver(int64_t M, int64_t N, int64_t K, const T* const* a, const int64_t* rows,
                const T* const* b, T* C, int64_t rsc, int64_t csc, const int64_t* c_rows,
                bool accumulate, const T* bias) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  constexpr int MR = mr_of<Isa>(NV);
  thread_local std::vector<T> tail;
  thread_local std::vector<const T*> tail_rows;
  constexpr int64_t KCI = indirect_kc<Isa, T, NV>();
  for (int64_t pc = 0; pc < K; pc += KCI) {
    const int64_t kc = std::min(KCI, K - pc);
    const bool accum = accumulate || pc > 0;
    const bool last = pc + kc == K;
    for (int64_t j = 0; j < N;) {
      const int64_t rem = N - j;
      const int nv = rem >= NV * W ? NV : rem >= 2 * W && NV >= 2 ? 2 : rem >= W ? 1 : 0;
      const T* const* bp = b + pc;
      int64_t bj = j, nr = int64_t(nv) * W;
      if (nv == 0) {  // fewer than W columns left
        tail.assign(static_cast<size_t>(kc * W), T(0));
        tail_rows.resize(static_cast<size_t>(kc));
        for (int64_t k = 0; k < kc; ++k) {
          for (int64_t t = 0; t < rem; ++t) tail[k * W + t] = b[pc + k][j + t];
          tail_rows[k] = tail.data() + k * W;
        }
        bp = tail_rows.data();
        bj = 0;
        nr = rem;
      }
      const T* bb = bias && last ? bias + j : nullptr;
      for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, M - i0));
        T* cp = C + (c_rows ? 0 : i0 * rsc) + j * csc;
        const int64_t* cr = c_rows ? c_rows + i0 : nullptr;
        const T* const* ap = a + pc;
        // The tile kind (width, gathered rows or adjacent ones), its arguments alike.
        const int64_t* r = rows ? rows + i0 : nullptr;
        const int64_t ai = rows ? 0 : i0;
        using Kn = Kern<Isa, T>;
        if (rows && nv == 4)
          Kn::template ind<4, true>(mr, kc, ap, ai, r, bp, bj, cp, rsc, csc, cr, nr, accum, bb);
        else if (rows && nv == 2)
          Kn::template ind<2, true>(mr, kc, ap, ai, r, bp, bj, cp, rsc, csc, cr, nr, accum, bb);
        else if (rows)
          Kn::template ind<1, true>(mr, kc, ap, ai, r, bp, bj, cp, rsc, csc, cr, nr, accum, bb);
        else if (nv == 4)
          Kn::template ind<4, false>(mr, kc, ap, ai, r, bp, bj, cp, rsc, csc, cr, nr, accum, bb);
        else if (nv == 2)
          Kn::template ind<2, false>(mr, kc, ap, ai, r, bp, bj, cp, rsc, csc, cr, nr, accum, bb);
        else
          Kn::template ind<1, false>(mr, kc, ap, ai, r, bp, bj, cp, rsc, csc, cr, nr, accum, bb);
      }
      j += nv == 0 ? rem : nr;
    }
  }
}

template <class Isa, typename T>
void dotseg_driver(int64_t M, int64_t N, int64_t nseg, int64_t len, const T* A, int64_t rsa,
                   int64_t sa, const T* const* b, T* C, int64_t rsc, int64_t csc,
                   bool accumulate) {
  constexpr int RA = Isa::kRA, RB = Isa::kRB;
  const int64_t tm = (M + RA - 1) / RA, tn = (N + RB - 1) / RB;
  // Tiles are independent (each sums all segments in order): split them by shape only.
  const double work = double(nseg) * double(len) * RA * RB;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(65536.0 / std::max(1.0, work)));
  at::parallel_for(0, tm * tn, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = (t / tn) * RA, j0 = (t % tn) * RB;
      Kern<Isa, T>::dotseg(static_cast<int>(std::min<int64_t>(RA, M - i0)),
                           static_cast<int>(std::min<int64_t>(RB, N - j0)), nseg, len,
                           A + i0 * rsa, rsa, sa, b + j0, N, C + i0 * rsc + j0 * csc, rsc, csc,
                           accumulate);
    }
  });
}

// ---- Plans --------------------------------------------------------------------------------

enum class Kind : int { OpN = 0, OpT = 1, Dot = 2 };
struct Plan {
  Kind kind;
  int nv;
};

struct IsaInfo {
  int bytes, mr1, mr2, mr4, ra, rb, rows_nv;
  int mr(int nv) const { return nv == 1 ? mr1 : nv == 2 ? mr2 : mr4; }
};

template <class Isa>
constexpr IsaInfo info_of() {
  return {Isa::kBytes, Isa::kMR1, Isa::kMR2, Isa::kMR4, Isa::kRA, Isa::kRB, rows_tile_nv<Isa>()};
}

// Rough cycle counts; only their order matters. Per cycle: 2 vector FMAs and 2 loads, a
// broadcast being a load (an FMA's memory operand with AVX-512); 4 cycles of FMA latency (the
// reference machine, csrc/cpu/README.md; the same ratios rank the plans at every level with
// AVX2 or SSE). So the 24 x 1, 12 x 2 and 6 x 4-vector tiles
// (25, 14 or 10 loads per 24 FMAs) all run near peak, and the edges decide between them.
// Packing: op_driver copies A and B into panels (a contiguous copy, ~0.25 per element, A once per
// NC block); an operand with the wrong unit stride costs `transpose` more per element
// (kTransposeCost: op_driver packs it straight from its strides, through register transposes
// where it is contiguous along k).
// in_place: ind_driver's tiles read both operands where they are (only a last partial vector of
// columns is copied): no packing terms. Counting op_driver's B copy there made LeNet conv2's
// forward (M = 16 channels, N = the batch) take 24 x 1 tiles over 6 x 4 ones, at 145-250 GFLOP/s
// instead of ~325 (batch 256).
// A tile of C written through strides (store_tile's stack tile, element by element, each to
// another row of C), per element. At 1 the model put a 1x1 convolution's grad_input (M = 64 input
// channels, N = 3136 pixels, K = 256) on C^T's tiles: 0.95 ms against 0.74 for C's own, one thread;
// 2 and 4 both pick C's own, and leave every linear plan as it was.
constexpr double kStridedStore = 4.0;

double op_cost(const IsaInfo& isa, int w, int64_t M, int64_t N, int64_t K, bool pack_a,
               bool pack_b, bool c_strided, int nv, double transpose, bool in_place = false,
               bool a_rows = false) {
  const int mr_max = isa.mr(nv);
  const int64_t nr_max = int64_t(w) * nv;
  auto tile = [&](int64_t mr, int64_t vecs) {
    const double step =
        std::max({4.0, 0.5 * double(mr * vecs), 0.5 * double(mr) + 0.5 * double(vecs)});
    double t = double(K) * step + 2.0 * double(mr * vecs) + 10.0;
    if (c_strided) t += kStridedStore * double(mr * vecs * w);
    return t;
  };
  auto panel = [&](int64_t vecs) {
    return double(M / mr_max) * tile(mr_max, vecs) + (M % mr_max ? tile(M % mr_max, vecs) : 0.0);
  };
  const int64_t full = N / nr_max, tail = N % nr_max;
  double cost = double(full) * panel(nv);
  // A narrow last panel takes a narrower kernel, except where A's rows are read in place (the
  // 4-vector tile then runs over B's zero padding: 16 x 784 -> 256 went to C^T's tiles, 16
  // columns wide, at 2.7x the dot kernel's time while the model counted them 1 vector wide).
  if (tail) cost += panel(a_rows ? nv : tail <= w ? 1 : tail <= 2 * w ? std::min(2, nv) : nv);
  const double n_blocks = std::ceil(double(N) / double(kNC));
  if (in_place) return cost + (tail % w ? 0.5 * double(K) * double(w) : 0.0);
  // The exemptions of op_driver: an operand read once is not copied.
  // (a_rows: op_driver reads A's rows in place, reads_a_rows.)
  const bool a_copied = !a_rows && (pack_a || !reads_a_direct(M, N, K, 1, nr_max, isa.bytes / w)),
             b_copied = pack_b || M > mr_max;
  if (pack_a && !a_rows) cost += transpose * double(M) * double(K);
  if (a_copied) cost += 0.25 * double(M) * double(K) * n_blocks;
  if (pack_b) cost += transpose * double(K) * double(N);
  if (b_copied) cost += 0.25 * double(K) * double(N);
  else if (tail) cost += 0.5 * double(K) * double(nr_max);
  return cost;
}

constexpr double kTransposeCost = 1.0;

// The dot tile's k steps cost kDotStep times the count above: its RA + RB rows stream from L2 for
// every tile, where the outer-product tiles read packed panels from L1. Measured on y = x W^T
// (one thread, AVX-512), the dot tiles took 1.6-1.9x the model's cycles and the outer-product
// plans 0.7-1.4x; with 1.5 the plan chosen was within 4% of the fastest of the four on every
// shape tried (batch 1 to 1024, 84 to 4096 features), where 1.0 kept 256 x 4096 -> 4096 on the
// dot kernel at 1.2x the outer product's time. (Measured before A's rows were read in place;
// rechecked after it on 16, 64 and 256 x 784 -> 256: the fastest plan each time.)
constexpr double kDotStep = 1.5;

double dot_cost(const IsaInfo& isa, int w, int64_t M, int64_t N, int64_t K) {
  const double kv = std::ceil(double(K) / w);
  auto tile = [&](int64_t ra, int64_t rb) {
    double t = kv * kDotStep * std::max({4.0, 0.5 * double(ra * rb), 0.5 * double(ra + rb)});
    t += double(ra * rb) * (std::log2(double(w)) + 1.0) + 10.0;  // horizontal sums
    if (K % w) t += double((ra + rb) * w);
    return t;
  };
  const int64_t fm = M / isa.ra, tm = M % isa.ra, fn = N / isa.rb, tn = N % isa.rb;
  double cost = double(fm * fn) * tile(isa.ra, isa.rb);
  if (tm) cost += double(fn) * tile(tm, isa.rb);
  if (tn) cost += double(fm) * tile(isa.ra, tn);
  if (tm && tn) cost += tile(tm, tn);
  return cost;
}

template <typename T>
Plan make_plan(const IsaInfo& isa, const Problem<T>& p) {
  const int w = isa.bytes / static_cast<int>(sizeof(T));
  Plan best{Kind::OpN, 2};
  double best_cost = -1;
  auto consider = [&](Plan plan, double cost) {
    if (best_cost < 0 || cost < best_cost) {
      best = plan;
      best_cost = cost;
    }
  };
  for (int nv : {4, 2, 1}) {
    // C = A B: the kernel broadcasts A (wants rsa == 1), loads B rows (wants csb == 1).
    consider({Kind::OpN, nv},
             op_cost(isa, w, p.M, p.N, p.K, p.rsa != 1, p.csb != 1, p.csc != 1, nv,
                     kTransposeCost, false,
                     reads_a_rows(isa.rows_nv, nv, p.rsa, p.csa, p.csc, sizeof(T))));
    // C^T = B^T A^T.
    consider({Kind::OpT, nv},
             op_cost(isa, w, p.N, p.M, p.K, p.csb != 1, p.rsa != 1, p.rsc != 1, nv,
                     kTransposeCost, false,
                     reads_a_rows(isa.rows_nv, nv, p.csb, p.rsb, p.rsc, sizeof(T))));
  }
  if (p.csa == 1 && p.rsb == 1) consider({Kind::Dot, 1}, dot_cost(isa, w, p.M, p.N, p.K));
  return best;
}

template <class Isa, typename T>
void run_plan(const Problem<T>& p, Plan plan) {
  switch (plan.kind) {
    case Kind::OpN:
    case Kind::OpT: {
      const Problem<T> t = plan.kind == Kind::OpN
                               ? p
                               : Problem<T>{p.N, p.M, p.K, p.B, p.csb, p.rsb, p.A, p.csa,
                                            p.rsa, p.C, p.csc, p.rsc, p.accumulate, p.bias,
                                            !p.bias_per_row};
      if (plan.nv == 1)
        op_driver<Isa, T, 1>(t);
      else if (plan.nv == 2)
        op_driver<Isa, T, 2>(t);
      else
        op_driver<Isa, T, 4>(t);
      break;
    }
    case Kind::Dot:
      dot_driver<Isa, T>(p);
      break;
  }
}

// ---- Per-ISA kernels ----------------------------------------------------------------------
// c[j] = a * b[j] + 0 for j < n: a row of a product of one k (rank_one). The + 0 is the tiles'
// accumulator starting at zero: a product of -0 stores +0 there, and here.
template <class Isa, typename T>
PE_INLINE void rank_one_row(int64_t n, T a, const T* b, T* c) {
  constexpr int W = Isa::kBytes / static_cast<int>(sizeof(T));
  using vec = typename Vec<T, W>::type;
  const vec zero{};
  int64_t j = 0;
  for (; j + W <= n; j += W) storeu<T, W>(c + j, a * loadu<T, W>(b + j) + zero);
  for (; j < n; ++j) c[j] = a * b[j] + T(0);
}

// The only code compiled for a specific ISA: three functions per (ISA, dtype), into which the
// micro-kernels are inlined. Drivers and packing are plain code that calls them once per tile.
#define PE_TARGET_DEFAULT

#define PE_KERNELS(ISA, TARGET, T)                                                            \
  template <>                                                                                 \
  struct Kern<ISA, T> {                                                                       \
    TARGET __attribute__((noinline)) static void op1(int mr, int64_t kc, const T* a,          \
                                                     int64_t lda, const T* b, int64_t ldb,    \
                                                     T* c, int64_t rsc, int64_t csc,          \
                                                     int64_t nr, bool accum, LineCursor* pf,  \
                                                     int64_t pfn, const T* bias,              \
                                                     bool stream) {                           \
      op_rows<ISA, T, 1, ISA::kMR1>(mr, kc, a, lda, b, ldb, c, rsc, csc, nr, accum, pf, pfn,  \
                                      bias, stream);                                          \
    }                                                                                         \
    TARGET __attribute__((noinline)) static void op2(int mr, int64_t kc, const T* a,          \
                                                     int64_t lda, const T* b, int64_t ldb,    \
                                                     T* c, int64_t rsc, int64_t csc,          \
                                                     int64_t nr, bool accum, LineCursor* pf,  \
                                                     int64_t pfn, const T* bias,              \
                                                     bool stream) {                           \
      op_rows<ISA, T, 2, ISA::kMR2>(mr, kc, a, lda, b, ldb, c, rsc, csc, nr, accum, pf, pfn,  \
                                      bias, stream);                                          \
    }                                                                                         \
    TARGET __attribute__((noinline)) static void op4(int mr, int64_t kc, const T* a,          \
                                                     int64_t lda, const T* b, int64_t ldb,    \
                                                     T* c, int64_t rsc, int64_t csc,          \
                                                     int64_t nr, bool accum, LineCursor* pf,  \
                                                     int64_t pfn, const T* bias,              \
                                                     bool stream) {                           \
      op_rows<ISA, T, 4, ISA::kMR4>(mr, kc, a, lda, b, ldb, c, rsc, csc, nr, accum, pf, pfn,  \
                                      bias, stream);                                          \
    }                                                                                         \
    TARGET __attribute__((noinline)) static void op_a_rows(int mr, int64_t kc, const T* a,    \
                                                           int64_t lda, const T* b,           \
                                                           int64_t ldb, T* c, int64_t rsc,    \
                                                           int64_t csc, int64_t nr,           \
                                                           bool accum, LineCursor* pf,        \
                                                           int64_t pfn, const T* bias,        \
                                                           bool stream) {                     \
      constexpr int NV = rows_tile_nv<ISA>();                                                 \
      op_rows<ISA, T, NV, mr_of<ISA>(NV), true>(mr, kc, a, lda, b, ldb, c, rsc, csc, nr,      \
                                                accum, pf, pfn, bias, stream);                \
    }                                                                                         \
    TARGET __attribute__((noinline)) static void rank1(int64_t n, T a, const T* b, T* c) {    \
      rank_one_row<ISA, T>(n, a, b, c);                                                       \
    }                                                                                         \
    template <int NV, bool G>                                                                 \
    TARGET __attribute__((noinline)) static void ind(int mr, int64_t kc, const T* const* a,   \
                                                     int64_t ai, const int64_t* rows,         \
                                                     const T* const* b, int64_t bj, T* c,     \
                                                     int64_t rsc, int64_t csc,                \
                                                     const int64_t* crows, int64_t nr,        \
                                                     bool accum, const T* bias) {             \
      op_rows_ind<ISA, T, NV, G, mr_of<ISA>(NV)>(mr, kc, a, ai, rows, b, bj, c, rsc, csc,     \
                                                 crows, nr, accum, bias);                     \
    }                                                                                         \
    TARGET __attribute__((noinline)) static void dotseg(int ra, int rb, int64_t nseg,         \
                                                        int64_t len, const T* a, int64_t rsa, \
                                                        int64_t sa, const T* const* b,        \
                                                        int64_t ldbt, T* c, int64_t rsc,      \
                                                        int64_t csc, bool accum) {            \
      dot_seg_tile<ISA, T, ISA::kRA, ISA::kRB>(ra, rb, nseg, len, a, rsa, sa, b, ldbt, c, rsc, \
                                               csc, accum);                                   \
    }                                                                                         \
    TARGET __attribute__((noinline)) static void dot(int ra, int rb, int64_t K, const T* a,   \
                                                     int64_t lda, const T* b, int64_t ldb,    \
                                                     T* c, int64_t rsc, int64_t csc,          \
                                                     bool accum) {                            \
      if (ra == 1)                                                                            \
        dot_tile<ISA, T, 1, ISA::kRB>(ra, rb, K, a, lda, b, ldb, c, rsc, csc, accum);         \
      else if (ra == 2)                                                                       \
        dot_tile<ISA, T, 2, ISA::kRB>(ra, rb, K, a, lda, b, ldb, c, rsc, csc, accum);         \
      else                                                                                    \
        dot_tile<ISA, T, ISA::kRA, ISA::kRB>(ra, rb, K, a, lda, b, ldb, c, rsc, csc, accum);  \
    }                                                                                         \
  };

PE_KERNELS(IsaAvx512, PE_TARGET_AVX512, float)
PE_KERNELS(IsaAvx512, PE_TARGET_AVX512, double)
PE_KERNELS(IsaAvx2, PE_TARGET_AVX2, float)
PE_KERNELS(IsaAvx2, PE_TARGET_AVX2, double)
PE_KERNELS(IsaSse, PE_TARGET_DEFAULT, float)
PE_KERNELS(IsaSse, PE_TARGET_DEFAULT, double)
#undef PE_KERNELS
#undef PE_TARGET_DEFAULT

void run_avx512_f(const Problem<float>& p, Plan plan) { run_plan<IsaAvx512, float>(p, plan); }
void run_avx512_d(const Problem<double>& p, Plan plan) { run_plan<IsaAvx512, double>(p, plan); }
void run_avx2_f(const Problem<float>& p, Plan plan) { run_plan<IsaAvx2, float>(p, plan); }
void run_avx2_d(const Problem<double>& p, Plan plan) { run_plan<IsaAvx2, double>(p, plan); }
void run_sse_f(const Problem<float>& p, Plan plan) { run_plan<IsaSse, float>(p, plan); }
void run_sse_d(const Problem<double>& p, Plan plan) { run_plan<IsaSse, double>(p, plan); }

struct Backend {
  cpu::Isa isa;
  IsaInfo info;
  void (*run_f)(const Problem<float>&, Plan);
  void (*run_d)(const Problem<double>&, Plan);
};

const Backend& backend() {
  static const Backend b = []() -> Backend {
    switch (isa_for(Family::Gemm)) {
      case Isa::Avx512:
        return {Isa::Avx512, info_of<IsaAvx512>(), run_avx512_f, run_avx512_d};
      case Isa::Avx2:
        return {Isa::Avx2, info_of<IsaAvx2>(), run_avx2_f, run_avx2_d};
      default:
        return {Isa::Default, info_of<IsaSse>(), run_sse_f, run_sse_d};
    }
  }();
  return b;
}

template <typename F>
void with_isa(F&& f) {
  switch (backend().isa) {
    case Isa::Avx512:
      f(IsaAvx512{});
      break;
    case Isa::Avx2:
      f(IsaAvx2{});
      break;
    default:
      f(IsaSse{});
  }
}

// C = A B of one k, without accumulation or bias: every element one product, which the tiles
// store as it is (their accumulators start at zero): no panels, no tiles, a pass along C's unit
// stride. Linear's grad_weight at batch 1 (400 -> 120, two threads): 16 -> 9 us a call.
template <typename T>
bool rank_one(const Problem<T>& p) {
  if (p.K != 1 || p.accumulate || p.bias) return false;
  with_isa([&](auto tag) {
    using Kn = Kern<decltype(tag), T>;
    if (p.csc == 1 && p.csb == 1) {
      for (int64_t i = 0; i < p.M; ++i) Kn::rank1(p.N, p.A[i * p.rsa], p.B, p.C + i * p.rsc);
    } else if (p.rsc == 1 && p.rsa == 1) {  // C^T's rows
      for (int64_t j = 0; j < p.N; ++j) Kn::rank1(p.M, p.B[j * p.csb], p.A, p.C + j * p.csc);
    } else {
      for (int64_t i = 0; i < p.M; ++i)
        for (int64_t j = 0; j < p.N; ++j)
          p.C[i * p.rsc + j * p.csc] = p.A[i * p.rsa] * p.B[j * p.csb] + T(0);
    }
  });
  return true;
}

template <typename T>
void run(const Problem<T>& p, Plan plan) {
  if (rank_one(p)) return;
  if constexpr (std::is_same_v<T, float>)
    backend().run_f(p, plan);
  else
    backend().run_d(p, plan);
}

template <typename T>
bool trivial(const Problem<T>& p) {
  if (p.M <= 0 || p.N <= 0) return true;
  if (p.K <= 0) {
    if (p.bias)
      fill_bias(p, 0, 0, p.M, p.N);
    else if (!p.accumulate)
      for (int64_t i = 0; i < p.M; ++i)
        for (int64_t j = 0; j < p.N; ++j) p.C[i * p.rsc + j * p.csc] = T(0);
    return true;
  }
  return false;
}

}  // namespace

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B,
          int64_t rsb, int64_t csb, T* C, int64_t rsc, int64_t csc, bool accumulate,
          const T* bias, bool bias_per_row) {
  TORCH_INTERNAL_ASSERT(!(bias && accumulate), "gemm: a bias is for accumulate=false");
  const Problem<T> p{M, N, K, A, rsa, csa, B, rsb, csb, C, rsc, csc, accumulate, bias,
                     bias_per_row};
  if (trivial(p)) return;
  run(p, make_plan(backend().info, p));
}

// The size of C above which gemm_parallel streams it (store_stream): half the reference
// machine's L3 (32 MB a core complex). A constant, not the cache the C library reports: a KVM
// guest of that machine reports the host's 384 MB. A channels_last 1x1 64 -> 256 @56's forward
// at batch 8 (25.7 MB of C, K = 64) took 0.97x the time, two threads.
constexpr double kStreamBytes = 16.0 * (1 << 20);

// gemm_parallel's "few k": up to this many, where C's placement in the cores' caches counts
// for more than its multiply-adds (measured up to 128: below).
constexpr int64_t kFewK = 128;

template <typename T>
void gemm_parallel(int64_t M, int64_t N, int64_t K, const T* A, int64_t rsa, int64_t csa,
                   const T* B, int64_t rsb, int64_t csb, T* C, int64_t rsc, int64_t csc,
                   bool accumulate, const T* bias, bool bias_per_row) {
  TORCH_INTERNAL_ASSERT(!(bias && accumulate), "gemm_parallel: a bias is for accumulate=false");
  Problem<T> p{M, N, K, A, rsa, csa, B, rsb, csb, C, rsc, csc, accumulate, bias, bias_per_row};
  if (trivial(p)) return;
  // A C written once (no accumulation, one k block: its tiles are stored once) of more than
  // kStreamBytes is streamed past the caches: the next op would find little of it there, and
  // each line's read for ownership cost memory bandwidth.
  p.stream_c = !accumulate && K <= kKC && double(M) * double(N) * sizeof(T) > kStreamBytes;
  const IsaInfo& isa = backend().info;
  // One plan for the whole product: same arithmetic in every task. Each task packs its own
  // panels straight from the operands' strides (op_driver), as gemm() does.
  const Plan plan = make_plan(isa, p);
  // Tile units of C (rows, columns) of the chosen kernel.
  const int64_t w = isa.bytes / static_cast<int64_t>(sizeof(T));
  int64_t ru, cu;
  if (plan.kind == Kind::Dot) {
    ru = isa.ra;
    cu = isa.rb;
  } else {
    const int64_t mr = isa.mr(plan.nv), nr = w * plan.nv;
    ru = plan.kind == Kind::OpN ? mr : nr;
    cu = plan.kind == Kind::OpN ? nr : mr;
  }
  // One task per thread, of at least ~256K multiply-adds (~16K cycles, well above the cost of a
  // parallel region). More tasks would not balance better under at::parallel_for's static split
  // but cost more packing: every task copies its own panels, so a split along M copies B once per
  // task and a split along N copies A once per task. The split may follow the thread count: each
  // C element's arithmetic does not depend on the tile it falls in.
  // Each C element stored counts as 4 multiply-adds: a product of few k is its stores (linear
  // 784 -> 256's grad_weight at batch 1, K = 1, writes 0.8 MB: 21 us on one thread, torch's 13
  // on two).
  const int64_t mt = (M + ru - 1) / ru, nt = (N + cu - 1) / cu;
  const double macs = double(M) * double(N) * (double(K) + 4.0);
  const int64_t want = std::clamp<int64_t>(static_cast<int64_t>(macs / 262144.0), 1,
                                           std::max<int64_t>(1, at::get_num_threads()));
  // A product of few k (linear's grad_weight over a small batch) is mostly its stores, and the
  // op that reads C next (the optimizer's add_: ATen's elementwise loops) splits its work into
  // contiguous ranges of memory. Such a C, if it fits in L2 (where the next op finds it), is
  // split along its outer dimension first, so that each thread writes whole rows (columns):
  // split across C's columns, half of what each thread read next came from the other core's
  // cache. 784 -> 256's grad_weight and then SGD's add_ on it, two threads: 60 -> 25 us at
  // batch 1, 79 -> 53 at 32, 103 -> 83 at 64, 165 -> 145 at 128, the grad_weight alone
  // unchanged. Larger products keep the split that balances their tiles and packing (with
  // C's rows split, 4096 x 4096's grad_weight at batch 256 ran 15% slower).
  const bool few_k = K <= kFewK && double(M) * double(N) * sizeof(T) <= double(l2_bytes());
  const bool rows_outer = rsc >= csc;
  // Otherwise: a split along M makes every task read (and pack) all of B, K x N, a split along
  // N all of A, M x K: split the dimension whose other operand is the smaller, where its tiles
  // still share out evenly (at most a quarter of a task idle). By tile counts alone, 64 x 784
  // -> 256 (linear's forward at batch 64) split its 64 rows and packed all of W^T twice: 92 us
  // where its columns split take 80 (two threads); 1024 rows keep the row split (W^T is then
  // the smaller operand: 1.02 ms, 1.06-1.15 split by columns).
  const auto even = [](int64_t tiles, int64_t parts) {
    return double((tiles + parts - 1) / parts * parts) <= 1.25 * double(tiles);
  };
  int64_t pm = 1, pn = 1;
  while (pm * pn < want) {
    const bool can_m = pm < mt, can_n = pn < nt;
    if (!can_m && !can_n) break;
    const bool m_even = can_m && even(mt, std::min(mt, pm * 2));
    const bool n_even = can_n && even(nt, std::min(nt, pn * 2));
    const bool by_size = double(M) / double(pm) >= double(N) / double(pn);
    const bool split_m = few_k ? (rows_outer ? can_m : !can_n)
                         : m_even && n_even ? by_size
                         : m_even || n_even ? m_even
                                            : can_m && (!can_n || mt * pn >= nt * pm);
    if (split_m)
      pm = std::min(mt, pm * 2);
    else
      pn = std::min(nt, pn * 2);
  }
  // Blocks of whole tiles, except along the tiles' vectors (N for C's own tiles, M for C^T's),
  // where a block may end on any whole vector: linear 784 -> 256's grad_weight at batch 1024
  // (32-column panels) split its 784 columns 416 + 368, and libgomp's wait was 7.7% of the
  // samples (perf, two threads); 400 + 384 columns, one 16-column strip on the narrower tiles,
  // left 6.4%.
  const int64_t fine_r = plan.kind == Kind::OpT ? w : ru, fine_c = plan.kind == Kind::OpN ? w : cu;
  auto block = [](int64_t n, int64_t parts, int64_t unit) {
    return ((n + parts - 1) / parts + unit - 1) / unit * unit;
  };
  const int64_t bm = block(M, pm, fine_r), bn = block(N, pn, fine_c);
  const int64_t tm = (M + bm - 1) / bm, tn = (N + bn - 1) / bn;
  auto task = [&](int64_t t) {
    const int64_t i0 = (t / tn) * bm, j0 = (t % tn) * bn;
    const Problem<T> s{std::min(bm, M - i0), std::min(bn, N - j0), K,
                       A + i0 * rsa, rsa, csa, B + j0 * csb, rsb, csb,
                       C + i0 * rsc + j0 * csc, rsc, csc, accumulate,
                       bias ? bias + (bias_per_row ? i0 : j0) : nullptr, bias_per_row,
                       p.stream_c};
    run(s, plan);
  };
  if (tm * tn == 1) {
    task(0);
    return;
  }
  at::parallel_for(0, tm * tn, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) task(t);
  });
}

template <typename T>
int gemm_indirect_tile_vectors(int64_t M, int64_t N, int64_t K, int64_t csc) {
  const IsaInfo& isa = backend().info;
  const int w = isa.bytes / static_cast<int>(sizeof(T));
  int nv = 4;
  double best = -1;
  for (int v : {4, 2, 1}) {
    const double c = op_cost(isa, w, M, N, K, false, false, csc != 1, v, 0.0, /*in_place=*/true);
    if (best < 0 || c < best) {
      best = c;
      nv = v;
    }
  }
  return nv;
}

template <typename T>
void gemm_indirect(int64_t M, int64_t N, int64_t K, const T* const* a, const T* const* b, T* C,
                   int64_t rsc, int64_t csc, bool accumulate, const int64_t* a_rows,
                   const T* bias, const int64_t* c_rows, int tile_vectors) {
  TORCH_INTERNAL_ASSERT(tile_vectors == 0 || tile_vectors == 1 || tile_vectors == 2 ||
                        tile_vectors == 4);
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        T& c = C[(c_rows ? c_rows[i] : i * rsc) + j * csc];
        const T sum = accumulate ? c : T(0);
        c = bias ? sum + bias[j] : sum;
      }
    return;
  }
  // Tile width from the cost model (no packing here), from the shapes only. Gathered rows keep
  // their offsets in registers (op_tile_ind) and take rows_tile_nv's tile (6 x 4 vectors with
  // AVX-512, 6 x 2 below it).
  const int nv = a_rows         ? backend().info.rows_nv
                 : tile_vectors ? tile_vectors
                                : gemm_indirect_tile_vectors<T>(M, N, K, csc);
  with_isa([&](auto tag) {
    using Isa = decltype(tag);
    if (nv == 4)
      ind_driver<Isa, T, 4>(M, N, K, a, a_rows, b, C, rsc, csc, c_rows, accumulate, bias);
    else if (nv == 2)
      ind_driver<Isa, T, 2>(M, N, K, a, a_rows, b, C, rsc, csc, c_rows, accumulate, bias);
    else
      ind_driver<Isa, T, 1>(M, N, K, a, a_rows, b, C, rsc, csc, c_rows, accumulate, bias);
  });
}

template <typename T>
void gemm_dot_segments(int64_t M, int64_t N, int64_t nseg, int64_t len, const T* A, int64_t rsa,
                       int64_t sa, const T* const* b, T* C, int64_t rsc, int64_t csc,
                       bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (nseg <= 0 || len <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) C[i * rsc + j * csc] = T(0);
    return;
  }
  with_isa([&](auto tag) {
    dotseg_driver<decltype(tag), T>(M, N, nseg, len, A, rsa, sa, b, C, rsc, csc, accumulate);
  });
}

template <typename T>
int64_t simd_width() {
  return backend().info.bytes / static_cast<int64_t>(sizeof(T));
}

template <typename T>
int64_t gathered_tile_width() {
  return backend().info.rows_nv * simd_width<T>();
}


#define PE_INSTANTIATE(T)                                                                     \
  template void gemm<T>(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*,      \
                        int64_t, int64_t, T*, int64_t, int64_t, bool, const T*, bool);        \
  template void gemm_parallel<T>(int64_t, int64_t, int64_t, const T*, int64_t, int64_t,       \
                                 const T*, int64_t, int64_t, T*, int64_t, int64_t, bool,      \
                                 const T*, bool);                                             \
  template void gemm_indirect<T>(int64_t, int64_t, int64_t, const T* const*, const T* const*,  \
                                 T*, int64_t, int64_t, bool, const int64_t*, const T*,       \
                                 const int64_t*, int);                                        \
  template int gemm_indirect_tile_vectors<T>(int64_t, int64_t, int64_t, int64_t);              \
  template void gemm_dot_segments<T>(int64_t, int64_t, int64_t, int64_t, const T*, int64_t,     \
                                     int64_t, const T* const*, T*, int64_t, int64_t, bool);   \
  template int64_t simd_width<T>();                                                            \
  template int64_t gathered_tile_width<T>();
PE_INSTANTIATE(float)
PE_INSTANTIATE(double)
#undef PE_INSTANTIATE

}  // namespace cpu
}  // namespace pyengine
