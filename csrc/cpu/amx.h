#pragma once
// The AMX tile steps the bfloat16 kernels share (cpu/gemm_bf16.cpp, cpu/conv2d_bf16.cpp), level
// amx_bf16 only. The kernels use the blocking the 8 tile registers allow: C as 2 x 2 tiles
// of 16 x 16 float32 (tiles 0-3: C[0][0], C[0][1], C[1][0], C[1][1]), 2 A tiles (4, 5: 16 rows
// x 16 pairs of bfloat16 each) and 2 B tiles (6, 7: 16 pairs x 16 columns, pair-interleaved),
// so a reduction step is 4 tile loads and 4 TDPBF16PS; for products of 16 columns or fewer, C as
// 4 x 1 tiles (step_quad). (conv2d_bf16.cpp's strip grad_weight holds 6 C tiles of its own.)
#include <immintrin.h>

#include <cstdint>

#include "cpu/isa.h"

#if PE_HAVE_AMX_BF16

namespace pyengine {
namespace cpu {
namespace amx {

struct TileConfig {  // LDTILECFG's 64-byte operand, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows of 64 bytes, for this thread (the configuration is per thread; release with
// _tile_release() when done).
PE_TARGET_AMX_BF16 inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

PE_TARGET_AMX_BF16 PE_INLINE void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// C (+)= [A0; A1] x [B0 B1]: each tile 16 rows of 64 bytes, a0 / a1's rows a_stride bytes
// apart, b0 / b1's b_stride.
PE_TARGET_AMX_BF16 PE_INLINE void step(const void* a0, const void* a1, int64_t a_stride,
                                       const void* b0, const void* b1, int64_t b_stride) {
  _tile_loadd(4, a0, a_stride);
  _tile_loadd(5, a1, a_stride);
  _tile_loadd(6, b0, b_stride);
  _tile_loadd(7, b1, b_stride);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

// For products of 16 columns or fewer, where step's second B tile would be zeros: C tiles 0-3
// (+)= A_k x B, four A tiles (rows a_stride bytes apart; tiles 4 and 5 in turn) against one B
// (tile 6): 5 tile loads for 4 multiplies, none of them on zeros.
PE_TARGET_AMX_BF16 PE_INLINE void step_quad(const void* a0, const void* a1, const void* a2,
                                            const void* a3, int64_t a_stride, const void* b,
                                            int64_t b_stride) {
  _tile_loadd(6, b, b_stride);
  _tile_loadd(4, a0, a_stride);
  _tile_dpbf16ps(0, 4, 6);
  _tile_loadd(5, a1, a_stride);
  _tile_dpbf16ps(1, 5, 6);
  _tile_loadd(4, a2, a_stride);
  _tile_dpbf16ps(2, 4, 6);
  _tile_loadd(5, a3, a_stride);
  _tile_dpbf16ps(3, 5, 6);
}

// step_quad's C tiles to c: tile k's 16 x 16 block at c + 256 k (row stride 16).
PE_TARGET_AMX_BF16 PE_INLINE void store_c_quad(float* c) {
  _tile_stored(0, c, 16 * 4);
  _tile_stored(1, c + 256, 16 * 4);
  _tile_stored(2, c + 512, 16 * 4);
  _tile_stored(3, c + 768, 16 * 4);
}

// C to / from a 32 x 32 float32 block c (row stride 32).
PE_TARGET_AMX_BF16 PE_INLINE void store_c(float* c) {
  _tile_stored(0, c, 32 * 4);
  _tile_stored(1, c + 16, 32 * 4);
  _tile_stored(2, c + 16 * 32, 32 * 4);
  _tile_stored(3, c + 16 * 32 + 16, 32 * 4);
}
PE_TARGET_AMX_BF16 PE_INLINE void load_c(const float* c) {
  _tile_loadd(0, c, 32 * 4);
  _tile_loadd(1, c + 16, 32 * 4);
  _tile_loadd(2, c + 16 * 32, 32 * 4);
  _tile_loadd(3, c + 16 * 32 + 16, 32 * 4);
}

}  // namespace amx
}  // namespace cpu
}  // namespace pyengine

#endif  // PE_HAVE_AMX_BF16
