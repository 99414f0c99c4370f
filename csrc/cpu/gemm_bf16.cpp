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
//   B: for each panel of kNR = 64 columns, [p][column]: one panel per task, in L2 (K = 4096:
//      512 KB), packed by 16 x 16 word transposes where B runs along k (linear's forward reads
//      W^T) or by widening two rows where B runs along j (grad_input, grad_weight).
// Micro-kernel: a 6 x 64 tile of C in 24 registers; per pair of k, 4 vector loads of B, 6
// broadcasts of A and 24 dot products of 32 multiply-adds each (twice a float32 FMA's 16). Each
// C element is computed by one task over the whole of K, in order (no K blocking: the packed B
// panel stays in L2, A streams from L2 / L3), then rounded once: results depend on the shapes
// only, never on the thread count.
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

#include "cpu/gemm.h"
#include "cpu/isa.h"
#include "cpu/transpose.h"

namespace pyengine {
namespace cpu {

#if PE_HAVE_AVX512_BF16

namespace {

constexpr int64_t kMR = 6;   // rows of a C tile
constexpr int64_t kNR = 64;  // columns of a C tile: 4 vectors of 16 float32 lanes

// The pair of bfloat16 (lo: element 2p, hi: element 2p + 1; a missing one is zero) as a word.
inline uint32_t pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// All of A as tiles of kMR rows: ap[tile][p][r] = pair (A[i, 2p], A[i, 2p + 1]), i = tile*kMR + r
// (zero rows past M).
// The pairs (lo[t], hi[t]) for t < 16 under mask m, as words (hi null: zero high halves): two
// rows of a matrix stored along the other dimension, merged.
PE_TARGET_AVX512_BF16 inline __m512i merge_rows(const uint16_t* lo, const uint16_t* hi,
                                                 __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, lo));
  if (!hi) return w;
  return _mm512_or_si512(
      w, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hi)), 16));
}

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
      _mm512_store_si512(w, merge_rows(lo + i0, hi ? hi + i0 : nullptr, m));
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
                                 merge_rows(lo + c0, hi ? hi + c0 : nullptr, m));
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
  const float* bias;  // per column, may be null
};

PE_TARGET_AVX512_BF16 void tile(int64_t P, const uint32_t* ap, const uint32_t* bp, int64_t i0,
                                int64_t rows, int64_t j0, int64_t cols, const Epilogue& e) {
  __m512 acc[kMR][4];
  for (int r = 0; r < kMR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + p * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + p * kNR + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bp + p * kNR + 32);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(bp + p * kNR + 48);
    const uint32_t* a = ap + p * kMR;
    for (int r = 0; r < kMR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], ar, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], ar, b3);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    for (int v = 0; v < 4 && v * 16 < cols; ++v) {
      const int64_t jv = j0 + v * 16, n = std::min<int64_t>(16, cols - v * 16);
      const __mmask16 m = static_cast<__mmask16>(n == 16 ? 0xffffu : (1u << n) - 1u);
      __m512 x = acc[r][v];
      if (e.bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, e.bias + jv));
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
        continue;
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
  }
}

void gemm_bf16_impl(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t rsa,
                    int64_t csa, const uint16_t* B, int64_t rsb, int64_t csb, const Epilogue& e) {
  const int64_t P = (K + 1) / 2, row_tiles = (M + kMR - 1) / kMR;
  std::vector<uint32_t> ap(static_cast<size_t>(row_tiles * P * kMR));
  pack_a(M, K, A, rsa, csa, ap.data());
  const int64_t panels = (N + kNR - 1) / kNR;
  at::parallel_for(0, panels, 1, [&](int64_t q0, int64_t q1) {
    std::vector<uint32_t> bp(static_cast<size_t>(std::max<int64_t>(P, 1) * kNR));
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t j0 = q * kNR, cols = std::min(kNR, N - j0);
      pack_b_panel(N, K, B, rsb, csb, j0, bp.data());
      for (int64_t t = 0; t < row_tiles; ++t)
        tile(P, ap.data() + t * P * kMR, bp.data(), t * kMR, std::min(kMR, M - t * kMR), j0,
             cols, e);
    }
  });
}

}  // namespace

bool gemm_bf16_available() { return isa_for(Family::GemmBf16) == Isa::Avx512Bf16; }

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
