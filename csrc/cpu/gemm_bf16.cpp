// The bfloat16 matrix multiply (interface: cpu/gemm.h, gemm_bf16): bfloat16 operands, float32
// accumulation, on AVX512_BF16's dot-product instruction (vdpbf16ps: per float32 lane, the sum of
// two bfloat16 products added to the lane), which multiplies twice as many pairs per
// instruction as a float32 FMA, and reads half the bytes.
//
//   C[i, j] = round(bias[j] + sum_k A[i, k] * B[k, j])    (or C (+)= ... in float32)
//
// Layout: the instruction wants both operands as pairs along k. A's pair (A[i, 2p], A[i, 2p+1])
// is broadcast as one 32-bit word; B's pairs for 16 columns fill one vector (column j in lane
// j % 16, its two k's in the lane's two halves). Both operands are packed so (zero-padded to an
// even K and to whole tiles):
//   A: for each tile of kMR = 6 rows, K/2 words per row, pair-major ([p][row]): all of A, once.
//   B: for each panel of kNR = 64 columns, [p][column]: one panel at a time per thread (each
//      thread has a range of C's columns, in panels from its start), in L2 (K = 4096:
//      512 KB), packed by 16 x 16 word transposes where B runs along k (linear's forward reads
//      W^T) or by widening two rows where B runs along j (grad_input, grad_weight).
// Micro-kernel: a 6 x 64 tile of C in 24 registers (a narrower last panel: 1-3 vectors); per
// pair of k, 4 vector loads of B, 6 broadcasts of A and 24 dot products of 32 multiply-adds
// each (twice a float32 FMA's 16). Each C element is computed by one tile over the whole of K,
// in order (no K blocking: the packed B panel stays in L2, A streams from L2 / L3), then
// rounded once: results depend on the shapes only, never on the thread count.
//
// Napkin math, linear 4096 x 4096 at batch 256: 8.6 GFLOP per GEMM. At twice the float32 peak
// measured on the reference machine (455 GFLOP/s on 2 cores: benchmarks/results) the floor is
// ~9.5 ms; A (2 MB packed) is read once per panel (64 panels: 128 MB from L2 / L3), B once
// (32 MB from memory, ~1.5 ms).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/allocator.h"
#include "cpu/amx.h"
#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/transpose.h"

namespace pyengine {
namespace cpu {

#if PE_HAVE_AVX512_BF16

// GCC 12 flags its own _mm512_undefined_* inside the widening intrinsics (merge_rows) as
// uninitialized wherever they are inlined (as in cpu/transpose.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kMR = 6;   // rows of a C tile
constexpr int64_t kNR = 64;  // columns of a C tile: 4 vectors of 16 float32 lanes
// Elements of a C small enough (256 KB of float32, in L2) to be stored transposed element by
// element (gemm_bf16_impl).
constexpr int64_t kSmallTransposedC = 65536;

// The pair of bfloat16 (lo: element 2p, hi: element 2p + 1; a missing one is zero) as a word.
inline uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// All of A as tiles of kMR rows: ap[tile][p][r] = pair (A[i, 2p], A[i, 2p + 1]), i = tile*kMR + r
// (zero rows past M).
// pack_a's words for pairs [p0, p1) where A runs along i (rsa == 1): linear's grad_weight reads
// dY^T. Rows 2p and 2p + 1 of the stored matrix widened and merged, 16 rows of A at a time, then
// placed in their tiles.
PE_TARGET_AVX512_BF16 void pack_a_along_i(int64_t M, int64_t K, const uint16_t* A, int64_t csa,
                                          int64_t p0, int64_t p1, uint32_t* ap) {
  const int64_t P = (K + 1) / 2;
  alignas(64) uint32_t w[16];
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* lo = A + 2 * p * csa;
    const uint16_t* hi = 2 * p + 1 < K ? lo + csa : nullptr;
    for (int64_t i0 = 0; i0 < M; i0 += 16) {
      const int64_t n = std::min<int64_t>(16, M - i0);
      const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
      _mm512_store_si512(w, conv2d::merge_rows(lo + i0, hi ? hi + i0 : nullptr, m));
      for (int64_t l = 0; l < n; ++l) {
        const int64_t i = i0 + l;
        ap[(i / kMR) * P * kMR + p * kMR + i % kMR] = w[l];
      }
    }
  }
}

void pack_a(int64_t M, int64_t K, const uint16_t* A, int64_t rsa, int64_t csa, uint32_t* ap) {
  const int64_t P = (K + 1) / 2, tiles = (M + kMR - 1) / kMR;
  if (rsa == 1 && csa != 1) {
    std::fill(ap, ap + tiles * P * kMR, 0u);  // the rows past M
    at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
      pack_a_along_i(M, K, A, csa, p0, p1, ap);
    });
    return;
  }
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint32_t* dst = ap + t * P * kMR;
      for (int64_t r = 0; r < kMR; ++r) {
        const int64_t i = t * kMR + r;
        if (i >= M) {
          for (int64_t p = 0; p < P; ++p) dst[p * kMR + r] = 0;
          continue;
        }
        const uint16_t* row = A + i * rsa;
        for (int64_t p = 0; p < K / 2; ++p)
          dst[p * kMR + r] = pair(row[2 * p * csa], row[(2 * p + 1) * csa]);
        if (K % 2) dst[(P - 1) * kMR + r] = pair(row[(K - 1) * csa], 0);
      }
    }
  });
}

// B's columns [j0, j0 + kNR) as bp[p][c] = pair (B[2p, j0 + c], B[2p + 1, j0 + c]) (zero columns
// past N, zero k past K).
PE_TARGET_AVX512_BF16 void pack_b_panel(int64_t N, int64_t K, const uint16_t* B, int64_t rsb,
                                        int64_t csb, int64_t j0, uint32_t* bp) {
  const int64_t P = (K + 1) / 2, nc = std::min(kNR, N - j0);
  if (nc < kNR) std::memset(bp, 0, sizeof(uint32_t) * P * kNR);
  if (rsb == 1 && csb % 2 == 0 && K % 2 == 0) {
    // Along k, each column's pairs are consecutive words: 16 x 16 word transposes (the words
    // move as float32 bit patterns: transpose16 only shuffles them).
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
      const int64_t rows = std::min<int64_t>(16, nc - c0);
      const float* src = reinterpret_cast<const float*>(B + (j0 + c0) * csb);
      for (int64_t p0 = 0; p0 < P; p0 += 16)
        conv2d::transpose16(src + p0, csb / 2, rows, std::min<int64_t>(16, P - p0),
                    reinterpret_cast<float*>(bp + p0 * kNR + c0), kNR, nullptr);
    }
    return;
  }
  if (csb == 1) {
    // Along j: rows 2p and 2p + 1 widened to words and merged, 16 columns at a time.
    for (int64_t p = 0; p < P; ++p) {
      const uint16_t* lo = B + 2 * p * rsb + j0;
      const uint16_t* hi = 2 * p + 1 < K ? lo + rsb : nullptr;
      for (int64_t c0 = 0; c0 < nc; c0 += 16) {
        const int64_t n = std::min<int64_t>(16, nc - c0);
        const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
        _mm512_mask_storeu_epi32(bp + p * kNR + c0, m,
                                 conv2d::merge_rows(lo + c0, hi ? hi + c0 : nullptr, m));
      }
    }
    return;
  }
  // Any other layout (B along k with an odd K: its columns are not whole words apart) packs
  // element by element: correct, several times slower than the two paths above.
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < nc; ++c) {
      const uint16_t* b = B + 2 * p * rsb + (j0 + c) * csb;
      bp[p * kNR + c] = pair(b[0], 2 * p + 1 < K ? b[rsb] : 0);
    }
}

// out: the C tile's rows (< kMR) and columns (< kNR) that exist, as float32 (accumulate adds C)
// or bfloat16 (rounded to nearest even by the instruction), plus bias[j] when given.
struct Epilogue {
  float* c32;
  uint16_t* c16;
  int64_t rsc, csc;
  bool accumulate;
  const float* bias;          // per column (per row if bias_by_row), may be null
  bool bias_by_row = false;   // (the transposed product of a thin one: gemm_bf16_impl)
};

// C[i, jv .. jv + n) (n <= 16) from the float32 sums x, as the epilogue says.
PE_TARGET_AVX512_BF16 PE_INLINE void store_sums(__m512 x, int64_t i, int64_t jv, int64_t n,
                                                const Epilogue& e) {
  const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
  if (e.bias)
    x = _mm512_add_ps(x, e.bias_by_row ? _mm512_set1_ps(e.bias[i])
                                       : _mm512_maskz_loadu_ps(m, e.bias + jv));
  if (e.csc == 1) {
    // Whole vectors store unmasked: a masked store to memory costs several times as much
    // on AMD cores (perf: 14% of grad_weight's kernel time, 4096 x 4096 bfloat16).
    if (e.c32) {
      float* c = e.c32 + i * e.rsc + jv;
      if (e.accumulate) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, c));
      if (n == 16)
        _mm512_storeu_ps(c, x);
      else
        _mm512_mask_storeu_ps(c, m, x);
    } else {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
      uint16_t* c = e.c16 + i * e.rsc + jv;
      if (n == 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), h);
      else
        _mm256_mask_storeu_epi16(c, m, h);
    }
    return;
  }
  alignas(64) float f[16];
  alignas(32) uint16_t h[16];
  _mm512_store_ps(f, x);
  _mm256_store_si256(reinterpret_cast<__m256i*>(h), (__m256i)_mm512_cvtneps_pbh(x));
  for (int64_t l = 0; l < n; ++l) {
    const int64_t at = i * e.rsc + (jv + l) * e.csc;
    if (e.c32)
      e.c32[at] = e.accumulate ? e.c32[at] + f[l] : f[l];
    else
      e.c16[at] = h[l];
  }
}

// The first NV vectors of a panel (a narrow last one: its other columns would be padding). Each
// column's sums are the same whatever NV.
template <int NV>
PE_TARGET_AVX512_BF16 PE_INLINE void tile_nv(int64_t P, const uint32_t* ap, const uint32_t* bp,
                                             int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                                             const Epilogue& e) {
  __m512 acc[kMR][NV];
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(bp + p * kNR + 16 * v);
    const uint32_t* a = ap + p * kMR;
    for (int r = 0; r < kMR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, b[v]);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < NV && v * 16 < cols; ++v)
      store_sums(acc[r][v], i0 + r, j0 + v * 16, std::min<int64_t>(16, cols - v * 16), e);
}

PE_TARGET_AVX512_BF16 void tile(int64_t P, const uint32_t* ap, const uint32_t* bp, int64_t i0,
                                int64_t rows, int64_t j0, int64_t cols, const Epilogue& e) {
  if (cols > 48)
    tile_nv<4>(P, ap, bp, i0, rows, j0, cols, e);
  else if (cols > 32)
    tile_nv<3>(P, ap, bp, i0, rows, j0, cols, e);
  else if (cols > 16)
    tile_nv<2>(P, ap, bp, i0, rows, j0, cols, e);
  else
    tile_nv<1>(P, ap, bp, i0, rows, j0, cols, e);
}

#if PE_HAVE_AMX_BF16
// ---- AMX (level amx_bf16) -----------------------------------------------------------------------
// The same product on AMX's tile multiply: TDPBF16PS adds to a 16 x 16 float32 tile of C the
// products of an A tile (16 rows x 16 pairs along k) and a B tile (16 pairs x 16 columns), 8192
// multiply-adds in one instruction (16 times an AVX-512 FMA unit's per cycle, by Intel's
// figures), with the dot-product instruction's rounding (bfloat16 products summed in float32,
// denormals as zero). Eight tile registers: C as a 32 x 32 block (4 tiles), 2 tiles of A (32
// rows), 2 of B (32 columns). Operands, K padded to whole tiles with zero pairs (Pp = P rounded
// up to 16):
//   A: row-major words apx[i][p], Pp per row, rows padded to a multiple of 32;
//   B: pack_b_panel's panels (bp[p][c], 64 columns), rows P .. Pp zero: a B tile is 16 rows of
//      16 words, 256 bytes apart.
// Each 32 x 32 block of C is summed over all of K in order by one task, stored from the tiles to
// a float32 buffer and finished by store_sums (bias, float32 or rounded bfloat16): results depend
// on the shapes only, never on the thread count.
//
// Napkin math, linear 4096 x 4096 at batch 256 (8.6 GFLOP): a block step (16 pairs) is 4 tile
// multiplies (64 cycles at one per 16) against 4 tile loads of 1 KB (A from L2: 2 KB per step, B
// from L1/L2), so about half the tile unit's peak, ~500 FLOP per cycle and core, against 64 for
// float32 FMAs: the pack of A and each B panel then weigh as much as the multiplies.
constexpr int64_t kAmxRows = 32;   // rows of a C block: 2 A tiles
constexpr int64_t kAmxPairs = 16;  // pairs along k in one tile
constexpr int64_t kAmxMinDim = 16;  // M, N and K from which the tiles run (gemm_bf16_impl)

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// apx's words for rows [16 b0, 16 b1) where A runs along i (rsa == 1: linear's grad_weight reads
// dY^T): rows 2p and 2p + 1 of the stored matrix merged into 16 x 16 blocks of words, transposed
// into place (apx zeroed before: pads stay zero).
PE_TARGET_AVX512_BF16 void pack_a_amx_along_i(int64_t M, int64_t K, const uint16_t* A,
                                              int64_t csa, int64_t Pp, int64_t b0, int64_t b1,
                                              uint32_t* apx) {
  const int64_t P = (K + 1) / 2;
  alignas(64) uint32_t w[16 * 16];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * 16, ni = std::min<int64_t>(16, M - i0);
    const __mmask16 m = static_cast<__mmask16>(ni == 16 ? 0xffffu : (1u << ni) - 1u);
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, P - p0);
      for (int64_t q = 0; q < np; ++q) {
        const uint16_t* lo = A + 2 * (p0 + q) * csa + i0;
        const uint16_t* hi = 2 * (p0 + q) + 1 < K ? lo + csa : nullptr;
        _mm512_store_si512(w + q * 16, conv2d::merge_rows(lo, hi, m));
      }
      conv2d::transpose16(reinterpret_cast<const float*>(w), 16, np, ni,
                          reinterpret_cast<float*>(apx + i0 * Pp + p0), Pp, nullptr);
    }
  }
}

void pack_a_amx(int64_t M, int64_t K, const uint16_t* A, int64_t rsa, int64_t csa, int64_t Pp,
                uint32_t* apx) {
  const int64_t P = (K + 1) / 2, Mp = round_up(M, kAmxRows);
  if (rsa == 1 && csa != 1) {
    std::fill(apx, apx + Mp * Pp, 0u);
    at::parallel_for(0, (M + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
      pack_a_amx_along_i(M, K, A, csa, Pp, b0, b1, apx);
    });
    return;
  }
  at::parallel_for(0, Mp, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      uint32_t* dst = apx + i * Pp;
      if (i >= M) {
        std::fill(dst, dst + Pp, 0u);
        continue;
      }
      const uint16_t* row = A + i * rsa;
      if (csa == 1) {  // the row's pairs are its bytes
        std::memcpy(dst, row, sizeof(uint32_t) * (K / 2));
      } else {
        for (int64_t p = 0; p < K / 2; ++p) dst[p] = pair(row[2 * p * csa], row[(2 * p + 1) * csa]);
      }
      if (K % 2) dst[P - 1] = pair(row[(K - 1) * csa], 0);
      std::fill(dst + P, dst + Pp, 0u);
    }
  });
}

// The 32 x 32 block of C from apx's rows a (32 rows, Pp words apart) and the B panel's columns
// b (32, kNR words apart), over all Pp pairs, into buf (32 x 32 float32).
PE_TARGET_AMX_BF16 void amx_block(int64_t Pp, const uint32_t* a, const uint32_t* b, float* buf) {
  amx::zero_c();
  for (int64_t p0 = 0; p0 < Pp; p0 += kAmxPairs)
    amx::step(a + p0, a + 16 * Pp + p0, Pp * 4, b + p0 * kNR, b + p0 * kNR + 16, kNR * 4);
  amx::store_c(buf);
}

// Panels [q0, q1) of C, on this thread (the tile configuration is per thread).
PE_TARGET_AMX_BF16 void amx_panels(int64_t M, int64_t N, int64_t K, const uint32_t* apx,
                                   int64_t Pp, const uint16_t* B, int64_t rsb, int64_t csb,
                                   int64_t q0, int64_t q1, const Epilogue& e) {
  const int64_t P = (K + 1) / 2;
  amx::configure();
  // Panels two at a time: each 32-row block of A (from L3: all of A is read once per pair) then
  // serves 4 C blocks from L2 instead of 2 (both packed panels and the block fit in L2 at
  // K = 4096: 2 x 512 KB + 256 KB).
  constexpr int64_t kPanels = 2;
  CachedBuffer<uint32_t> bp(static_cast<size_t>(kPanels * Pp * kNR));  // zeros: rows P .. Pp
  alignas(64) float buf[kAmxRows * 32];
  for (int64_t q = q0; q < q1; q += kPanels) {
    const int64_t panels = std::min(kPanels, q1 - q);
    if (P > 0)
      for (int64_t k = 0; k < panels; ++k)
        pack_b_panel(N, K, B, rsb, csb, (q + k) * kNR, bp.data() + k * Pp * kNR);
    for (int64_t i0 = 0; i0 < M; i0 += kAmxRows) {
      const int64_t rows = std::min(kAmxRows, M - i0);
      for (int64_t k = 0; k < panels; ++k) {
        const int64_t j0 = (q + k) * kNR, cols = std::min(kNR, N - j0);
        for (int64_t c0 = 0; c0 < cols; c0 += 32) {
          amx_block(Pp, apx + i0 * Pp, bp.data() + k * Pp * kNR + c0, buf);
          const int64_t nc = std::min<int64_t>(32, cols - c0);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t v = 0; v * 16 < nc; ++v)
              store_sums(_mm512_load_ps(buf + r * 32 + v * 16), i0 + r, j0 + c0 + v * 16,
                         std::min<int64_t>(16, nc - v * 16), e);
        }
      }
    }
  }
  _tile_release();
}

void gemm_bf16_amx(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t rsa, int64_t csa,
                   const uint16_t* B, int64_t rsb, int64_t csb, const Epilogue& e) {
  const int64_t P = (K + 1) / 2, Pp = round_up(std::max<int64_t>(P, 1), kAmxPairs);
  // (pack_a_amx writes every word, pads included)
  CachedBuffer<uint32_t> apx(static_cast<size_t>(round_up(M, kAmxRows) * Pp), false);
  pack_a_amx(M, K, A, rsa, csa, Pp, apx.data());
  at::parallel_for(0, (N + kNR - 1) / kNR, 1, [&](int64_t q0, int64_t q1) {
    amx_panels(M, N, K, apx.data(), Pp, B, rsb, csb, q0, q1, e);
  });
}
#endif  // PE_HAVE_AMX_BF16

void gemm_bf16_impl(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t rsa,
                    int64_t csa, const uint16_t* B, int64_t rsb, int64_t csb, const Epilogue& e) {
#if PE_HAVE_AMX_BF16
  // Tiles pad M to 32 rows and K to 32: a product thinner than a tile in any dimension (LeNet's
  // linear layers at batch 1, a grad_weight over one row) is faster on the dot products (batch-1
  // LeNet step under bf16 autocast: 0.59 ms with them against 0.67-0.77 ms on tiles).
  const bool thin = M < kAmxMinDim || N < kAmxMinDim || K < kAmxMinDim;
  if (isa_for(Family::GemmBf16) == Isa::AmxBf16 && !thin) {
    gemm_bf16_amx(M, N, K, A, rsa, csa, B, rsb, csb, e);
    return;
  }
#endif
  // The dot-product tile is kMR rows x kNR columns: a product of few columns (a classifier's
  // 10 outputs) would compute mostly padding, in one panel on one thread (linear 1024 x 256 ->
  // 10: 0.36 ms, torch 0.04). Its transpose, C^T = B^T A^T, pads less: it runs instead, its
  // results stored transposed (each sum the same pairs in the same order), where it computes
  // at most half the padded tiles or C is small: its C is stored element by element, rows of
  // C apart, which a large C pays a cache miss each for. (y = x W^T at 256 x 512 -> 4096 went
  // transposed for 0.7% less padding, at 102 GFLOP/s, one thread, Zen 5; 489 without.)
  auto padded = [](int64_t rows, int64_t cols) {
    return ((rows + kMR - 1) / kMR) * kMR * (((cols + kNR - 1) / kNR) * kNR);
  };
  const bool small_c = M * N <= kSmallTransposedC;
  if (!e.bias_by_row && padded(N, M) < padded(M, N) &&
      (small_c || 2 * padded(N, M) <= padded(M, N))) {
    Epilogue t = e;
    t.rsc = e.csc;
    t.csc = e.rsc;
    t.bias_by_row = true;
    gemm_bf16_impl(N, M, K, B, csb, rsb, A, csa, rsa, t);
    return;
  }
  const int64_t P = (K + 1) / 2, row_tiles = (M + kMR - 1) / kMR;
  CachedBuffer<uint32_t> ap(static_cast<size_t>(row_tiles * P * kMR), false);  // all written
  pack_a(M, K, A, rsa, csa, ap.data());
  // C's columns in one range of whole vectors per thread, each range in panels of kNR from its
  // start (its last one narrower): split by whole panels, 784 columns (linear 784 -> 256's
  // grad_weight) went 7 panels to one thread and 5 and a quarter to the other, whose wait was
  // most of libgomp's 14% of an MLP's bf16 training step (perf). Each C element's sums do not
  // depend on the split.
  const int64_t panels = (N + kNR - 1) / kNR, vectors = (N + 15) / 16;
  const int64_t parts = std::min<int64_t>(panels, std::max(1, at::get_num_threads()));
  at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
    CachedBuffer<uint32_t> bp(static_cast<size_t>(std::max<int64_t>(P, 1) * kNR), false);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t end = std::min(N, (q + 1) * vectors / parts * 16);
      for (int64_t j0 = q * vectors / parts * 16; j0 < end; j0 += kNR) {
        const int64_t cols = std::min(kNR, end - j0);
        pack_b_panel(end, K, B, rsb, csb, j0, bp.data());  // (columns past `end`: zeros)
        for (int64_t t = 0; t < row_tiles; ++t)
          tile(P, ap.data() + t * P * kMR, bp.data(), t * kMR, std::min(kMR, M - t * kMR), j0,
               cols, e);
      }
    }
  });
}

}  // namespace

bool gemm_bf16_available() { return isa_for(Family::GemmBf16) >= Isa::Avx512Bf16; }

void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t rsa, int64_t csa,
               const uint16_t* B, int64_t rsb, int64_t csb, float* C, int64_t rsc, int64_t csc,
               bool accumulate, const float* bias) {
  if (M == 0 || N == 0) return;
  gemm_bf16_impl(M, N, K, A, rsa, csa, B, rsb, csb, Epilogue{C, nullptr, rsc, csc, accumulate,
                                                              bias});
}

void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t rsa, int64_t csa,
               const uint16_t* B, int64_t rsb, int64_t csb, uint16_t* C, int64_t rsc,
               int64_t csc, const float* bias) {
  if (M == 0 || N == 0) return;
  gemm_bf16_impl(M, N, K, A, rsa, csa, B, rsb, csb, Epilogue{nullptr, C, rsc, csc, false, bias});
}

#pragma GCC diagnostic pop

#else  // a compiler without AVX512_BF16 intrinsics: the float32 path serves bfloat16

bool gemm_bf16_available() { return false; }

void gemm_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, const uint16_t*,
               int64_t, int64_t, float*, int64_t, int64_t, bool, const float*) {
  TORCH_CHECK(false, "pyengine: gemm_bf16 was not compiled (compiler without AVX512_BF16)");
}
void gemm_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, int64_t, const uint16_t*,
               int64_t, int64_t, uint16_t*, int64_t, int64_t, const float*) {
  TORCH_CHECK(false, "pyengine: gemm_bf16 was not compiled (compiler without AVX512_BF16)");
}

#endif

}  // namespace cpu
}  // namespace pyengine
