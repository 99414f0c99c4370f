// The GPU's measured fp32 compute peak (bound by peak.cpp, built with PEAK_WITH_CUDA; see
// benchmarks/peak.py). A register-only loop of independent fmaf chains per thread, on enough
// blocks to fill every SM several times over: no memory traffic inside the loop, so the rate is
// the SMs' FMA throughput at the clock they hold under this load.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

constexpr int kChains = 8;     // independent FMA chains per thread (with 8+ warps per scheduler
                               // hiding the ~4-cycle latency, 8 chains keep every lane busy)
constexpr int kThreads = 256;  // threads per block
constexpr int kWaves = 16;     // blocks per SM per launch (several resident at once, many waves)

__global__ void fma_kernel(float* out, int64_t iters, float b, float c) {
  float acc[kChains];
#pragma unroll
  for (int j = 0; j < kChains; ++j) acc[j] = float(threadIdx.x + j);
  // Unrolled so the loop's counter and branch (which share the FMAs' issue slots) cost ~2%.
#pragma unroll 16
  for (int64_t i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kChains; ++j) acc[j] = fmaf(acc[j], b, c);
  }
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kChains; ++j) sum += acc[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;  // used, so the loop is not dead code
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("peak_cuda: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

// Milliseconds of one launch (after a warm-up launch), timed with CUDA events on a stream of its
// own; *flops receives the launch's FLOP count.
double gpu_fma_ms(int device, int64_t iters, int64_t* flops) {
  check(cudaSetDevice(device), "cudaSetDevice");
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  const int blocks = sms * kWaves;
  float* out = nullptr;
  check(cudaMalloc(&out, sizeof(float) * blocks * kThreads), "cudaMalloc");
  cudaStream_t stream;
  cudaEvent_t begin, end;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  check(cudaEventCreate(&begin), "cudaEventCreate");
  check(cudaEventCreate(&end), "cudaEventCreate");
  fma_kernel<<<blocks, kThreads, 0, stream>>>(out, iters, 0.999999f, 1e-7f);  // warm-up
  check(cudaGetLastError(), "launch");
  check(cudaEventRecord(begin, stream), "cudaEventRecord");
  fma_kernel<<<blocks, kThreads, 0, stream>>>(out, iters, 0.999999f, 1e-7f);
  check(cudaGetLastError(), "launch");
  check(cudaEventRecord(end, stream), "cudaEventRecord");
  check(cudaEventSynchronize(end), "cudaEventSynchronize");
  float ms = 0.f;
  check(cudaEventElapsedTime(&ms, begin, end), "cudaEventElapsedTime");
  cudaEventDestroy(begin);
  cudaEventDestroy(end);
  cudaStreamDestroy(stream);
  cudaFree(out);
  *flops = int64_t(blocks) * kThreads * iters * kChains * 2;
  return ms;
}
