// The machine's measured fp32 compute peak, for the benchmark suite's "% of peak" columns
// (benchmarks/peak.py compiles this on first use with torch.utils.cpp_extension.load and caches
// it; it is not part of pyengine's extension).
//
// cpu_fma_seconds(threads, iters): `threads` threads each run `iters` iterations of a loop that
// does nothing but independent fused multiply-adds on vector registers, in the widest ISA this CPU
// has (picked at run time: AVX-512, else AVX2+FMA, else plain SSE2 multiply and add). No loads or
// stores in the loop, enough independent chains to cover the FMA latency on every FMA port, so
// the rate is the cores' arithmetic peak at the clock they reach under that load.
//
// Built with PEAK_WITH_CUDA (and peak_cuda.cu), it also binds the GPU's FMA kernel.
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

// Each chain is a = a * b + c with b just below 1, so values settle near c / (1 - b): no overflow,
// no denormals, and nothing the compiler may fold (b and c come from run-time arguments).
constexpr int kChains512 = 16;  // 16 of the 32 zmm registers; 2 FMA ports x 4-cycle latency = 8
constexpr int kChains256 = 12;  // 12 of the 16 ymm registers (+ b and c); 2 ports x 5 cycles = 10
constexpr int kChainsSse = 12;

__attribute__((target("avx512f"))) float fma_avx512(int64_t iters, float b, float c) {
  const __m512 vb = _mm512_set1_ps(b), vc = _mm512_set1_ps(c);
  __m512 acc[kChains512];
  for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_set1_ps(float(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_fmadd_ps(acc[j], vb, vc);
  }
  __m512 sum = acc[0];
  for (int j = 1; j < kChains512; ++j) sum = _mm512_add_ps(sum, acc[j]);
  return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2,fma"))) float fma_avx2(int64_t iters, float b, float c) {
  const __m256 vb = _mm256_set1_ps(b), vc = _mm256_set1_ps(c);
  __m256 acc[kChains256];
  for (int j = 0; j < kChains256; ++j) acc[j] = _mm256_set1_ps(float(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < kChains256; ++j) acc[j] = _mm256_fmadd_ps(acc[j], vb, vc);
  }
  alignas(32) float lanes[8];
  __m256 sum = acc[0];
  for (int j = 1; j < kChains256; ++j) sum = _mm256_add_ps(sum, acc[j]);
  _mm256_store_ps(lanes, sum);
  float total = 0;
  for (float v : lanes) total += v;
  return total;
}

// No FMA instruction: a multiply and an add, still 2 FLOP per lane.
float fma_sse(int64_t iters, float b, float c) {
  const __m128 vb = _mm_set1_ps(b), vc = _mm_set1_ps(c);
  __m128 acc[kChainsSse];
  for (int j = 0; j < kChainsSse; ++j) acc[j] = _mm_set1_ps(float(j));
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < kChainsSse; ++j) acc[j] = _mm_add_ps(_mm_mul_ps(acc[j], vb), vc);
  }
  alignas(16) float lanes[4];
  __m128 sum = acc[0];
  for (int j = 1; j < kChainsSse; ++j) sum = _mm_add_ps(sum, acc[j]);
  _mm_store_ps(lanes, sum);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

struct Isa {
  std::string name;
  int64_t flops_per_iter;  // chains x lanes x 2
  float (*loop)(int64_t, float, float);
};

const Isa& isa() {
  static const Isa picked = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa{"avx512", kChains512 * 16 * 2, fma_avx512};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Isa{"avx2+fma", kChains256 * 8 * 2, fma_avx2};
    return Isa{"sse2 (mul+add)", kChainsSse * 4 * 2, fma_sse};
  }();
  return picked;
}

// Wall seconds for `threads` threads to run `iters` iterations each. The clock starts once every
// thread is up and waiting, so thread creation is not counted.
double cpu_fma_seconds(int threads, int64_t iters) {
  if (threads < 1) threads = 1;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<float> sink(threads);
  auto work = [&](int t) {  // threads 1..threads-1; the calling thread is thread 0
    ready.fetch_add(1);
    while (!go.load(std::memory_order_acquire)) {
    }
    sink[t] = isa().loop(iters, 0.999999f, 1e-7f * float(t + 1));
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  while (ready.load() < threads - 1) {
  }
  const auto start = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  sink[0] = isa().loop(iters, 0.999999f, 1e-7f);
  for (auto& th : pool) th.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = 0;  // the results are used, so the loops are not dead code
  for (float v : sink) keep = keep + v;
  return seconds;
}

}  // namespace

#ifdef PEAK_WITH_CUDA
// peak_cuda.cu
double gpu_fma_ms(int device, int64_t iters, int64_t* flops);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return isa().name; }, "the ISA the FMA loop runs in");
  m.def("cpu_flops_per_iter", [] { return isa().flops_per_iter; }, "FLOP per thread-iteration");
  m.def("cpu_fma_seconds", &cpu_fma_seconds, pybind11::arg("threads"), pybind11::arg("iters"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
#ifdef PEAK_WITH_CUDA
  m.def(
      "gpu_fma",
      [](int device, int64_t iters) {
        // Plain C++ values: the GIL is released here (call_guard), and pybind11 converts the
        // result after taking it back. A py::tuple built here crashed (PyFloat_FromDouble
        // without the GIL) on the first GPU run.
        int64_t flops = 0;
        const double ms = gpu_fma_ms(device, iters, &flops);
        return std::pair<double, int64_t>(ms, flops);
      },
      pybind11::arg("device"), pybind11::arg("iters"),
      pybind11::call_guard<pybind11::gil_scoped_release>(),
      "(milliseconds, FLOP) of one launch of the FMA kernel filling the device");
#endif
}
