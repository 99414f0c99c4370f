// The run-time choice of instruction set for every CPU kernel family (interface: cpu/isa.h).
#include "cpu/isa.h"

#include <c10/util/Exception.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace pyengine {
namespace cpu {
namespace {

// What isa() decided: a level, or why PYENGINE_CPU_ISA could not be honoured.
struct Choice {
  Isa isa = Isa::Default;
  std::string error;
};

// AMX's bfloat16 tile multiply, usable by this process: the CPU has AMX-TILE and AMX-BF16
// (CPUID.(7, 0):EDX bits 24 and 22), the OS saves the tile state (XCR0 bits 17 and 18), and Linux
// grants this process the large tile-data state (arch_prctl ARCH_REQ_XCOMP_PERM; without it the
// first tile instruction faults). The grant covers every thread of the process.
bool amx_bf16_usable() {
#if PE_HAVE_AMX_BF16 && defined(__linux__) && defined(SYS_arch_prctl)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Choice choose() {
  __builtin_cpu_init();
  const bool has_avx512 =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  // (every AVX2 CPU has F16C: float16 conversions, cpu/convert.cpp)
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  const bool has_avx512_bf16 =
      PE_HAVE_AVX512_BF16 && has_avx512 && __builtin_cpu_supports("avx512bf16");
  // (asked only where AVX512_BF16 is there: it requests the tile state from the kernel)
  const bool has_amx_bf16 = has_avx512_bf16 && amx_bf16_usable();
  const Isa best = has_amx_bf16      ? Isa::AmxBf16
                   : has_avx512_bf16 ? Isa::Avx512Bf16
                   : has_avx512    ? Isa::Avx512
                   : has_avx2      ? Isa::Avx2
                                   : Isa::Default;
  Choice c;
  c.isa = best;
  const char* env = std::getenv("PYENGINE_CPU_ISA");
  if (env == nullptr || *env == '\0') return c;
  const std::string wanted = env;
  Isa asked;
  if (wanted == "amx_bf16") {
    asked = Isa::AmxBf16;
  } else if (wanted == "avx512_bf16") {
    asked = Isa::Avx512Bf16;
  } else if (wanted == "avx512") {
    asked = Isa::Avx512;
  } else if (wanted == "avx2") {
    asked = Isa::Avx2;
  } else if (wanted == "default") {
    asked = Isa::Default;
  } else {
    c.error = "pyengine: expected the environment variable PYENGINE_CPU_ISA to be amx_bf16, "
              "avx512_bf16, avx512, avx2 or default (or unset), but got PYENGINE_CPU_ISA=" +
              wanted;
    return c;
  }
  // Never above what the CPU has: the higher builds would fault on it.
  c.isa = static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
  return c;
}

struct FamilyLevels {
  Family family;
  const char* name;
  bool has_avx512, has_avx2;  // every family has baseline code
  bool has_avx512_bf16 = false;
  bool has_amx_bf16 = false;
};

// The levels each family has code for: where its dispatch (PE_ISA_FUNCTION or an explicit
// isa_for() test) finds a build. One row per Family.
constexpr FamilyLevels kFamilies[] = {
    {Family::Gemm, "gemm", true, true},
    // no code below avx512_bf16: bfloat16 then runs through float32 (common/low_precision.h)
    {Family::GemmBf16, "gemm_bf16", false, false, true, true},
    {Family::Conv2d, "conv2d", true, true},
    {Family::Linear, "linear", true, true},
    {Family::MaxPool2d, "max_pool2d", true, true},
    {Family::Softmax, "softmax", true, true},
    {Family::CrossEntropy, "cross_entropy", true, true},
    {Family::Elementwise, "elementwise", true, true},
};

const FamilyLevels& levels_of(Family family) {
  for (const FamilyLevels& f : kFamilies)
    if (f.family == family) return f;
  TORCH_CHECK(false, "pyengine: CPU kernel family ", static_cast<int>(family),
              " is missing from cpu/isa.cpp's table");
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AmxBf16:
      return "amx_bf16";
    case Isa::Avx512Bf16:
      return "avx512_bf16";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "default";
  }
}

Isa isa() {
  static const Choice choice = choose();
  TORCH_CHECK(choice.error.empty(), choice.error);
  return choice.isa;
}

Isa isa_for(Family family) {
  const Isa level = isa();
  const FamilyLevels& f = levels_of(family);
  if (level == Isa::AmxBf16 && f.has_amx_bf16) return Isa::AmxBf16;
  if (level >= Isa::Avx512Bf16 && f.has_avx512_bf16) return Isa::Avx512Bf16;
  if (level >= Isa::Avx512 && f.has_avx512) return Isa::Avx512;
  if (level != Isa::Default && f.has_avx2) return Isa::Avx2;
  return Isa::Default;
}

std::map<std::string, std::string> kernel_isas() {
  std::map<std::string, std::string> out;
  for (const FamilyLevels& f : kFamilies) out[f.name] = isa_name(isa_for(f.family));
  return out;
}

}  // namespace cpu
}  // namespace pyengine
