#pragma once
// pe_emu: runs pyengine's CUDA kernels on the CPU, one fiber per CUDA thread (README.md).
//
// The .cu sources are compiled unmodified as host C++ after rewrite.py turned
//   K<<<grid, block, shared, stream>>>(args)   into  ::pe_emu::launch(K, grid, block, shared,
//                                                    stream, "K", __FILE__, __LINE__)(args)
//   __shared__ T name[A][B];                   into  T (&name)[A][B] = ::pe_emu::shared<...>
// with include/ first on the include path (include/cuda_runtime.h is the device-side surface).
//
// Launches run synchronously on the calling OS thread, one block after another, and are
// serialised by a lock. Everything here is for tests: nothing is tuned for speed beyond keeping
// a test suite's launches fast.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda_runtime_api.h"

namespace pe_emu {

// The order in which runnable threads of a block resume (each round, between barriers and warp
// rendezvous) and the order in which the blocks of a grid run. Shuffled draws a fresh permutation
// each round from a generator seeded by set_schedule: deterministic for a given seed.
enum class Order { InOrder, Reversed, Shuffled };
void set_schedule(Order order, uint64_t seed = 0);

// Clears the sticky error of a device-side assert or launch failure (as cudaDeviceReset would)
// and the last error.
void reset_device();
// What the last error was, in words ("" after reset_device): the failed assert, the deadlocked
// lanes, the refused launch configuration...
std::string last_error_message();
// The sticky error a device-side assert, a deadlock or a divergent barrier left (cudaSuccess if
// none): every launch fails with it until reset_device().
cudaError_t sticky_error();

struct Stats {
  int64_t launches = 0;           // grids that ran (or started to)
  int64_t blocks = 0;             // blocks started
  int64_t threads = 0;            // threads started
  int64_t shared_bytes_peak = 0;  // largest static + dynamic shared memory of one block
};
Stats stats();
// Grids launched per launch site since reset_stats(), keyed "<file name>:<kernel as written>"
// (e.g. "pool.cu:max_pool2d_forward_kernel<T, true>"): what the lane's coverage test reads.
std::map<std::string, int64_t> launch_sites();
void reset_stats();
// Deepest use of a fiber stack seen so far, and the size of each (for sizing; slow: scans).
int64_t stack_bytes_peak();
int64_t stack_bytes();

// Tunable constants of the sources ("caps": grid-size caps and the like), so that tests can make
// a loop over blocks run with small inputs. A source declares
//   inline int64_t kMaxBlocks =
//       ::pe_emu::register_cap(&kMaxBlocks, "kMaxBlocks", int64_t(1) << 16);
// and tests call set_cap("kMaxBlocks", 4). Caps are int or int64_t.
template <class T>
T register_cap(T* var, const char* name, T value);
// Unknown name: std::invalid_argument naming it and the known caps; a value that does not fit
// an int cap: std::out_of_range.
void set_cap(const std::string& name, int64_t value);
void reset_caps();
std::map<std::string, int64_t> caps();

namespace detail {

struct LaunchSite {
  const char* kernel;  // the kernel expression as written
  const char* file;
  int line;
};

using Entry = void (*)(void* ctx);
// Validates the configuration, then runs entry(ctx) once per thread of every block.
void run_grid(Entry entry, void* ctx, dim3 grid, dim3 block, size_t shared_bytes,
              const LaunchSite& site);

void register_cap(void* var, bool is_int64, const char* name, int64_t value);

// This block's allocation for one __shared__ declaration site (key), created on first use.
void* shared_alloc(const void* key, size_t bytes, size_t align, const char* name);
// This block's dynamic shared memory (the launch's shared_bytes).
void* dynamic_shared(size_t align, const char* name);

}  // namespace detail

// The callable that launch() returns: call it with the kernel's arguments.
template <class... P>
class Launcher {
 public:
  using Kernel = void (*)(P...);
  Launcher(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, detail::LaunchSite site)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes), site_(site) {}

  // The arguments convert to the parameter types once, as in a call; every thread gets its own
  // copy of them (a kernel's parameters are by value).
  void operator()(P... args) const {
    State state{kernel_, std::tuple<P...>(args...)};
    detail::run_grid(&Launcher::run_thread, &state, grid_, block_, shared_bytes_, site_);
  }

 private:
  struct State {
    Kernel kernel;
    std::tuple<P...> params;
  };
  static void run_thread(void* ctx) {
    State* s = static_cast<State*>(ctx);
    std::apply(s->kernel, s->params);
  }

  Kernel kernel_;
  dim3 grid_, block_;
  size_t shared_bytes_;
  detail::LaunchSite site_;
};

template <class... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                      cudaStream_t /*stream: every launch runs synchronously*/,
                      const char* kernel_text, const char* file, int line) {
  return Launcher<P...>(kernel, grid, block, shared_bytes, detail::LaunchSite{kernel_text, file,
                                                                              line});
}

// `__shared__ Arr name;` (rewrite.py): the block's allocation of exactly sizeof(Arr) bytes,
// filled with 0xFF when the block starts and freed when it ends. Site is the type of a lambda
// written at the declaration: one allocation per declaration (and template instantiation).
template <class Arr, class Site>
Arr& shared(Site, const char* name) {
  static_assert(sizeof(Arr) <= 48 * 1024, "a __shared__ declaration larger than 48 KiB");
  static const char site_key = 0;
  return *static_cast<Arr*>(detail::shared_alloc(&site_key, sizeof(Arr), alignof(Arr), name));
}

// `extern __shared__ T name[];`: the launch's dynamic shared memory.
template <class T>
T (&dynamic_shared(const char* name))[] {
  return *static_cast<T(*)[]>(detail::dynamic_shared(alignof(T), name));
}

template <class T>
T register_cap(T* var, const char* name, T value) {
  static_assert(std::is_same_v<T, int> || std::is_same_v<T, int64_t>, "caps are int or int64_t");
  detail::register_cap(var, std::is_same_v<T, int64_t>, name, static_cast<int64_t>(value));
  return value;
}

}  // namespace pe_emu
