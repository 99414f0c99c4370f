// The CUDA emulator's own tests: small kernels in CUDA syntax (this file goes through rewrite.py
// like csrc/cuda/*.cu) showing that the emulator catches what it claims to catch, plus a few
// csrc/cuda launchers run end to end. tests/test_cuda_emu.py builds it with
// -fsanitize=address,undefined, links the csrc/cuda objects and runs one case per process:
//   selftest <case>     prints "PASS <case>" and exits 0, or prints FAIL lines and exits 1
//   selftest bench      launch throughput (not part of the tests: timing)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/device.cuh"
#include "cuda/launchers.h"

using pyengine::cuda::block_sum;
using pyengine::cuda::kThreads;
using pyengine::cuda::warp_sum;

namespace {

int failures = 0;
#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);         \
      std::printf(__VA_ARGS__);                                           \
      std::printf("\n");                                                  \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

struct Schedule {
  pe_emu::Order order;
  uint64_t seed;
  const char* name;
};
const Schedule kSchedules[] = {{pe_emu::Order::InOrder, 0, "in-order"},
                               {pe_emu::Order::Reversed, 0, "reversed"},
                               {pe_emu::Order::Shuffled, 1, "shuffled(1)"},
                               {pe_emu::Order::Shuffled, 2, "shuffled(2)"},
                               {pe_emu::Order::Shuffled, 3, "shuffled(3)"},
                               {pe_emu::Order::Shuffled, 4, "shuffled(4)"}};

// Deterministic pseudo-random doubles in [-1, 1) (no <random>: the same values everywhere).
std::vector<double> random_values(size_t n, uint64_t seed) {
  std::vector<double> v(n);
  for (auto& x : v) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<double>(seed >> 11) / 4503599627370496.0 - 1.0;
  }
  return v;
}

// ---- (a) a block tree sum with and without its barrier ------------------------------------------

__global__ void tree_sum_kernel(const float* x, float* out, bool with_barrier) {
  __shared__ float s[256];
  s[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  for (int k = 128; k > 0; k >>= 1) {
    if (static_cast<int>(threadIdx.x) < k) s[threadIdx.x] += s[threadIdx.x + k];
    if (with_barrier) __syncthreads();
  }
  if (threadIdx.x == 0) *out = s[0];
}

int case_missing_barrier() {
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[i] = static_cast<float>(random_values(256, 7)[i]);
  std::vector<float> tree(x);  // the kernel's tree, on the host
  for (int k = 128; k > 0; k >>= 1)
    for (int i = 0; i < k; ++i) tree[i] += tree[i + k];
  std::map<uint32_t, std::string> racy;
  for (const Schedule& sc : kSchedules) {
    pe_emu::set_schedule(sc.order, sc.seed);
    float with = 0, without = 0;
    tree_sum_kernel<<<1, 256>>>(x.data(), &with, true);
    tree_sum_kernel<<<1, 256>>>(x.data(), &without, false);
    CHECK(cudaGetLastError() == cudaSuccess, "%s", pe_emu::last_error_message().c_str());
    CHECK(std::memcmp(&with, &tree[0], sizeof with) == 0, "%s: with the barrier %.9g != %.9g",
          sc.name, with, tree[0]);
    uint32_t bits;
    std::memcpy(&bits, &without, sizeof bits);
    racy[bits] = sc.name;
    std::printf("%-12s with barrier %.9g, without %.9g\n", sc.name, with, without);
  }
  CHECK(racy.size() >= 2, "the missing barrier gave one result under every schedule");
  return 0;
}

// ---- (b) an out-of-range __shared__ read: ASan (via a pointer), UBSan (indexing the array) ----

__global__ void shared_overrun_kernel(float* out) {
  __shared__ float s[32];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  const float* p = s;
  out[threadIdx.x] = p[threadIdx.x + 1];  // lane 31 reads s[32]
}

__global__ void shared_overrun_indexed_kernel(float* out) {
  __shared__ float s[32];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1];  // lane 31 reads s[32]
}

int case_shared_overrun() {
  float out[32];
  shared_overrun_kernel<<<1, 32>>>(out);
  std::printf("no ASan report: is this an -fsanitize=address build?\n");
  return 1;
}

int case_shared_overrun_indexed() {
  float out[32];
  shared_overrun_indexed_kernel<<<1, 32>>>(out);
  std::printf("no UBSan report: is this an -fsanitize=undefined build?\n");
  return 1;
}

// ---- (c) a lane that skips a shuffle ------------------------------------------------------------

// The skipper exits (0), calls another shuffle (1) or waits at a barrier (2).
__global__ void skipped_shuffle_kernel(float* out, int skipper, int elsewhere) {
  float v = static_cast<float>(threadIdx.x);
  if (static_cast<int>(threadIdx.x) != skipper) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else if (elsewhere == 1) {
    v = __shfl_down_sync(0xffffffffu, v, 1);
  } else if (elsewhere == 2) {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

int case_shuffle_deadlock() {
  std::vector<float> out(64, -1.0f);
  skipped_shuffle_kernel<<<1, 64>>>(out.data(), 37, 0);
  cudaError_t e = cudaGetLastError();
  const std::string msg = pe_emu::last_error_message();
  std::printf("%s\n", msg.c_str());
  CHECK(e == cudaErrorLaunchFailure, "got %s", cudaGetErrorName(e));
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure, "the error is not sticky");
  for (const char* part : {"deadlock", "skipped_shuffle_kernel", "block (0, 0, 0)", "warp 1",
                           "lanes 0-4, 6-31 wait at __shfl_xor_sync(mask=0xffffffff)",
                           "lane 5 exited"})
    CHECK(contains(msg, part), "message lacks '%s'", part);
  pe_emu::reset_device();
  skipped_shuffle_kernel<<<1, 32>>>(out.data(), 5, 1);
  e = cudaGetLastError();
  const std::string msg2 = pe_emu::last_error_message();
  std::printf("%s\n", msg2.c_str());
  CHECK(e == cudaErrorLaunchFailure, "got %s", cudaGetErrorName(e));
  CHECK(contains(msg2, "lane 5 waits at __shfl_down_sync(mask=0xffffffff)") &&
            contains(msg2, "lanes 0-4, 6-31 wait at __shfl_xor_sync(mask=0xffffffff)"),
        "message: %s",
        msg2.c_str());
  pe_emu::reset_device();
  skipped_shuffle_kernel<<<1, 32>>>(out.data(), 31, 2);
  e = cudaGetLastError();
  const std::string msg3 = pe_emu::last_error_message();
  CHECK(e == cudaErrorLaunchFailure, "got %s", cudaGetErrorName(e));
  CHECK(contains(msg3, "lanes 0-30 wait at __shfl_xor_sync(mask=0xffffffff); lane 31 waits at "
                       "__syncthreads (tests/cuda_emu/selftest.cpp:"),
        "message: %s", msg3.c_str());
  pe_emu::reset_device();
  CHECK(cudaGetLastError() == cudaSuccess, "reset_device left an error");
  return 0;
}

// ---- (d) a failed device assert -----------------------------------------------------------------

__global__ void checked_kernel(const float* x, int* ran, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  ran[i] = 1;
  if (i < n) PE_DEVICE_CHECK(x[i] >= 0.0f, "x[%lld] = %g is negative\n", (long long)i, x[i]);
}

int case_device_assert() {
  pe_emu::set_schedule(pe_emu::Order::InOrder);
  std::vector<float> x(128, 1.0f);
  x[3] = -2.0f;
  std::vector<int> ran(128, 0);
  checked_kernel<<<4, 32>>>(x.data(), ran.data(), 128);
  cudaError_t e = cudaGetLastError();
  std::printf("%s\n", pe_emu::last_error_message().c_str());
  CHECK(e == cudaErrorAssert, "got %s", cudaGetErrorName(e));
  CHECK(std::string(cudaGetErrorString(e)) == "device-side assert triggered", "%s",
        cudaGetErrorString(e));
  CHECK(contains(pe_emu::last_error_message(), "x[i] >= 0.0f"), "message lacks the condition");
  int count = 0;
  for (int r : ran) count += r;
  CHECK(count == 4, "threads 0-3 of block 0 ran, then the grid stopped; %d ran", count);
  // Sticky: later launches fail without running.
  std::vector<float> good(128, 1.0f);
  std::fill(ran.begin(), ran.end(), 0);
  checked_kernel<<<4, 32>>>(good.data(), ran.data(), 128);
  CHECK(cudaGetLastError() == cudaErrorAssert, "a later launch does not see the sticky error");
  CHECK(cudaPeekAtLastError() == cudaErrorAssert, "peek");
  CHECK(std::count(ran.begin(), ran.end(), 1) == 0, "a launch ran after the assert");
  pe_emu::reset_device();
  checked_kernel<<<4, 32>>>(good.data(), ran.data(), 128);
  CHECK(cudaGetLastError() == cudaSuccess, "after reset_device: %s",
        pe_emu::last_error_message().c_str());
  CHECK(std::count(ran.begin(), ran.end(), 1) == 128, "after reset_device not every thread ran");
  return 0;
}

// ---- (e) launch configurations the driver refuses -----------------------------------------------

__global__ void mark_kernel(int* ran) { ran[0] = 1; }

__global__ void big_shared_kernel(int* ran) {
  __shared__ double big[4096];  // 32 KiB, plus the launch's dynamic bytes
  big[threadIdx.x] = 0;
  ran[0] = 1;
}

int case_bad_config() {
  struct Bad {
    dim3 grid, block;
    size_t shared;
    const char* what;
  };
  const Bad bad[] = {{dim3(1), dim3(1025), 0, "1025 threads in x"},
                     {dim3(1), dim3(0), 0, "a zero block"},
                     {dim3(0), dim3(32), 0, "a zero grid"},
                     {dim3(1), dim3(1, 1, 65), 0, "z = 65"},
                     {dim3(1), dim3(33, 32), 0, "1056 threads"},
                     {dim3(1, 65536), dim3(32), 0, "grid y = 65536"},
                     {dim3(0x80000000u), dim3(32), 0, "grid x = 2^31"},
                     {dim3(1), dim3(32), 48 * 1024 + 1, "48 KiB + 1 of dynamic shared memory"}};
  int ran = 0;
  const int64_t launches = pe_emu::stats().launches;
  for (const Bad& b : bad) {
    mark_kernel<<<b.grid, b.block, b.shared>>>(&ran);
    const cudaError_t e = cudaGetLastError();
    CHECK(e == cudaErrorInvalidConfiguration, "%s: got %s", b.what, cudaGetErrorName(e));
    CHECK(cudaGetLastError() == cudaSuccess, "%s: the error is sticky", b.what);
    CHECK(ran == 0, "%s: the kernel ran", b.what);
  }
  std::printf("%s\n", pe_emu::last_error_message().c_str());
  CHECK(pe_emu::stats().launches == launches, "refused launches were counted as run");
  // Static shared memory above the limit with the dynamic bytes: refused when reached.
  big_shared_kernel<<<1, 32, 20 * 1024>>>(&ran);
  const cudaError_t e = cudaGetLastError();
  std::printf("%s\n", pe_emu::last_error_message().c_str());
  CHECK(e == cudaErrorInvalidConfiguration, "static + dynamic > 48 KiB: got %s",
        cudaGetErrorName(e));
  CHECK(ran == 0, "the kernel ran past its shared declaration");
  ran = 0;
  big_shared_kernel<<<1, 32, 16 * 1024>>>(&ran);  // 48 KiB exactly
  CHECK(cudaGetLastError() == cudaSuccess && ran == 1, "48 KiB in all is allowed");
  return 0;
}

// ---- (f) divergent __syncthreads ----------------------------------------------------------------

__global__ void exit_before_barrier_kernel(float* out) {
  if (threadIdx.x >= 128) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void two_barriers_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

int case_divergent_barrier() {
  std::vector<float> out(256, 0.0f);
  exit_before_barrier_kernel<<<1, 256>>>(out.data());
  cudaError_t e = cudaGetLastError();
  std::string msg = pe_emu::last_error_message();
  std::printf("%s\n", msg.c_str());
  CHECK(e == cudaErrorLaunchFailure, "got %s", cudaGetErrorName(e));
  CHECK(contains(msg, "divergent __syncthreads") && contains(msg, "threads 0-127 wait at") &&
            contains(msg, "threads 128-255 exited"),
        "message: %s", msg.c_str());
  pe_emu::reset_device();
  two_barriers_kernel<<<1, 256>>>(out.data());
  e = cudaGetLastError();
  msg = pe_emu::last_error_message();
  std::printf("%s\n", msg.c_str());
  CHECK(e == cudaErrorLaunchFailure, "got %s", cudaGetErrorName(e));
  CHECK(contains(msg, "divergent __syncthreads") && contains(msg, "threads 0-63") &&
            contains(msg, "threads 64-255"),
        "message: %s", msg.c_str());
  pe_emu::reset_device();
  return 0;
}

// ---- (g) device.cuh's warp_sum and block_sum are exact under every order ------------------------

__global__ void reductions_kernel(const double* x, double* warp_out, double* block_out) {
  __shared__ double scratch[kThreads];
  const double v = x[blockIdx.x * kThreads + threadIdx.x];
  warp_out[blockIdx.x * kThreads + threadIdx.x] = warp_sum(v);
  const double total = block_sum(v, scratch);
  if (threadIdx.x == 0) block_out[blockIdx.x] = total;
}

int case_reductions() {
  const int blocks = 3;
  const std::vector<double> x = random_values(blocks * kThreads, 11);
  // The host's replay of the same butterfly and tree.
  std::vector<double> warp_ref(x.size()), block_ref(blocks);
  for (size_t w = 0; w < x.size(); w += 32) {
    std::vector<double> v(x.begin() + w, x.begin() + w + 32);
    for (int o = 16; o > 0; o >>= 1) {
      std::vector<double> next(32);
      for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ o];
      v = next;
    }
    for (int l = 0; l < 32; ++l) warp_ref[w + l] = v[l];
  }
  for (int b = 0; b < blocks; ++b) {
    std::vector<double> s(x.begin() + b * kThreads, x.begin() + (b + 1) * kThreads);
    for (int k = kThreads / 2; k > 0; k >>= 1)
      for (int i = 0; i < k; ++i) s[i] += s[i + k];
    block_ref[b] = s[0];
  }
  for (const Schedule& sc : kSchedules) {
    pe_emu::set_schedule(sc.order, sc.seed);
    std::vector<double> warp_out(x.size(), 0), block_out(blocks, 0);
    reductions_kernel<<<blocks, kThreads>>>(x.data(), warp_out.data(), block_out.data());
    CHECK(cudaGetLastError() == cudaSuccess, "%s: %s", sc.name,
          pe_emu::last_error_message().c_str());
    CHECK(std::memcmp(warp_out.data(), warp_ref.data(), x.size() * sizeof(double)) == 0,
          "%s: warp_sum differs", sc.name);
    CHECK(std::memcmp(block_out.data(), block_ref.data(), blocks * sizeof(double)) == 0,
          "%s: block_sum differs", sc.name);
  }
  return 0;
}

// ---- Warp intrinsics: CUDA's semantics on known patterns ----------------------------------------

__global__ void intrinsics_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 10;
  o[0] = __shfl_up_sync(0xffffffffu, lane, 1);
  o[1] = __shfl_down_sync(0xffffffffu, lane, 4, 16);
  o[2] = __shfl_xor_sync(0xffffffffu, lane, 1);
  o[3] = __shfl_sync(0xffffffffu, lane, 3, 8);
  o[4] = __shfl_sync(0xffffffffu, lane, 35);
  o[5] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[6] = __any_sync(0xffffffffu, lane == 7);
  o[7] = __all_sync(0xffffffffu, lane < 31);
  o[8] = -1;
  o[9] = -1;
  if (lane < 16) {  // a partial mask: lanes 0-15 only; lane 20 is outside it
    o[8] = __shfl_sync(0x0000ffffu, lane + 100, 20);
    __syncwarp(0x0000ffffu);
    o[9] = __all_sync(0x0000ffffu, 1);
  }
}

// Lanes are linear ids (x + y * bx + z * bx * by) modulo 32, warps 32 consecutive linear ids.
__global__ void warp_of_2d_block_kernel(int* out) {
  const int linear = static_cast<int>(threadIdx.x + threadIdx.y * blockDim.x +
                                      threadIdx.z * blockDim.x * blockDim.y);
  out[linear] = __shfl_sync(0xffffffffu, linear, 0);
}

__global__ void bad_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1, 0);  // lanes 16-31 are not in the mask
}

__global__ void bad_width_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1, 12);
}

int case_warp_intrinsics() {
  std::vector<int> out(64 * 10);
  intrinsics_kernel<<<1, 64>>>(out.data());
  CHECK(cudaGetLastError() == cudaSuccess, "%s", pe_emu::last_error_message().c_str());
  unsigned every_third = 0;
  for (int l = 0; l < 32; l += 3) every_third |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int l = t % 32;
    const int* o = &out[t * 10];
    CHECK(o[0] == (l == 0 ? 0 : l - 1), "shfl_up lane %d: %d", l, o[0]);
    CHECK(o[1] == ((l % 16) >= 12 ? l : l + 4), "shfl_down width 16 lane %d: %d", l, o[1]);
    CHECK(o[2] == (l ^ 1), "shfl_xor lane %d: %d", l, o[2]);
    CHECK(o[3] == (l & ~7) + 3, "shfl width 8 lane %d: %d", l, o[3]);
    CHECK(o[4] == 3, "shfl src 35 lane %d: %d", l, o[4]);
    CHECK(static_cast<unsigned>(o[5]) == every_third, "ballot lane %d: %x", l, o[5]);
    CHECK(o[6] == 1 && o[7] == 0, "any/all lane %d: %d %d", l, o[6], o[7]);
    CHECK(o[8] == (l < 16 ? l + 100 : -1), "shfl from outside the mask lane %d: %d", l, o[8]);
    CHECK(o[9] == (l < 16 ? 1 : -1), "partial all lane %d: %d", l, o[9]);
  }
  warp_of_2d_block_kernel<<<1, dim3(8, 4, 2)>>>(out.data());
  CHECK(cudaGetLastError() == cudaSuccess, "%s", pe_emu::last_error_message().c_str());
  for (int i = 0; i < 64; ++i) CHECK(out[i] == i / 32 * 32, "2-D block, thread %d: %d", i, out[i]);
  bad_mask_kernel<<<1, 32>>>(out.data());
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure, "a lane outside its mask was accepted");
  CHECK(contains(pe_emu::last_error_message(), "does not include the calling lane"), "%s",
        pe_emu::last_error_message().c_str());
  pe_emu::reset_device();
  bad_width_kernel<<<1, 32>>>(out.data());
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure, "width 12 was accepted");
  CHECK(contains(pe_emu::last_error_message(), "width 12"), "%s",
        pe_emu::last_error_message().c_str());
  pe_emu::reset_device();
  return 0;
}

// ---- Shared memory: per block, poisoned, one allocation per site; dynamic shared memory ---------

__global__ void shared_kernel(float* first_read, int* same) {
  __shared__ float a[64];
  __shared__ float b[64];
  extern __shared__ int dyn[];
  if (threadIdx.x == 0) {
    first_read[blockIdx.x] = a[5];  // poison: never written in this block
    same[blockIdx.x] = (static_cast<void*>(a) != static_cast<void*>(b)) ? 1 : 0;
    dyn[0] = -2;
  }
  __syncthreads();
  a[threadIdx.x] = static_cast<float>(blockIdx.x);
  if (threadIdx.x == 1 && dyn[0] != -2) same[blockIdx.x] = 0;  // threads share the allocation
  if (threadIdx.x == 2 && dyn[1] != -1) same[blockIdx.x] = 0;  // dynamic memory is poisoned too
}

int case_shared_memory() {
  pe_emu::reset_stats();
  std::vector<float> first(3);
  std::vector<int> same(3, 0);
  shared_kernel<<<3, 64, 2 * sizeof(int)>>>(first.data(), same.data());
  CHECK(cudaGetLastError() == cudaSuccess, "%s", pe_emu::last_error_message().c_str());
  for (int b = 0; b < 3; ++b) {
    CHECK(first[b] != first[b], "block %d read %g from fresh shared memory, not NaN poison", b,
          first[b]);
    CHECK(same[b] == 1, "block %d: sites or threads share wrongly", b);
  }
  const pe_emu::Stats st = pe_emu::stats();
  CHECK(st.launches == 1 && st.blocks == 3 && st.threads == 192, "stats %lld %lld %lld",
        (long long)st.launches, (long long)st.blocks, (long long)st.threads);
  CHECK(st.shared_bytes_peak == 2 * 64 * 4 + 8, "shared peak %lld",
        (long long)st.shared_bytes_peak);
  return 0;
}

// ---- Caps ---------------------------------------------------------------------------------------

inline int64_t kTestBlocks = ::pe_emu::register_cap(&kTestBlocks, "kTestBlocks", int64_t(1) << 16);
inline int kTestInt = ::pe_emu::register_cap(&kTestInt, "kTestInt", 7);

int case_caps() {
  CHECK(kTestBlocks == 65536 && kTestInt == 7, "defaults");
  pe_emu::set_cap("kTestBlocks", 4);
  pe_emu::set_cap("kTestInt", -3);
  CHECK(kTestBlocks == 4 && kTestInt == -3, "set_cap did not reach the variables");
  CHECK(pe_emu::caps().at("kTestBlocks") == 4, "caps()");
  bool threw = false;
  try {
    pe_emu::set_cap("kNoSuchCap", 1);
  } catch (const std::invalid_argument& e) {
    threw = contains(e.what(), "kNoSuchCap") && contains(e.what(), "kTestBlocks") &&
            contains(e.what(), "kTestInt");
    std::printf("%s\n", e.what());
  }
  CHECK(threw, "an unknown cap did not throw invalid_argument naming it and the known ones");
  threw = false;
  try {
    pe_emu::set_cap("kTestInt", int64_t(1) << 40);
  } catch (const std::out_of_range&) {
    threw = true;
  }
  CHECK(threw, "an int cap took a value beyond int");
  pe_emu::reset_caps();
  CHECK(kTestBlocks == 65536 && kTestInt == 7, "reset_caps");
  return 0;
}

// ---- csrc/cuda launchers, end to end ------------------------------------------------------------

int case_launchers() {
  namespace pc = pyengine::cuda;
  // softmax along rows: warp shuffles
  const int64_t rows = 5, cols = 77;
  std::vector<double> x = random_values(rows * cols, 3), y(x.size());
  for (const Schedule& sc : kSchedules) {
    pe_emu::set_schedule(sc.order, sc.seed);
    CHECK(pc::softmax_forward<double>(x.data(), y.data(), rows, cols, 1, false, nullptr) ==
              cudaSuccess,
          "softmax: %s", pe_emu::last_error_message().c_str());
    for (int64_t r = 0; r < rows; ++r) {
      double m = -1e300, s = 0;
      for (int64_t j = 0; j < cols; ++j) m = std::max(m, x[r * cols + j]);
      for (int64_t j = 0; j < cols; ++j) s += std::exp(x[r * cols + j] - m);
      for (int64_t j = 0; j < cols; ++j) {
        const double want = std::exp(x[r * cols + j] - m) / s;
        CHECK(std::fabs(y[r * cols + j] - want) < 1e-12, "%s softmax[%lld, %lld] = %g, want %g",
              sc.name, (long long)r, (long long)j, y[r * cols + j], want);
      }
    }
  }
  // linear: the tiled GEMM (shared tiles, barriers), with a bias
  const int64_t n = 37, in = 45, out = 19;
  const std::vector<float> xs = [&] {
    std::vector<float> v(n * in);
    auto r = random_values(v.size(), 5);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(r[i]);
    return v;
  }();
  std::vector<float> w(out * in), b(out), ys(n * out);
  auto rw = random_values(w.size() + b.size(), 9);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(rw[i]);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(rw[w.size() + i]);
  pe_emu::set_schedule(pe_emu::Order::Shuffled, 5);
  CHECK(pc::linear_forward<float>(xs.data(), w.data(), b.data(), ys.data(), n, in, out,
                                  nullptr) == cudaSuccess,
        "linear: %s", pe_emu::last_error_message().c_str());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < out; ++j) {
      double want = b[j];
      for (int64_t k = 0; k < in; ++k) want += double(xs[i * in + k]) * w[j * in + k];
      CHECK(std::fabs(ys[i * out + j] - want) < 1e-4, "linear[%lld, %lld] = %g, want %g",
            (long long)i, (long long)j, ys[i * out + j], want);
    }
  // cross_entropy with a target out of range: the device assert reaches the host
  std::vector<int64_t> target = {0, 3, 99, 1, 2};
  std::vector<double> loss(rows);
  const cudaError_t e = pc::cross_entropy_forward<double>(x.data(), target.data(), nullptr,
                                                          nullptr, rows, cols, 0, -100, 0.0,
                                                          false, loss.data(), nullptr, nullptr,
                                                          nullptr);
  CHECK(e == cudaErrorAssert, "cross_entropy with target 99: got %s", cudaGetErrorName(e));
  CHECK(contains(pe_emu::last_error_message(), "loss.cu"), "%s",
        pe_emu::last_error_message().c_str());
  pe_emu::reset_device();
  std::printf("stack: %lld of %lld bytes used at most\n", (long long)pe_emu::stack_bytes_peak(),
              (long long)pe_emu::stack_bytes());
  return 0;
}

// ---- 16-bit conversions (include/cuda_fp16.h, include/cuda_bf16.h) ----------------------------
// Against a reference written from the formats' definitions: a pattern's value by ldexp (a NaN:
// float16's becomes CUDA's canonical 0x7fffffff, bfloat16's keeps its bits), and
// float -> 16-bit as the representable value nearest in exact (double) arithmetic, ties to the
// even pattern, found by binary search over the ordered patterns; past the largest finite value
// by half an ulp or more, inf. Every 16-bit pattern to float and back; floats at, between and
// next to every pair of neighbouring 16-bit values, a million pseudo-random float patterns, and
// the special values.

struct Format16 {
  const char* name;
  int mant_bits;       // 10 (float16), 7 (bfloat16)
  int bias;            // 15, 127
  uint16_t max_finite;  // 0x7bff, 0x7f7f (the next pattern is inf)
};
constexpr Format16 kHalf{"float16", 10, 15, 0x7bff};
constexpr Format16 kBf16{"bfloat16", 7, 127, 0x7f7f};

double value16(uint16_t bits, const Format16& f) {
  const int emax = (1 << (15 - f.mant_bits)) - 1;
  const int e = (bits >> f.mant_bits) & emax;
  const int m = bits & ((1 << f.mant_bits) - 1);
  double v;
  if (e == emax) {
    v = m != 0 ? std::nan("") : HUGE_VAL;
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m), 1 - f.bias - f.mant_bits);
  } else {
    v = std::ldexp(static_cast<double>(m + (1 << f.mant_bits)), e - f.bias - f.mant_bits);
  }
  return (bits & 0x8000u) ? -v : v;
}

uint16_t nearest16(float x, const Format16& f) {
  if (std::isnan(x)) return 0x7fffu;  // CUDA's canonical NaN
  const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const double a = std::fabs(static_cast<double>(x));
  const double top = value16(f.max_finite, f);
  const double next = top + (top - value16(f.max_finite - 1, f));  // where inf would be
  if (a >= (top + next) / 2) return sign | (f.max_finite + 1);    // ties go to even: inf
  uint16_t lo = 0, hi = f.max_finite;  // the largest pattern whose value is <= a
  while (lo < hi) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi + 1) / 2);
    if (value16(mid, f) <= a) lo = mid; else hi = static_cast<uint16_t>(mid - 1);
  }
  const double vlo = value16(lo, f);
  if (vlo == a || lo == f.max_finite) return sign | lo;
  const double dlo = a - vlo, dhi = value16(lo + 1, f) - a;
  const uint16_t pick = dlo < dhi ? lo : dhi < dlo ? lo + 1 : ((lo & 1u) ? lo + 1 : lo);
  return static_cast<uint16_t>(sign | pick);
}

uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

template <class To16, class From16>
int check_conversions(const Format16& f, To16 to16, From16 from16) {
  const int before = failures;
  // Every pattern to float (exact; NaN the canonical 0x7fffffff) and back (the same pattern).
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float x = from16(bits);
    const double want = value16(bits, f);
    if (std::isnan(want)) {
      // float16: CUDA's canonical NaN; bfloat16: the bits shifted (payload and sign kept).
      const uint32_t nan_bits = f.mant_bits == 10 ? 0x7fffffffu : b << 16;
      CHECK(float_bits(x) == nan_bits, "%s 0x%04x -> float 0x%08x, want 0x%08x", f.name, b,
            float_bits(x), nan_bits);
      CHECK(to16(x) == 0x7fffu, "%s NaN 0x%04x back: 0x%04x", f.name, b, to16(x));
      continue;
    }
    CHECK(static_cast<double>(x) == want && std::signbit(x) == std::signbit(want),
          "%s 0x%04x -> %.9g, want %.9g", f.name, b, static_cast<double>(x), want);
    CHECK(to16(x) == bits, "%s 0x%04x -> %.9g -> 0x%04x", f.name, b, static_cast<double>(x),
          to16(x));
    if (failures - before > 20) return 1;
  }
  // Floats at, between and next to each pair of neighbouring finite values, both signs.
  auto expect = [&](float x) {
    const uint16_t want = nearest16(x, f), got = to16(x);
    CHECK(got == want, "%s(%.9g = 0x%08x) = 0x%04x, want 0x%04x", f.name,
          static_cast<double>(x), float_bits(x), got, want);
  };
  for (uint32_t p = 0; p <= f.max_finite; ++p) {
    const double v = value16(static_cast<uint16_t>(p), f);
    const double up = p < f.max_finite ? value16(static_cast<uint16_t>(p + 1), f)
                                       : 2 * v - value16(static_cast<uint16_t>(p - 1), f);
    const float mid = static_cast<float>((v + up) / 2);  // exact: 16-bit midpoints fit a float
    CHECK(static_cast<double>(mid) == (v + up) / 2, "%s midpoint above 0x%04x", f.name, p);
    for (const float x : {static_cast<float>(v), mid, std::nextafter(mid, 0.0f),
                          std::nextafter(mid, HUGE_VALF), std::nextafter(static_cast<float>(v),
                                                                         HUGE_VALF)}) {
      expect(x);
      expect(-x);
    }
    if (failures - before > 20) return 1;
  }
  // Pseudo-random float patterns (every exponent, NaNs included).
  uint64_t seed = 12345;
  for (int i = 0; i < (1 << 20); ++i) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    expect(bits_float(static_cast<uint32_t>(seed >> 32)));
    if (failures - before > 20) return 1;
  }
  // Specials: zeros, infinities, NaNs (quiet, signalling, negative), the float extremes.
  for (const uint32_t u : {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                           0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f7fffffu,
                           0xff7fffffu, 0x00000001u, 0x80000001u, 0x00800000u, 0x007fffffu})
    expect(bits_float(u));
  return failures == before ? 0 : 1;
}

int case_half_conversions() {
  const __half_raw zero{0};
  CHECK(__half2float(__half(zero)) == 0.0f, "__half from __half_raw");
  // Known values: the largest finite, overflow, the smallest subnormal and underflow.
  auto to16 = [](float x) { return static_cast<__half_raw>(__float2half_rn(x)).x; };
  auto from16 = [](uint16_t b) { return __half2float(__half(__half_raw{b})); };
  CHECK(to16(65504.0f) == 0x7bffu && to16(65519.0f) == 0x7bffu && to16(65520.0f) == 0x7c00u,
        "float16 overflow");
  CHECK(to16(-1e6f) == 0xfc00u && to16(std::ldexp(1.0f, -24)) == 0x0001u &&
            to16(std::ldexp(1.0f, -25)) == 0x0000u && to16(std::ldexp(1.5f, -25)) == 0x0001u,
        "float16 inf, subnormals");
  CHECK(from16(0x3c00u) == 1.0f && from16(0x0001u) == std::ldexp(1.0f, -24), "float16 values");
  return check_conversions(kHalf, to16, from16);
}

int case_bf16_conversions() {
  auto to16 = [](float x) { return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x)).x; };
  auto from16 = [](uint16_t b) { return __bfloat162float(__nv_bfloat16(__nv_bfloat16_raw{b})); };
  CHECK(to16(1.0f) == 0x3f80u && to16(bits_float(0x3f808000u)) == 0x3f80u &&
            to16(bits_float(0x3f818000u)) == 0x3f82u && to16(bits_float(0x7f7fffffu)) == 0x7f80u,
        "bfloat16 ties to even, overflow");
  return check_conversions(kBf16, to16, from16);
}

// ---- Throughput (not a test) --------------------------------------------------------------------

__global__ void write_kernel(float* out) {
  out[static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x] = 1.0f;
}

int case_bench() {
  std::vector<float> out(1 << 20);
  for (const Schedule& sc : {kSchedules[0], kSchedules[2]}) {
    pe_emu::set_schedule(sc.order, sc.seed);
    struct Shape {
      unsigned blocks, threads;
      int reps;
    };
    for (const Shape s : {Shape{1, 1, 20000}, Shape{1, 100, 2000}, Shape{40, 256, 20}}) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < s.reps; ++r) write_kernel<<<s.blocks, s.threads>>>(out.data());
      const double sec =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%-12s %6u threads/launch: %8.1f us/launch, %.2fM threads/s\n", sc.name,
                  s.blocks * s.threads, 1e6 * sec / s.reps,
                  1e-6 * s.reps * s.blocks * s.threads / sec);
    }
    std::vector<double> x(kThreads * 40, 1.0), wo(x.size()), bo(40);
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < 20; ++r)
      reductions_kernel<<<40, kThreads>>>(x.data(), wo.data(), bo.data());
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%-12s warp_sum + block_sum, 10240 threads (5 shuffles, 10 barriers each): "
                "%.1f us/launch\n",
                sc.name, 1e6 * sec / 20);
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<int()>> cases = {
      {"missing_barrier", case_missing_barrier}, {"shared_overrun", case_shared_overrun},
      {"shared_overrun_indexed", case_shared_overrun_indexed},
      {"shuffle_deadlock", case_shuffle_deadlock}, {"device_assert", case_device_assert},
      {"bad_config", case_bad_config},           {"divergent_barrier", case_divergent_barrier},
      {"reductions", case_reductions},           {"warp_intrinsics", case_warp_intrinsics},
      {"shared_memory", case_shared_memory},     {"caps", case_caps},
      {"launchers", case_launchers},             {"bench", case_bench},
      {"half_conversions", case_half_conversions},
      {"bf16_conversions", case_bf16_conversions}};
  if (argc != 2 || cases.count(argv[1]) == 0) {
    std::printf("usage: selftest CASE; cases:");
    for (const auto& kv : cases) std::printf(" %s", kv.first.c_str());
    std::printf("\n");
    return 2;
  }
  const int rc = cases.at(argv[1])();
  if (rc == 0 && failures == 0) {
    std::printf("PASS %s\n", argv[1]);
    return 0;
  }
  return 1;
}
