#pragma once
// The instruction sets pyengine's CPU kernels are compiled for, and the one run-time choice among
// them. No -march=native: the library runs on any x86-64, and its hot loops exist in up to three
// builds, picked per process:
//   amx_bf16  AVX512_BF16 with AMX's bfloat16 tile multiply (PE_TARGET_AMX_BF16), where the CPU
//            has AMX-TILE and AMX-BF16 and Linux grants the process the tile state: the bfloat16
//            GEMM and conv2d's bfloat16 kernels only (family GemmBf16); every other family as
//            avx512_bf16
//   avx512_bf16  AVX-512 with AVX512_BF16's bfloat16 dot products (PE_TARGET_AVX512_BF16): the
//            bfloat16 GEMM and conv2d's bfloat16 kernels only (family GemmBf16); every other
//            family runs its avx512 build
//   avx512   AVX-512 F, VL, DQ and BW, with AVX2 and FMA (PE_TARGET_AVX512)
//   avx2     AVX2 with FMA and F16C                        (PE_TARGET_AVX2)
//   default  the x86-64 baseline, SSE2                      (no target attribute)
// isa() is the best of these that this CPU has, or a lower one named by the environment variable
// PYENGINE_CPU_ISA=amx_bf16|avx512_bf16|avx512|avx2|default (read once; never above what the CPU
// has),
// so that the tests run every kernel's lower builds on an AVX-512 machine. Each kernel family runs with
// isa_for(family): isa(), or the best level below it that the family has code for (gemm_bf16
// has amx_bf16 and avx512_bf16 code only).
//
// A kernel gets its per-ISA builds from one always-inline template body (PE_INLINE) and
// PE_ISA_FUNCTION, which compiles it into a target-attributed function per level plus a
// dispatcher that calls the one isa_for() picks. (GCC's target_clones would pick by CPU through
// an ifunc, out of reach of PYENGINE_CPU_ISA.) Code written with intrinsics of one level is marked
// PE_TARGET_AVX512 (or _AVX2) and called only when isa_for() says that level.
//
// Results depend on the level only where FMA contraction or vector tails change the rounding
// (GEMM, softmax, exp): one level always gives the same bits, whatever the thread count.
#if !defined(__x86_64__)
#error "pyengine's CPU kernels are written for x86-64 (AVX-512 / AVX2 / SSE2 builds)"
#endif

#include <map>
#include <string>

#define PE_INLINE inline __attribute__((always_inline))
// Marks a loop over a vector's lanes (a constant trip count, 8 to 32) that must reach the
// vectorizer as a loop: GCC may otherwise unroll it completely first and compile its body as
// scalars (perf found that in cross_entropy's target pick and softmax's row max).
#define PE_LANES _Pragma("GCC unroll 1")
#define PE_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define PE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX512_BF16 intrinsics need GCC 10 or clang; an older compiler builds without the level.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10)
#define PE_HAVE_AVX512_BF16 1
#define PE_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")))
#else
#define PE_HAVE_AVX512_BF16 0
#endif
// AMX intrinsics (_tile_dpbf16ps) need GCC 11 or clang 12.
#if defined(__clang__) ? (__clang_major__ >= 12) : (defined(__GNUC__) && __GNUC__ >= 11)
#define PE_HAVE_AMX_BF16 PE_HAVE_AVX512_BF16
#define PE_TARGET_AMX_BF16                                                                     \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2," \
                        "fma")))
#else
#define PE_HAVE_AMX_BF16 0
#endif

namespace pyengine {
namespace cpu {

enum class Isa : int { Default = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, AmxBf16 = 4 };

// "amx_bf16", "avx512_bf16", "avx512", "avx2" or "default".
const char* isa_name(Isa isa);

// The instruction set the kernels run with (see the top of the file). Raises a clear error, on
// every call, when PYENGINE_CPU_ISA holds anything but the five names.
Isa isa();

// Kernel families, each with its own set of compiled levels (isa.cpp lists them).
enum class Family : int {
  Gemm,          // cpu/gemm.cpp: the matrix multiplies of conv2d and linear
  GemmBf16,      // cpu/gemm_bf16.cpp: the bfloat16 matrix multiply (amx_bf16, avx512_bf16);
                 // cpu/conv2d_bf16.cpp: conv2d's bfloat16 kernels (amx_bf16, avx512_bf16)
  Conv2d,        // cpu/conv2d*.cpp: im2col, col2im, batch transposes, bias gradients
  Linear,        // cpu/linear.cpp: the bias gradient's column sums
  MaxPool2d,     // cpu/pool.cpp
  Softmax,       // cpu/softmax.cpp: softmax and log_softmax, forward and backward
  CrossEntropy,  // cpu/cross_entropy.cpp
  Elementwise,   // cpu/loops.h users (activations, mse_loss, binary_cross_entropy)
};

// The level `family` runs with: isa(), or the best level below it that the family has code for.
Isa isa_for(Family family);

// {family name: level name} for every family, e.g. {"max_pool2d": "avx512", ...}: what
// pyengine._C.cpu_isa() reports.
std::map<std::string, std::string> kernel_isas();

}  // namespace cpu
}  // namespace pyengine

// Defines `ret name params`, which runs `body args` compiled for the level isa_for(family) picks:
// body is an always-inline function (or template instance), args the parameter names in
// parentheses. Also defines name_avx512, name_avx2 and name_default, one per level. E.g.
//   PE_ISA_FUNCTION(Family::Conv2d, void, row_sums, (const float* b, int64_t n, float* out),
//                   (b, n, out), row_sums_impl<float>)
// Overloads (one per dtype) are fine: each expansion defines its own four functions.
#define PE_ISA_FUNCTION(family, ret, name, params, args, ...)                   \
  PE_ISA_FUNCTION_PER_LEVEL(family, ret, name, params, args, (__VA_ARGS__), (__VA_ARGS__), \
                            (__VA_ARGS__))

// PE_ISA_FUNCTION with a body per level, each in parentheses, for kernels whose register blocking
// follows the register file: AVX-512 has 32 vector registers of 64 bytes, AVX2 16 of 32 (a
// 64-byte GCC vector takes two), SSE2 16 of 16. E.g. a block of 24 accumulating 64-byte vectors
// fits AVX-512 and spills on AVX2 (csrc/cpu/conv2d_direct.cpp).
#define PE_ISA_FUNCTION_PER_LEVEL(family, ret, name, params, args, avx512_body, avx2_body,   \
                                  default_body)                                            \
  PE_TARGET_AVX512 ret name##_avx512 params { return avx512_body args; }                  \
  PE_TARGET_AVX2 ret name##_avx2 params { return avx2_body args; }                        \
  ret name##_default params { return default_body args; }                                 \
  ret name params {                                                                        \
    static const ::pyengine::cpu::Isa level =                                              \
        ::pyengine::cpu::isa_for(::pyengine::cpu::family);                                 \
    switch (level) {                                                                       \
      case ::pyengine::cpu::Isa::Avx512:                                                   \
        return name##_avx512 args;                                                         \
      case ::pyengine::cpu::Isa::Avx2:                                                     \
        return name##_avx2 args;                                                           \
      default:                                                                             \
        return name##_default args;                                                        \
    }                                                                                      \
  }
