// bfloat16 <-> float32 conversion loops (interface and why: cpu/convert.h). Plain loops over
// the bit patterns, branch-free, which the compiler vectorizes at each instruction-set level;
// split across threads only where a task gets kElementwiseGrain elements or more (waking the
// pool costs more than converting a smaller range).
#include <ATen/Parallel.h>

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
}  // namespace

PE_ISA_FUNCTION(Family::Elementwise, void, widen_range,
                (const c10::BFloat16* src, float* dst, int64_t n), (src, dst, n), widen_impl)
PE_ISA_FUNCTION(Family::Elementwise, void, narrow_range,
                (const float* src, c10::BFloat16* dst, int64_t n), (src, dst, n), narrow_impl)

void widen_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    widen_range(src + begin, dst + begin, end - begin);
  });
}

void narrow_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    narrow_range(src + begin, dst + begin, end - begin);
  });
}

}  // namespace cpu
}  // namespace pyengine
