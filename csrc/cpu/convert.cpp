// bfloat16 <-> float32 and float16 <-> float32 conversion loops (interface and why:
// cpu/convert.h). bfloat16: plain loops over the bit patterns, branch-free, which the compiler
// vectorizes at each instruction-set level. float16: the conversion instructions (AVX-512F's,
// F16C's on AVX2), c10's on the baseline. Split across threads only where a task gets
// kElementwiseGrain elements or more (waking the pool costs more than converting a smaller range).
#include <ATen/Parallel.h>

#include <immintrin.h>

#include "cpu/convert.h"
#include "cpu/isa.h"
#include "cpu/loops.h"

namespace pyengine {
namespace cpu {
namespace {

PE_INLINE void widen_impl(const c10::BFloat16* __restrict__ src, float* __restrict__ dst,
                          int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}
PE_INLINE void narrow_impl(const float* __restrict__ src, c10::BFloat16* __restrict__ dst,
                           int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

// GCC 12 flags its own _mm512_undefined_* inside the conversion intrinsics as uninitialized
// (as in cpu/transpose.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// float16, 16 (AVX-512) or 8 (AVX2) elements a step, the tail under a mask or one by one.
// Narrowing rounds to nearest even, as torch's conversion (c10::Half) does.
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
PE_TARGET_AVX512 void widen_f16_avx512(const c10::Half* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(s + i))));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + i)));
  }
}
PE_TARGET_AVX512 void narrow_f16_avx512(const float* src, c10::Half* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kRound));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(d + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), kRound));
  }
}
PE_TARGET_AVX2 void widen_f16_avx2(const c10::Half* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}
PE_TARGET_AVX2 void narrow_f16_avx2(const float* src, c10::Half* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound));
  for (; i < n; ++i) d[i] = _cvtss_sh(src[i], kRound);
}
#pragma GCC diagnostic pop

void widen_f16_default(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
void narrow_f16_default(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

PE_ISA_FUNCTION_PER_LEVEL(Family::Elementwise, void, widen_f16_range,
                          (const c10::Half* src, float* dst, int64_t n), (src, dst, n),
                          widen_f16_avx512, widen_f16_avx2, widen_f16_default)
PE_ISA_FUNCTION_PER_LEVEL(Family::Elementwise, void, narrow_f16_range,
                          (const float* src, c10::Half* dst, int64_t n), (src, dst, n),
                          narrow_f16_avx512, narrow_f16_avx2, narrow_f16_default)
}  // namespace

PE_ISA_FUNCTION(Family::Elementwise, void, widen_range,
                (const c10::BFloat16* src, float* dst, int64_t n), (src, dst, n), widen_impl)
PE_ISA_FUNCTION(Family::Elementwise, void, narrow_range,
                (const float* src, c10::BFloat16* dst, int64_t n), (src, dst, n), narrow_impl)

namespace {
// range over [0, n), split across threads in tasks of kElementwiseGrain elements or more.
template <typename S, typename D>
void in_tasks(void (*range)(const S*, D*, int64_t), const S* src, D* dst, int64_t n) {
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    range(src + begin, dst + begin, end - begin);
  });
}
}  // namespace

void widen_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  in_tasks(widen_range, src, dst, n);
}
void narrow_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  in_tasks(narrow_range, src, dst, n);
}
void widen_f16(const c10::Half* src, float* dst, int64_t n) {
  in_tasks(widen_f16_range, src, dst, n);
}
void narrow_f16(const float* src, c10::Half* dst, int64_t n) {
  in_tasks(narrow_f16_range, src, dst, n);
}

}  // namespace cpu
}  // namespace pyengine
