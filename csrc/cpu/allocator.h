#pragma once
// Where pyengine's CPU operators get their outputs' memory (layout.h's empty_of and
// empty_strided_of route every CPU output here): a cache of large blocks that keeps the memory an
// operator's output held when the tensor is freed, for the next output of the same size.
//
// Why: a training step frees and reallocates the same activation-sized buffers every step, and
// glibc returns blocks that large to the system (mmap, or a trimmed heap) and takes them back
// page by page: a fresh 4.8 MB output costs ~1200 page faults, more time than relu spends on
// it (LeNet at batch 256: relu_backward 313 us in the step against 84 us in a loop that reuses
// its output). torch's own CPU operators pay the same; its CUDA allocator caches for the same
// reason.
//
// Blocks of kMinCachedBytes or more are cached, up to PYENGINE_CPU_CACHE_MB megabytes in all
// (default 1024; 0 turns the cache off, every block then goes back to the system when freed).
// A request takes the smallest cached block that fits with at most a quarter to spare. A freed
// block that does not fit under the limit makes room by giving back the blocks cached longest
// ago: blocks of a working set the process has left (another batch size, another model) must
// not keep the current one's out (they did: LeNet's step at batch 256 took 6.8 ms instead of
// 4.9 ms after 1 GB of other blocks filled the cache, missing twice a step).
// pyengine.empty_cache() gives every cached block back.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <new>
#include <vector>

namespace pyengine {
namespace cpu {

at::Tensor empty_cached(c10::IntArrayRef sizes, const at::TensorOptions& options);

// A std::vector whose data starts on a cache line, for kernel scratch that full 64-byte vectors
// load from and store to: glibc's blocks start 16 bytes past one, so every such vector access
// would straddle two lines (the GEMM's packed panels: dW of 4096 x 4096, one thread, 117 -> 149
// GFLOP/s once aligned).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
};
template <typename T>
using LineVector = std::vector<T, LineAligned<T>>;

// Raw memory from the same cache (kernels' per-call scratch), returned to it by the DataPtr.
c10::DataPtr allocate_cached(size_t bytes);

// A kernel's per-call scratch array from the cache, zero-filled (as the std::vector it replaces):
// large scratch from malloc faults its pages in on every call, as outputs did.
template <typename T>
class CachedBuffer {
 public:
  explicit CachedBuffer(size_t n, bool zero = true)
      : n_(n), data_(allocate_cached(n * sizeof(T))) {
    if (zero)
      for (size_t i = 0; i < n; ++i) data()[i] = T(0);
  }
  CachedBuffer(size_t n, T value) : CachedBuffer(n, false) {
    for (size_t i = 0; i < n; ++i) data()[i] = value;
  }
  T* data() { return static_cast<T*>(data_.get()); }
  const T* data() const { return static_cast<const T*>(data_.get()); }
  size_t size() const { return n_; }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }

 private:
  size_t n_;
  c10::DataPtr data_;
};
at::Tensor empty_strided_cached(c10::IntArrayRef sizes, c10::IntArrayRef strides,
                                const at::TensorOptions& options);

struct CacheStats {
  int64_t cached_bytes;  // held for reuse now
  int64_t limit_bytes;   // PYENGINE_CPU_CACHE_MB
  int64_t hits, misses;  // requests of cacheable size served from the cache / from the system
};
CacheStats cache_stats();
void empty_cache();

}  // namespace cpu
}  // namespace pyengine
